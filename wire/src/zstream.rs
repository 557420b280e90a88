//! Context-keeping compression of batches: one zstd stream per direction of a tunnel
//! connection.
//!
//! Compressing each batch on its own forgets everything before it; neighbouring memory
//! pages share structure well beyond one 256 KiB batch (the same kernel objects, the
//! same strings, page tables a few pages apart). Here every batch is one *flushed*
//! piece of a single zstd frame: the receiver can decode it as soon as it arrives, and
//! matches may reach back a whole window (several MiB) into earlier batches.
//!
//! Only what the protocol guarantees survives: the frames of one direction of one
//! tunnel connection arrive complete and in order, so the decompressor sees exactly the
//! pieces the compressor made, in the order it made them. A new connection starts new
//! contexts. Whenever the compressor starts over (a new level, a failed call), the
//! piece says so (`fresh`) and the decompressor drops its context too.

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// Largest window a peer may make this side keep (16 MiB): bounds the memory one
/// connection's decompressor can be made to allocate.
pub const MAX_WINDOW_LOG: u32 = 24;
/// Smallest window worth a stream (below it, batches alone do as well).
pub const MIN_WINDOW_LOG: u32 = 18;

/// The sending half: compresses batches as flushed pieces of one zstd frame.
pub struct StreamCompressor {
    cctx: CCtx<'static>,
    window_log: u32,
    /// Level of the frame in progress; `None` before the first piece and after a
    /// failure (the next piece starts a new frame).
    level: Option<i32>,
}

impl std::fmt::Debug for StreamCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCompressor")
            .field("window_log", &self.window_log)
            .field("level", &self.level)
            .finish()
    }
}

/// One compressed piece of the stream.
#[derive(Debug)]
pub struct Piece {
    /// The decompressor must drop its context before this piece.
    pub fresh: bool,
    /// The compressed bytes.
    pub bytes: Vec<u8>,
}

impl StreamCompressor {
    /// A compressor keeping `2^window_log` bytes of history (clamped to
    /// [`MIN_WINDOW_LOG`]..=[`MAX_WINDOW_LOG`]).
    pub fn new(window_log: u32) -> Option<Self> {
        Some(StreamCompressor {
            cctx: CCtx::try_create()?,
            window_log: window_log.clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG),
            level: None,
        })
    }

    /// Bytes of history kept.
    pub fn window(&self) -> usize {
        1 << self.window_log
    }

    /// Compresses `raw` as the next piece at `level`. A level other than the frame's
    /// starts a fresh frame (zstd fixes most parameters per frame). `None` if zstd
    /// failed: the stream then starts over with the next piece.
    pub fn compress(&mut self, raw: &[u8], level: i32) -> Option<Piece> {
        let fresh = self.level != Some(level);
        if fresh {
            self.level = None;
            self.cctx
                .reset(zstd_safe::ResetDirective::SessionAndParameters)
                .ok()?;
            crate::zlevel::set(&mut self.cctx, level).ok()?;
            self.cctx
                .set_parameter(CParameter::WindowLog(self.window_log))
                .ok()?;
            self.cctx
                .set_parameter(CParameter::ContentSizeFlag(false))
                .ok()?;
        }
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(raw.len()) + 64);
        let mut input = InBuffer::around(raw);
        loop {
            let mut output = OutBuffer::around(&mut out);
            let left = self.cctx.compress_stream2(
                &mut output,
                &mut input,
                zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush,
            );
            match left {
                Ok(0) if input.pos() == raw.len() => break,
                Ok(_) => out.reserve(64 * 1024),
                Err(_) => {
                    self.level = None;
                    return None;
                }
            }
        }
        self.level = Some(level);
        Some(Piece { fresh, bytes: out })
    }
}

/// The receiving half: decodes the pieces of one stream, in order.
pub struct StreamDecompressor {
    dctx: DCtx<'static>,
}

impl std::fmt::Debug for StreamDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecompressor").finish()
    }
}

/// Why a piece does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// zstd could not allocate its context.
    #[error("cannot allocate a zstd stream context")]
    NoContext,
    /// The piece is not valid zstd data in this stream (damaged, out of order, or a
    /// window over the limit).
    #[error("zstd stream piece does not decode: {0}")]
    Corrupt(&'static str),
    /// The piece decodes to a size other than the announced one.
    #[error("zstd stream piece does not decode to its announced {0} bytes")]
    WrongSize(usize),
}

impl StreamDecompressor {
    /// A decompressor at the start of a stream.
    pub fn new() -> Result<Self, StreamError> {
        let mut dctx = DCtx::try_create().ok_or(StreamError::NoContext)?;
        dctx.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(|_| StreamError::NoContext)?;
        Ok(StreamDecompressor { dctx })
    }

    /// Decodes the next piece, which must yield exactly `raw_len` bytes.
    ///
    /// # Errors
    /// [`StreamError`]; the stream cannot go on after one.
    pub fn decompress(
        &mut self,
        fresh: bool,
        piece: &[u8],
        raw_len: usize,
    ) -> Result<Vec<u8>, StreamError> {
        if fresh {
            self.dctx
                .reset(zstd_safe::ResetDirective::SessionOnly)
                .map_err(|_| StreamError::Corrupt("reset failed"))?;
        }
        let mut out: Vec<u8> = Vec::with_capacity(raw_len);
        let mut input = InBuffer::around(piece);
        loop {
            let (in_before, out_before) = (input.pos(), out.len());
            if in_before == piece.len() && out_before == raw_len {
                break;
            }
            let mut output = OutBuffer::around(&mut out);
            self.dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| StreamError::Corrupt(zstd_safe::get_error_name(code)))?;
            if input.pos() == in_before && out.len() == out_before {
                // No progress: the piece ends early, or holds more than announced.
                return Err(StreamError::WrongSize(raw_len));
            }
        }
        // zstd may have taken all the input and still hold decoded bytes that did not
        // fit: the piece then holds more than announced.
        let mut probe = [0u8; 1];
        let mut output = OutBuffer::around(&mut probe);
        self.dctx
            .decompress_stream(&mut output, &mut InBuffer::around(&[]))
            .map_err(|code| StreamError::Corrupt(zstd_safe::get_error_name(code)))?;
        if output.pos() != 0 {
            return Err(StreamError::WrongSize(raw_len));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..4096)
            .map(|i| {
                if i % 64 < 40 {
                    (i % 7) as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn pieces_decode_in_order_and_reuse_history() {
        let mut c = StreamCompressor::new(20).unwrap();
        let mut d = StreamDecompressor::new().unwrap();
        let first: Vec<u8> = (0..16).flat_map(page).collect();
        let p1 = c.compress(&first, 3).unwrap();
        assert!(p1.fresh);
        assert_eq!(
            d.decompress(p1.fresh, &p1.bytes, first.len()).unwrap(),
            first
        );
        // The same content again costs almost nothing: it is in the window.
        let p2 = c.compress(&first, 3).unwrap();
        assert!(!p2.fresh);
        assert!(p2.bytes.len() < first.len() / 50, "{}", p2.bytes.len());
        assert_eq!(
            d.decompress(p2.fresh, &p2.bytes, first.len()).unwrap(),
            first
        );
        // A new level starts over, and the decompressor follows.
        let p3 = c.compress(&first, 1).unwrap();
        assert!(p3.fresh);
        assert_eq!(
            d.decompress(p3.fresh, &p3.bytes, first.len()).unwrap(),
            first
        );
    }

    #[test]
    fn wrong_sizes_and_order_are_errors() {
        let mut c = StreamCompressor::new(20).unwrap();
        let data: Vec<u8> = (0..4).flat_map(page).collect();
        let p1 = c.compress(&data, 3).unwrap();
        let p2 = c.compress(&data, 3).unwrap();
        let mut d = StreamDecompressor::new().unwrap();
        assert!(d.decompress(true, &p1.bytes, data.len() - 1).is_err());
        let mut d = StreamDecompressor::new().unwrap();
        assert!(d.decompress(true, &p1.bytes, data.len() + 1).is_err());
        // The second piece alone refers to history this decompressor never saw.
        let mut d = StreamDecompressor::new().unwrap();
        assert!(d.decompress(false, &p2.bytes, data.len()).is_err());
    }
}
