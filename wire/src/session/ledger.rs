//! The sender's ledger: logical bytes sent, acknowledged, and the chunks it must keep
//! to answer the peer's misses.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::SessionError;
use crate::frame::Frame;
use crate::id::ChunkId;
use crate::store::PeerHoldings;

/// What one direction's encoder sent and the peer has not acknowledged yet.
///
/// A REF is only safe while its bytes can still be produced on request: the ledger pins
/// the bytes of every REF until the peer's ACK passes it. An ACK at offset `n` means
/// the peer's decoder has resolved every data frame ending at or before `n`, so it can
/// never ask for them again. Memory is bounded by the flow-control window: the encoder
/// stops taking input while `sent - acked` exceeds it.
#[derive(Default)]
pub struct SendLedger {
    sent: u64,
    acked: u64,
    queue: VecDeque<(u64, ChunkId)>,
    pinned: HashMap<ChunkId, (Bytes, u32)>,
    pinned_bytes: usize,
    /// Chunks this direction delivered whole (CHUNK) or as a DELTA, and groups it
    /// formed, with the offset they end at and whether they are groups, until
    /// acknowledged: if the connection fails first, the peer may never have stored
    /// them, and the sender's model of the peer must forget them.
    carried: VecDeque<(u64, ChunkId, bool)>,
    /// Told of every carried group the peer acknowledges ([`SendLedger::confirming`]).
    peer: Option<Arc<dyn PeerHoldings>>,
}

impl std::fmt::Debug for SendLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendLedger")
            .field("sent", &self.sent)
            .field("acked", &self.acked)
            .field("pinned_bytes", &self.pinned_bytes)
            .finish()
    }
}

impl SendLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Confirms to `peer` ([`PeerHoldings::confirm`]) each carried group as the peer
    /// acknowledges it: from then on it is known stored, not just sent (only groups
    /// are asked about, so chunks cost no confirmation).
    #[must_use]
    pub fn confirming(mut self, peer: Arc<dyn PeerHoldings>) -> Self {
        self.peer = Some(peer);
        self
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
    /// `own` may give the same bytes in an allocation of their own (a store's copy),
    /// pinned as they are; otherwise `data` is copied.
    pub(crate) fn pin(&mut self, id: ChunkId, data: &Bytes, own: impl FnOnce() -> Option<Bytes>) {
        self.queue.push_back((self.sent, id));
        let e = self.pinned.entry(id).or_insert_with(|| {
            self.pinned_bytes += data.len();
            // A copy: `data` is usually a slice of a whole local read (256 KiB), which
            // a pin would keep alive until the peer's ACK; at 256 concurrent
            // connections such buffers were most of the sending edge's heap. A
            // store's copy of the chunk is shared instead: no allocation, no copy
            // (the same bytes: both are the content of `id`).
            let held = own()
                .filter(|own| own.len() == data.len())
                .unwrap_or_else(|| Bytes::copy_from_slice(data));
            (held, 0)
        });
        e.1 += 1;
    }

    /// Records that `id` (ending at the current `sent` offset) went out whole or as a
    /// delta: the peer stores it once it decodes it.
    pub(crate) fn carry(&mut self, id: ChunkId) {
        self.carried.push_back((self.sent, id, false));
    }

    /// Records that group `id` ([`crate::group`]) ended at the current `sent` offset:
    /// the peer stores it once it delivers that far, and is confirmed to hold it
    /// when it acknowledges that.
    pub(crate) fn carry_group(&mut self, id: ChunkId) {
        self.carried.push_back((self.sent, id, true));
    }

    /// Chunks and groups carried (see [`SendLedger::carry`]) that the peer has not
    /// acknowledged: after a failure, the ones it may never have stored.
    pub fn unacknowledged_carried(&self) -> impl Iterator<Item = &ChunkId> {
        self.carried.iter().map(|(_, id, _)| id)
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
        while let Some(&(end, id, group)) = self.carried.front() {
            if end > offset {
                break;
            }
            self.carried.pop_front();
            if let Some(peer) = self.peer.as_ref().filter(|_| group) {
                peer.confirm(&id);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n; 64])
    }

    #[test]
    fn a_pin_shares_a_copy_of_its_own_and_copies_a_slice() {
        let read = Bytes::from(vec![7u8; 3 * 4096]);
        let page = read.slice(4096..8192);
        let stored = Bytes::copy_from_slice(&page);
        let mut l = SendLedger::new();
        // The store's copy is pinned as it is: no allocation, no copy.
        l.pin(id(1), &page, || Some(stored.clone()));
        assert_eq!(l.get(&id(1)).map(|b| b.as_ptr()), Some(stored.as_ptr()));
        // Without one (or with bytes of another length), the slice is copied: the
        // pin must not keep the whole read alive.
        l.pin(id(2), &page, || None);
        l.pin(id(3), &page, || Some(stored.slice(..100)));
        for n in [2, 3] {
            let pinned = l.get(&id(n)).expect("pinned");
            assert_eq!(*pinned, page);
            assert!(!std::ptr::eq(pinned.as_ptr(), page.as_ptr()));
        }
        assert_eq!(l.pinned_bytes(), 3 * 4096);
    }

    #[test]
    fn carried_chunks_stay_listed_until_acknowledged() {
        let mut l = SendLedger::new();
        for n in 1..=3 {
            l.advance(4096);
            l.carry(id(n));
        }
        l.advance(4096);
        l.pin(id(9), &Bytes::from_static(&[9; 16]), || None);
        let listed = |l: &SendLedger| l.unacknowledged_carried().copied().collect::<Vec<_>>();
        assert_eq!(listed(&l), [id(1), id(2), id(3)]);
        // An ACK that ends inside the second chunk acknowledges only the first.
        l.handle_control(Frame::Ack(4096 + 100)).unwrap();
        assert_eq!(listed(&l), [id(2), id(3)]);
        l.handle_control(Frame::Ack(3 * 4096)).unwrap();
        assert!(listed(&l).is_empty());
        assert_eq!(
            l.pinned_bytes(),
            16,
            "the reference after them is still pinned"
        );
    }

    #[test]
    fn a_repeated_ack_is_a_heartbeat_and_changes_nothing() {
        // Protocol v5: an end with nothing to say repeats its last ACK (0 before any).
        let mut l = SendLedger::new();
        assert_eq!(l.handle_control(Frame::Ack(0)), Ok(None));
        l.advance(4096);
        l.carry(id(1));
        l.advance(4096);
        l.carry(id(2));
        l.handle_control(Frame::Ack(4096)).unwrap();
        for _ in 0..3 {
            assert_eq!(l.handle_control(Frame::Ack(4096)), Ok(None));
            assert_eq!((l.acked(), l.in_flight()), (4096, 4096));
            assert_eq!(l.unacknowledged_carried().collect::<Vec<_>>(), [&id(2)]);
        }
        // Going back is still a violation.
        assert!(l.handle_control(Frame::Ack(100)).is_err());
    }
}
