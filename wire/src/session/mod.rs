//! Per-direction state machines of one tunnel connection.
//!
//! Each end of a tunnel runs an [`Encoder`] (its local stream → frames), a [`Decoder`]
//! (frames → its local stream) and a [`SendLedger`] (what its encoder referenced and
//! the peer has not yet acknowledged, kept to answer misses). The driver moves frames:
//!
//! - LITERAL / CHUNK / REF / REF_RECENT / DELTA / END / FILL from the peer →
//!   [`Decoder::handle_frame`];
//! - MISS / ACK from the peer → [`SendLedger::handle_control`] (may produce a FILL);
//! - RESET → abort both local directions.
//!
//! See `LIFECYCLE.md` beside this file for the states and the shutdown rule.

mod batch;
mod compress;
mod decoder;
mod encoder;
mod ledger;

pub use batch::{BatchCompressor, CompressStats, RawBatch};
pub use compress::{CompressMode, CompressPolicy};
pub use decoder::{Decoder, DecoderConfig, DecoderStats};
pub use encoder::{Encoder, EncoderConfig, EncoderStats};
pub use ledger::SendLedger;

use crate::id::ChunkId;
use crate::verified::HashMismatch;

/// A tunnel peer broke the tunnel protocol's rules. Fatal for that tunnel connection only.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// A CHUNK or FILL whose bytes do not hash to its id: refused, never cached.
    #[error("peer sent a chunk that fails verification: {0}")]
    Corrupt(#[from] HashMismatch),
    /// A MISS for a chunk this edge never referenced (or that the peer already acked).
    #[error("peer asked for chunk {0} which this edge did not reference or already released")]
    UnknownMiss(ChunkId),
    /// An ACK beyond what was sent, or going backwards.
    #[error("peer acknowledged offset {acked} but {sent} bytes were sent and {previous} already acknowledged")]
    BadAck {
        /// The offset in the ACK.
        acked: u64,
        /// Logical bytes sent so far.
        sent: u64,
        /// The previous ACK.
        previous: u64,
    },
    /// The peer sent more unresolved data than the flow-control window allows.
    #[error("peer exceeded the flow-control window ({pending} bytes pending, limit {limit})")]
    WindowExceeded {
        /// Bytes queued behind a miss.
        pending: u64,
        /// The limit.
        limit: u64,
    },
    /// A data frame after END.
    #[error("peer sent data after END")]
    DataAfterEnd,
    /// A frame that does not belong where it came.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// A FOLLOW or NEXT naming a position its group does not have (or a "group"
    /// whose content is not a whole number of ids).
    #[error("peer referred to position {pos} of a group of {len} bytes")]
    BadGroup {
        /// The position.
        pos: usize,
        /// The group's content length.
        len: usize,
    },
    /// A DELTA whose patch does not describe edits of its base.
    #[error("peer sent a malformed delta: {0}")]
    BadPatch(#[from] crate::delta::PatchError),
}
