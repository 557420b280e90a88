//! The sender's ledger: logical bytes sent, acknowledged, and the chunks it must keep
//! to answer the peer's misses.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use super::SessionError;
use crate::frame::Frame;
use crate::id::ChunkId;

/// What one direction's encoder sent and the peer has not acknowledged yet.
///
/// A REF is only safe while its bytes can still be produced on request: the ledger pins
/// the bytes of every REF until the peer's ACK passes it. An ACK at offset `n` means
/// the peer's decoder has resolved every data frame ending at or before `n`, so it can
/// never ask for them again. Memory is bounded by the flow-control window: the encoder
/// stops taking input while `sent - acked` exceeds it.
#[derive(Debug, Default)]
pub struct SendLedger {
    sent: u64,
    acked: u64,
    queue: VecDeque<(u64, ChunkId)>,
    pinned: HashMap<ChunkId, (Bytes, u32)>,
    pinned_bytes: usize,
}

impl SendLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Logical bytes encoded so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Logical bytes the peer has resolved.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Logical bytes in flight (sent, not acknowledged).
    pub fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }

    /// Bytes of distinct chunks currently pinned.
    pub fn pinned_bytes(&self) -> usize {
        self.pinned_bytes
    }

    /// Records `len` more logical bytes sent.
    pub(crate) fn advance(&mut self, len: usize) {
        self.sent += len as u64;
    }

    /// Pins `data` (just referenced as `id`, ending at the current `sent` offset).
    pub(crate) fn pin(&mut self, id: ChunkId, data: &Bytes) {
        self.queue.push_back((self.sent, id));
        let e = self.pinned.entry(id).or_insert_with(|| {
            self.pinned_bytes += data.len();
            (data.clone(), 0)
        });
        e.1 += 1;
    }

    /// The bytes of a pinned chunk.
    pub fn get(&self, id: &ChunkId) -> Option<&Bytes> {
        self.pinned.get(id).map(|(b, _)| b)
    }

    /// Handles a MISS or ACK from the peer; a MISS yields the FILL to send back.
    ///
    /// # Errors
    /// [`SessionError`] for a MISS of an unpinned chunk, a bad ACK, or any other frame.
    pub fn handle_control(&mut self, frame: Frame) -> Result<Option<Frame>, SessionError> {
        match frame {
            Frame::Miss(id) => match self.pinned.get(&id) {
                Some((data, _)) => Ok(Some(Frame::Fill {
                    id,
                    data: data.clone(),
                })),
                None => Err(SessionError::UnknownMiss(id)),
            },
            Frame::Ack(offset) => {
                self.ack(offset)?;
                Ok(None)
            }
            _ => Err(SessionError::Unexpected("control")),
        }
    }

    fn ack(&mut self, offset: u64) -> Result<(), SessionError> {
        if offset > self.sent || offset < self.acked {
            return Err(SessionError::BadAck {
                acked: offset,
                sent: self.sent,
                previous: self.acked,
            });
        }
        self.acked = offset;
        while let Some(&(end, id)) = self.queue.front() {
            if end > offset {
                break;
            }
            self.queue.pop_front();
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.pinned.entry(id) {
                e.get_mut().1 -= 1;
                if e.get().1 == 0 {
                    self.pinned_bytes -= e.get().0.len();
                    e.remove();
                }
            }
        }
        Ok(())
    }
}
