//! Memory for context-keeping compression streams, shared by every connection of an
//! edge.
//!
//! A stream keeps its window of history on both edges (the compressor's copy here,
//! the decompressor's at the peer), so an edge cannot give one to every connection:
//! at 256 connections an 8 MiB window each would be 2 GiB. Connections whose link is
//! the bottleneck ask for a grant when they start compressing; the rest of the time,
//! and when the budget is spent, batches are compressed one at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// History per stream: 8 MiB (32 batches of 256 KiB).
pub(crate) const STREAM_WINDOW_LOG: u32 = 23;
/// What one stream costs this edge: its window plus zstd's match tables at the
/// strongest level the governor uses (a context's own size after a 4 MiB piece,
/// `CCtx::sizeof`: 11.8 MB at level 6, 14.4 MB at level 8, the window 8 MiB of it).
const STREAM_COST: usize = (1 << STREAM_WINDOW_LOG) + (6 << 20);

/// The edge's stream memory.
#[derive(Debug)]
pub(crate) struct StreamBudget {
    left: AtomicUsize,
}

/// One connection's stream, returned to the budget when dropped.
#[derive(Debug)]
pub(crate) struct StreamGrant {
    budget: Arc<StreamBudget>,
}

impl StreamBudget {
    /// A budget of `bytes` (0: no streams).
    pub(crate) fn new(bytes: u64) -> Arc<Self> {
        Arc::new(StreamBudget {
            left: AtomicUsize::new(usize::try_from(bytes).unwrap_or(usize::MAX)),
        })
    }

    /// A stream's worth of memory, if the budget has it.
    pub(crate) fn take(self: &Arc<Self>) -> Option<StreamGrant> {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(STREAM_COST)
            })
            .ok()?;
        Some(StreamGrant {
            budget: self.clone(),
        })
    }

    /// Streams that could still be granted.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.left.load(Ordering::Acquire) / STREAM_COST
    }
}

impl StreamGrant {
    /// The window the stream may keep, as a power of two.
    pub(crate) fn window_log(&self) -> u32 {
        STREAM_WINDOW_LOG
    }
}

impl Drop for StreamGrant {
    fn drop(&mut self) {
        self.budget.left.fetch_add(STREAM_COST, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_bounded_and_returned() {
        let budget = StreamBudget::new(2 * STREAM_COST as u64 + 1);
        let a = budget.take().unwrap();
        let b = budget.take().unwrap();
        assert!(budget.take().is_none());
        assert_eq!(budget.available(), 0);
        drop(a);
        assert_eq!(budget.available(), 1);
        let _c = budget.take().unwrap();
        drop(b);
        assert!(StreamBudget::new(0).take().is_none());
    }
}
