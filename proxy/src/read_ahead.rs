//! How far a connection's downlink may read the tunnel ahead of its local socket.
//!
//! The downlink stores every chunk it decodes, and sibling connections wait for those
//! chunks (a REF_RECENT whose copy travels on another connection). If it stopped
//! reading the tunnel whenever its local socket was full, a chunk behind that point
//! would wait for the local application, which may itself be waiting for a sibling
//! that waits for the chunk: QEMU's multifd channels do exactly this at each sync
//! point (every channel must reach the sync before any goes on). The sending edge
//! reads its channels at its own pace, so on a busy machine one channel's pages can
//! reference a page another channel carries after its sync; the receiving edge then
//! stalled until the deferred references expired (500 ms without progress) and fell
//! back to MISS/FILL round trips: 114–273 misses and +0.1–0.8 s in three of five
//! 4-VM multifd migrations at 1 Gbit/s with one core kept busy.
//!
//! So the downlink keeps decoding while its output waits, holding the resolved bytes.
//! Each connection may hold [`BASE`] bytes on its own; beyond that it covers what it
//! holds with memory taken in [`STEP`]s from an edge-wide budget (`--read-ahead-mem`)
//! and gives it back as the local side drains, so the edge's memory stays bounded
//! however many connections have stalled consumers (up to one read's output over).
//! Acknowledgements still wait for the local socket (`conn::downlink` holds each ACK
//! until its bytes are written), so the peer's window also bounds what is held, and
//! the peer never completes a connection on bytes that are only queued here.
//! Most held bytes are chunks the store holds too (the same buffers), but literal
//! bytes and evicted chunks are not, so the bound counts every byte.
//!
//! The uplink reads its local socket ahead of the tunnel by the same rule, with its
//! own budget (`--send-ahead-mem`): what a connection holds between its local socket
//! and the tunnel (read, encoded, queued for compression or for the writer) beyond
//! [`BASE`] must be covered by steps from the budget, or the connection sends what it
//! has and waits for its own tunnel writes. With 256 connections starting at once,
//! each queueing batches faster than its tunnel took them, the sending edge's heap
//! had grown past 1 GiB. Waiting only for its own writer (never for a budget a
//! sibling holds) keeps it free of the cycles an acknowledgement-based bound ran into:
//! writes need nothing from siblings, while acknowledgements can wait at the peer for
//! a chunk a sibling carries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes a connection may hold without asking the budget (`--read-ahead-mem`, the
/// edge-wide memory beyond these).
pub(crate) const BASE: u64 = 256 << 10;

/// Unit of memory taken from and given back to the budget.
pub(crate) const STEP: u64 = 1 << 20;

/// The edge's read-ahead memory beyond every connection's [`BASE`].
#[derive(Debug)]
pub(crate) struct ReadAheadBudget {
    left: AtomicU64,
}

impl ReadAheadBudget {
    /// A budget of `bytes`.
    pub(crate) fn new(bytes: u64) -> Arc<Self> {
        Arc::new(ReadAheadBudget {
            left: AtomicU64::new(bytes),
        })
    }

    fn take(&self, n: u64) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.left.fetch_add(n, Ordering::AcqRel);
    }

    /// Bytes not taken.
    #[cfg(test)]
    pub(crate) fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }
}

/// One connection's share: what it took from the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    budget: Arc<ReadAheadBudget>,
    taken: u64,
}

impl ReadAhead {
    pub(crate) fn new(budget: Arc<ReadAheadBudget>) -> Self {
        ReadAhead { budget, taken: 0 }
    }

    /// Whether the downlink may read more from the tunnel while it holds `held`
    /// resolved bytes not yet written locally: when what it holds beyond [`BASE`] is
    /// covered by steps taken from the budget (taking more if the budget has them).
    /// One read may then add what it decodes to (a read of references can stand for
    /// megabytes of output), which the next call must cover before reading again.
    pub(crate) fn may_read(&mut self, held: u64) -> bool {
        let needed = steps_for(held);
        if needed <= self.taken {
            return true;
        }
        if self.budget.take(needed - self.taken) {
            self.taken = needed;
            return true;
        }
        false
    }

    /// The local side drained to `held` bytes: gives back the steps no longer used
    /// (an idle connection keeps none).
    pub(crate) fn drained(&mut self, held: u64) {
        let needed = steps_for(held);
        if self.taken > needed {
            self.budget.give(self.taken - needed);
            self.taken = needed;
        }
    }
}

/// Budget memory that holding `held` bytes takes: what is beyond [`BASE`], in whole
/// [`STEP`]s.
fn steps_for(held: u64) -> u64 {
    held.saturating_sub(BASE).div_ceil(STEP) * STEP
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.budget.give(self.taken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_read_ahead_within_their_base_and_the_shared_budget() {
        let budget = ReadAheadBudget::new(4 * STEP);
        let mut a = ReadAhead::new(budget.clone());
        let mut b = ReadAhead::new(budget.clone());
        // Within the base: no memory taken.
        assert!(a.may_read(0) && a.may_read(BASE));
        assert_eq!(budget.left(), 4 * STEP);
        // Beyond it, whole steps covering what is held, from the shared budget.
        assert!(a.may_read(BASE + 1));
        assert_eq!(budget.left(), 3 * STEP);
        assert!(a.may_read(BASE + STEP), "within the step taken");
        assert!(a.may_read(BASE + 2 * STEP + 5), "two more steps");
        assert_eq!(budget.left(), STEP);
        assert!(!b.may_read(BASE + 2 * STEP), "the budget lacks two steps");
        assert_eq!(budget.left(), STEP, "a refusal takes nothing");
        assert!(b.may_read(BASE + STEP));
        assert_eq!(budget.left(), 0);
        assert!(!a.may_read(BASE + 3 * STEP + 1), "budget spent");
        // Draining gives back the steps no longer needed.
        a.drained(BASE + STEP + 1);
        assert_eq!(budget.left(), STEP, "two steps still in use");
        a.drained(BASE);
        assert_eq!(budget.left(), 3 * STEP);
        assert!(b.may_read(BASE + 3 * STEP));
        drop(b);
        assert_eq!(
            budget.left(),
            4 * STEP,
            "a dropped connection gives back all"
        );
        drop(a);
        assert_eq!(budget.left(), 4 * STEP);
        // No budget: the base alone.
        let mut c = ReadAhead::new(ReadAheadBudget::new(0));
        assert!(c.may_read(BASE) && !c.may_read(BASE + 1));
    }
}
