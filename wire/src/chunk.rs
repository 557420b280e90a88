//! Content-defined chunking (FastCDC 2020) over a growing buffer.
//!
//! Boundaries depend only on content, never on how reads split the stream, with one
//! exception the caller chooses: a *flush* (idle input or end of stream) cuts whatever
//! is buffered. That changes only which chunks repeat later (the dedup ratio), never
//! the bytes delivered.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020;

/// FastCDC sizes, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    /// Smallest chunk (except a flushed tail).
    pub min: usize,
    /// Target average chunk.
    pub avg: usize,
    /// Largest chunk.
    pub max: usize,
}

impl ChunkParams {
    /// Defaults for migration-like data: repeats come as 4 KiB pages in runs, so an
    /// average near a page keeps the bytes lost at each run boundary small, while a
    /// reference (33 bytes) stays under 1% of the chunk it replaces.
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 2048,
        avg: 4096,
        max: 16384,
    };

    /// Checks the sizes against FastCDC's ranges and the frame caps.
    ///
    /// # Errors
    /// A message naming the offending size.
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.min >= v2020::MINIMUM_MIN as usize
            && self.min <= self.avg
            && self.avg <= self.max
            && self.avg >= v2020::AVERAGE_MIN as usize
            && self.avg.is_power_of_two()
            && self.max >= v2020::MAXIMUM_MIN as usize
            && self.max <= crate::frame::MAX_CHUNK;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "invalid chunk sizes min={} avg={} max={}: need {} <= min <= avg <= max <= {}, avg a power of two >= {}, max >= {}",
                self.min,
                self.avg,
                self.max,
                v2020::MINIMUM_MIN,
                crate::frame::MAX_CHUNK,
                v2020::AVERAGE_MIN,
                v2020::MAXIMUM_MIN
            ))
        }
    }
}

impl Default for ChunkParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Cuts content-defined chunks off the front of a buffer.
#[derive(Clone, Debug)]
pub struct Chunker {
    params: ChunkParams,
    mask_s: u64,
    mask_l: u64,
}

impl Chunker {
    /// A chunker with these sizes.
    ///
    /// # Panics
    /// If `params` fails [`ChunkParams::validate`].
    pub fn new(params: ChunkParams) -> Self {
        if let Err(e) = params.validate() {
            panic!("{e}");
        }
        // Normalization level 1, as FastCDC::new uses.
        let bits = params.avg.trailing_zeros() as usize;
        Chunker {
            params,
            mask_s: v2020::MASKS[bits + 1],
            mask_l: v2020::MASKS[bits - 1],
        }
    }

    /// The sizes in use.
    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Cuts the next chunk off `buf`, or returns `None` when the buffered bytes may still
    /// grow into a longer chunk. With `flush`, everything buffered is cut (the last chunk
    /// may be short).
    pub fn next(&self, buf: &mut BytesMut, flush: bool) -> Option<Bytes> {
        if buf.is_empty() {
            return None;
        }
        // Without max bytes in hand, a boundary found now could move once more bytes
        // arrive (FastCDC may cut at the buffer end): wait, unless flushing.
        if buf.len() < self.params.max && !flush {
            return None;
        }
        let (_, len) = v2020::cut(
            buf,
            self.params.min,
            self.params.avg,
            self.params.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        debug_assert!(len > 0 && len <= buf.len());
        Some(buf.split_to(len).freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        crate::fuzzing::noise(n, seed)
    }

    fn chunk_all(c: &Chunker, input: &[u8], step: usize) -> Vec<Bytes> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(ch) = c.next(&mut buf, false) {
                out.push(ch);
            }
        }
        while let Some(ch) = c.next(&mut buf, true) {
            out.push(ch);
        }
        out
    }

    #[test]
    fn boundaries_do_not_depend_on_read_size() {
        let c = Chunker::new(ChunkParams::DEFAULT);
        let input = data(300_000, 7);
        let whole = chunk_all(&c, &input, input.len());
        for step in [1, 7, 4096, 65_537] {
            assert_eq!(chunk_all(&c, &input, step), whole, "step {step}");
        }
        assert_eq!(whole.concat(), input);
        assert!(whole.iter().all(|c| c.len() <= ChunkParams::DEFAULT.max));
    }

    #[test]
    fn shifted_content_realigns() {
        let c = Chunker::new(ChunkParams::DEFAULT);
        let base = data(200_000, 3);
        let mut shifted = data(1000, 9);
        shifted.extend_from_slice(&base);
        let a: std::collections::HashSet<_> = chunk_all(&c, &base, 4096).into_iter().collect();
        let b = chunk_all(&c, &shifted, 4096);
        let common: usize = b.iter().filter(|x| a.contains(*x)).map(|x| x.len()).sum();
        assert!(common > 180_000, "only {common} bytes realigned");
    }

    #[test]
    fn rejects_bad_params() {
        let bad = ChunkParams {
            min: 4096,
            avg: 2048,
            max: 8192,
        };
        assert!(bad.validate().is_err());
    }
}
