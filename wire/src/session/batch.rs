//! Batches taken from the encoder, and their compression.
//!
//! The encoder ([`super::Encoder`]) turns the local stream into frames; compressing the
//! frames of a batch is a separate step with its own state (the policy's back-off, the
//! zstd contexts, the context-keeping stream). Keeping it apart lets a driver compress
//! one batch on another core while the encoder hashes the next: on a link-limited
//! connection compression is about half of the sender's CPU. Batches must still be
//! compressed one at a time and in the order they were taken (the stream's pieces
//! chain), which one [`BatchCompressor`] per connection direction guarantees.

use bytes::{Bytes, BytesMut};

use super::compress::{CompressMode, CompressPolicy};
use crate::frame::{self, Frame};
use crate::zstream::StreamCompressor;

/// The frames of one batch as the encoder made them, before compression.
#[derive(Debug)]
pub struct RawBatch {
    pub(super) frames: BytesMut,
    /// Literal and chunk bytes in `frames`: what compression can act on (references
    /// and frame headers are random or tiny).
    pub(super) payload: usize,
    /// The batch ends with END.
    pub(super) end: bool,
}

impl RawBatch {
    /// The frames, uncompressed (END not included).
    pub fn frames(&self) -> &[u8] {
        &self.frames
    }

    /// Bytes of frames (END not counted).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether the batch holds no frames (it may still carry END).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether the batch ends the stream (END follows its frames).
    pub fn end(&self) -> bool {
        self.end
    }
}

/// Counters of one [`BatchCompressor`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompressStats {
    /// Frame bytes produced (after compression).
    pub wire_bytes: u64,
    /// Batches sent compressed.
    pub batches_compressed: u64,
    /// Batches where compression was tried and did not pay.
    pub batches_incompressible: u64,
    /// Of `batches_compressed`, those sent as pieces of the context-keeping stream.
    pub batches_streamed: u64,
    /// Sum of the zstd levels of `batches_compressed` (over that count: the mean level).
    pub batch_level_sum: u64,
    /// Batches sent without trying compression: the link does not need it, or the
    /// policy is backing off after batches that did not pay.
    pub batches_raw: u64,
}

impl CompressStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &CompressStats) {
        self.wire_bytes += other.wire_bytes;
        self.batches_compressed += other.batches_compressed;
        self.batches_incompressible += other.batches_incompressible;
        self.batches_streamed += other.batches_streamed;
        self.batch_level_sum += other.batch_level_sum;
        self.batches_raw += other.batches_raw;
    }

    /// Batches on which compression was tried (paying or not).
    pub fn attempts(&self) -> u64 {
        self.batches_compressed + self.batches_incompressible
    }
}

/// Turns taken batches into wire bytes: a ZSTREAM piece when a stream is granted, else
/// a ZBATCH when compression pays, else the frames as they are.
pub struct BatchCompressor {
    policy: CompressPolicy,
    level: i32,
    /// Try every batch while the link is limited (the link is far slower than
    /// compression: a batch that did not pay cost only idle CPU).
    persistent: bool,
    stream: Option<StreamCompressor>,
    stats: CompressStats,
}

impl std::fmt::Debug for BatchCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchCompressor")
            .field("level", &self.level)
            .field("stream", &self.stream)
            .field("stats", &self.stats)
            .finish()
    }
}

impl BatchCompressor {
    /// A compressor for `mode` at zstd `level`, without a stream.
    pub fn new(mode: CompressMode, level: i32) -> Self {
        BatchCompressor {
            policy: CompressPolicy::new(mode),
            level,
            persistent: true,
            stream: None,
            stats: CompressStats::default(),
        }
    }

    /// Sets the zstd level for the next batches.
    pub fn set_level(&mut self, level: i32) {
        self.level = level;
    }

    /// The zstd level in use.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Whether to try every batch while the link is limited, ignoring the back-off
    /// (see [`CompressPolicy::should_try_persistently`]).
    pub fn set_persistent(&mut self, persistent: bool) {
        self.persistent = persistent;
    }

    /// Compresses batches as pieces of one zstd stream keeping `2^window_log` bytes of
    /// history (`None`: each batch on its own). Taking it away drops the context.
    pub fn set_stream(&mut self, window_log: Option<u32>) {
        match (window_log, &self.stream) {
            (None, _) => self.stream = None,
            (Some(log), Some(s)) if s.window() == 1 << log => {}
            (Some(log), _) => self.stream = StreamCompressor::new(log),
        }
    }

    /// Whether the next batch would be tried at all with this `link_limited` (a batch
    /// that is not costs no CPU worth moving elsewhere). Does not change the back-off.
    pub fn may_try(&self, link_limited: bool) -> bool {
        match self.policy.mode() {
            CompressMode::Off => false,
            CompressMode::Auto => link_limited,
            CompressMode::Always => true,
        }
    }

    /// The wire bytes of `batch`; `link_limited` feeds the `Auto` policy.
    pub fn compress(&mut self, batch: RawBatch, link_limited: bool) -> Bytes {
        let RawBatch {
            frames,
            payload,
            end,
        } = batch;
        let mut out = BytesMut::new();
        if !frames.is_empty() {
            // While the link is far slower than compression, every batch is tried: a
            // batch that did not pay cost CPU the link leaves idle anyway, and
            // skipping the next would send it raw over the slow link (8-9 MB of raw
            // batches on four Linux guests at 100 Mbit/s).
            let try_it = if self.persistent && link_limited {
                self.policy.should_try_persistently(link_limited)
            } else {
                self.policy.should_try(link_limited)
            };
            out = if try_it {
                // A batch of mostly references still compresses (page headers, and the
                // same ids recurring: pages repeated within a guest; 4.3% fewer WAN
                // bytes on Linux guests, `bench encode`); but when it does not pay,
                // that says nothing about the data to come.
                let mostly_refs = payload * 4 < frames.len() * 3;
                self.compressed(frames, mostly_refs)
            } else {
                self.stats.batches_raw += 1;
                frames
            };
        }
        if end {
            Frame::End.encode(&mut out);
        }
        self.stats.wire_bytes += out.len() as u64;
        out.freeze()
    }

    /// `raw` as the stream's next piece, or as a ZBATCH if that pays, or as it is.
    fn compressed(&mut self, raw: BytesMut, mostly_refs: bool) -> BytesMut {
        let mut out = BytesMut::new();
        if let Some(piece) = self.compress_piece(&raw) {
            // The stream has moved on: this piece must go, paying or not (zstd adds a
            // few bytes per 128 KiB at worst).
            let pays = CompressPolicy::pays(raw.len(), piece.bytes.len());
            if pays || !mostly_refs {
                self.policy.record(pays);
            }
            self.stats.batches_compressed += 1;
            self.stats.batches_streamed += 1;
            self.stats.batch_level_sum += self.level.max(0) as u64;
            out.reserve(24 + piece.bytes.len());
            frame::encode_zstream_header(&mut out, piece.fresh, raw.len(), piece.bytes.len());
            out.extend_from_slice(&piece.bytes);
            return out;
        }
        match self.compress_alone(&raw) {
            Some(z) if CompressPolicy::pays(raw.len(), z.len()) => {
                self.policy.record(true);
                self.stats.batches_compressed += 1;
                self.stats.batch_level_sum += self.level.max(0) as u64;
                out.reserve(24 + z.len());
                frame::encode_zbatch_header(&mut out, raw.len(), z.len());
                out.extend_from_slice(&z);
                out
            }
            _ => {
                if !mostly_refs {
                    self.policy.record(false);
                }
                self.stats.batches_incompressible += 1;
                raw
            }
        }
    }

    /// The batch as the stream's next piece, if there is a stream.
    fn compress_piece(&mut self, raw: &[u8]) -> Option<crate::zstream::Piece> {
        if raw.len() > frame::MAX_BATCH_RAW {
            return None;
        }
        let level = self.level;
        self.stream.as_mut()?.compress(raw, level)
    }

    /// The batch as one zstd frame of its own (with a context of the process's pool:
    /// a batch on its own needs none of its own).
    fn compress_alone(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        if raw.len() > frame::MAX_BATCH_RAW {
            return None;
        }
        crate::zpool::compress(raw, None, self.level)
    }

    /// Counters so far.
    pub fn stats(&self) -> &CompressStats {
        &self.stats
    }
}
