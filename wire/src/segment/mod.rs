//! Stream segmenters: they decide where chunk boundaries are, never what the bytes are.
//!
//! A segmenter consumes bytes from the front of the connection's read buffer and yields
//! [`Segment`]s whose concatenation is exactly the bytes consumed. Protocol-aware
//! segmenters (QEMU migration, NBD writes and reads) find 4 KiB pages at exact offsets; [`CdcSegmenter`]
//! serves every other stream. A segmenter that is unsure yields opaque bytes: a wrong
//! guess only costs dedup ratio, because the encoder ships whatever the segments hold.

use bytes::{Bytes, BytesMut};

use crate::chunk::{ChunkParams, Chunker};

pub mod blocks;
mod cdc;
pub mod detect;
pub mod multifd;
pub mod nbd;
pub mod nbd_server;
pub mod qemu;
pub use blocks::{BlockFinder, BlockSegmenter};
pub use cdc::CdcSegmenter;

/// A piece of the stream, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Bytes worth no dedup attempt (headers, tails, small pieces): sent as literals.
    Opaque(Bytes),
    /// A block worth deduplicating: hashed, then sent as a reference or a new chunk.
    Block(Bytes),
}

impl Segment {
    /// The bytes this segment stands for.
    pub fn bytes(&self) -> &Bytes {
        match self {
            Segment::Opaque(b) | Segment::Block(b) => b,
        }
    }
}

/// Turns a byte stream into segments.
pub trait Segmenter: Send {
    /// Consumes what it can from the front of `input`, appending segments to `out`.
    /// Bytes it needs more context for stay in `input`. With `flush` (input idle or at
    /// end of stream) it must consume everything.
    fn segment(&mut self, input: &mut BytesMut, flush: bool, out: &mut Vec<Segment>);

    /// A short name for logs and stats ("cdc", "qemu-main", ...).
    fn kind(&self) -> &'static str;

    /// Whether the stream's sender waits for the peer's reply to each request (NBD's
    /// requests and replies): then the link's speed sets its pace even when nothing
    /// waits for the link, and fewer bytes on the link mean sooner replies.
    fn awaits_replies(&self) -> bool {
        false
    }

    /// What the segmenter recognised so far.
    fn report(&self) -> SegmenterReport {
        SegmenterReport {
            kind: self.kind(),
            ..Default::default()
        }
    }
}

/// What a segmenter recognised in its stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmenterReport {
    /// The segmenter's kind.
    pub kind: &'static str,
    /// Exact protocol blocks (4 KiB pages, disk blocks) found.
    pub blocks: u64,
    /// Blocks found but not sent as blocks (their bytes left early, e.g. on a flush).
    pub blocks_lost: u64,
    /// Bytes the protocol parser classified as not-a-block.
    pub opaque_bytes: u64,
    /// Bytes after the parser gave up, content-defined chunked.
    pub fallback_bytes: u64,
    /// Where and why the parser gave up, if it did.
    pub gave_up: Option<(u64, String)>,
    /// Protocol-specific counters.
    pub counters: Vec<(&'static str, u64)>,
}

/// Chunks shorter than this travel as literals: a reference (33 bytes) would save
/// little, and tiny flushed tails would only churn the cache.
pub const MIN_BLOCK: usize = 512;

/// Builds the default segmenter for a stream of unknown kind.
pub fn default_segmenter(params: ChunkParams) -> Box<dyn Segmenter> {
    Box::new(CdcSegmenter::new(Chunker::new(params)))
}

/// Builds the segmenter for a connection's outgoing direction: QEMU migration main
/// channels and multifd channels are parsed page-exact; any other stream falls back to
/// content-defined chunking from its first byte.
pub fn detecting_segmenter(params: ChunkParams) -> Box<dyn Segmenter> {
    Box::new(BlockSegmenter::new(
        detect::DetectingFinder::default(),
        Chunker::new(params),
    ))
}
