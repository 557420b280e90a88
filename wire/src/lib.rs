//! Sans-IO core of the Shrinker edge pair.
//!
//! Nothing here touches a socket, a clock or a runtime: every type is a state machine
//! fed with byte slices or frames, which is what makes the invariant
//! (`decode(encode(x)) == x` for any input, any read split, any cache state)
//! property-testable and fuzzable.
//!
//! # Layout
//! - [`id`]: [`ChunkId`], the BLAKE3 name of a chunk.
//! - [`page_hash`]: BLAKE3 of many 4 KiB blocks side by side (SIMD lanes full).
//! - [`verified`]: [`VerifiedChunk`] / [`UnverifiedChunk`], trust as a type.
//! - [`store`]: the traits the session needs from the shared cache.
//! - [`delta`], [`words`], [`branches`]: near-duplicate chunks as deltas; tables of
//!   64-bit words as their differences; x86 code with its branch targets made absolute.
//! - [`zlevel`], [`zpool`], [`zstream`]: compression levels tuned to memory pages; pooled
//!   contexts for one-shot frames; context-keeping streams of batches.
//! - [`group`]: runs of block ids named by content, so a repeated run of references
//!   crosses as one FOLLOW and one-byte NEXT frames.
#![warn(missing_docs, unreachable_pub)]

pub mod id;
pub mod page_hash;
pub mod store;
pub mod verified;

pub use id::ChunkId;
pub use store::{ContentStore, GroupIndex, Holding, PeerHoldings, SimilarChunks};
pub use verified::{HashMismatch, UnverifiedChunk, VerifiedChunk};
pub mod branches;
pub mod chunk;
pub mod delta;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod group;
pub mod handshake;
pub mod segment;
pub mod session;
pub mod varint;
pub mod words;
pub mod zlevel;
pub mod zpool;
pub mod zstream;

pub use chunk::{ChunkParams, Chunker};
pub use frame::{Frame, FrameDecoder, FrameError, MAX_WORD_STRIDE};
pub use segment::{Segment, Segmenter};
