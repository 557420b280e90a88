//! The fallback segmenter: content-defined chunks for any stream.

use bytes::BytesMut;

use super::{Segment, Segmenter, MIN_BLOCK};
use crate::chunk::Chunker;

/// Content-defined chunking for streams nobody parses.
#[derive(Debug)]
pub struct CdcSegmenter {
    chunker: Chunker,
}

impl CdcSegmenter {
    /// Wraps a chunker.
    pub fn new(chunker: Chunker) -> Self {
        CdcSegmenter { chunker }
    }
}

impl Segmenter for CdcSegmenter {
    fn segment(&mut self, input: &mut BytesMut, flush: bool, out: &mut Vec<Segment>) {
        while let Some(chunk) = self.chunker.next(input, flush) {
            if chunk.len() < MIN_BLOCK {
                out.push(Segment::Opaque(chunk));
            } else {
                out.push(Segment::Block(chunk));
            }
        }
    }

    fn kind(&self) -> &'static str {
        "cdc"
    }
}
