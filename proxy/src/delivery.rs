//! Which of a connection's tunnel bytes the peer has taken in.
//!
//! The writer's count of bytes handed to the tunnel socket runs ahead of the link by
//! whatever kernel buffers and router queues hold: megabytes per connection, seconds on
//! a slow link. The peer's ACKs say how far it has resolved the stream (in stream
//! bytes, not tunnel bytes); each batch the compressor queues is marked with the stream
//! offset it ends at and its tunnel size, so an ACK turns into tunnel bytes the peer
//! has received. The difference between the two counts, over every connection to the
//! peer, is what is queued on the way: the governor reads it when no wait has told it
//! the link's pace yet.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::governor::LinkHistory;

/// A connection's batches not yet acknowledged by the peer.
pub(crate) struct DeliveryMarks {
    /// (stream offset a batch ends at, its tunnel bytes), oldest first.
    marks: Mutex<VecDeque<(u64, u64)>>,
    history: Arc<LinkHistory>,
}

impl DeliveryMarks {
    pub(crate) fn new(history: Arc<LinkHistory>) -> Self {
        DeliveryMarks {
            marks: Mutex::new(VecDeque::new()),
            history,
        }
    }

    fn marks(&self) -> MutexGuard<'_, VecDeque<(u64, u64)>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch of `wire` tunnel bytes, covering the stream up to `stream_end`, is
    /// queued for the tunnel.
    pub(crate) fn queued(&self, stream_end: u64, wire: usize) {
        self.marks().push_back((stream_end, wire as u64));
    }

    /// The peer resolved the stream up to `offset`: the batches it covers arrived.
    pub(crate) fn acked(&self, offset: u64) {
        let mut arrived = 0;
        let mut marks = self.marks();
        while let Some(&(end, wire)) = marks.front() {
            if end > offset {
                break;
            }
            arrived += wire;
            marks.pop_front();
        }
        drop(marks);
        if arrived > 0 {
            self.history.delivered().record(arrived as usize);
        }
    }
}

impl Drop for DeliveryMarks {
    /// Whatever was never acknowledged is settled as arrived: the peer's count of
    /// queued bytes must not keep the bytes of a connection that is gone.
    fn drop(&mut self) {
        let rest: u64 = self.marks().iter().map(|&(_, wire)| wire).sum();
        if rest > 0 {
            self.history.delivered().record(rest as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_turn_into_tunnel_bytes_and_the_rest_is_settled_at_the_end() {
        let history = Arc::new(LinkHistory::default());
        let marks = DeliveryMarks::new(history.clone());
        marks.queued(100, 40);
        marks.queued(250, 70);
        marks.queued(400, 10);
        marks.acked(99);
        assert_eq!(
            history.delivered().written(),
            0,
            "the first batch is not whole"
        );
        marks.acked(250);
        assert_eq!(history.delivered().written(), 110);
        marks.acked(250);
        assert_eq!(history.delivered().written(), 110, "an ACK counts once");
        drop(marks);
        assert_eq!(history.delivered().written(), 120);
    }
}
