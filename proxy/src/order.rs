//! The order in which the accepting edge connects a peer's connections to their
//! target.
//!
//! QEMU 7.2's destination takes the first accepted connection of a migration as its
//! main channel and later ones as multifd or postcopy-preempt channels, so a
//! migration's connections must reach the target in the order the sending edge
//! accepted them. The sending edge used to wait for each connection's handshake reply
//! before sending the next one's Hello: one round trip per channel, 80 ms for a
//! four-channel multifd migration over a 20 ms RTT WAN. Now it sends the Hellos one
//! after another without waiting, each naming the connection before it in its chain
//! (`Hello::after_seq`), and this edge connects a connection to the target only once
//! the one it names has been connected (or failed): the order holds, and the Hellos
//! cross the WAN in parallel.
//!
//! A predecessor whose Hello never arrives (its connection died on the way) is waited
//! for a bounded time (the caller gives half a connect timeout, so the sender, which
//! waits one for the reply, still gets it); then the connection goes ahead (counted).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Connections remembered as connected, per peer epoch: predecessors are recent.
const DONE_KEPT: usize = 4096;
/// Peer epochs remembered (a peer restart starts a new epoch).
const PEERS_KEPT: usize = 64;

/// Which of each peer's connections have been connected to their target.
#[derive(Default)]
pub(crate) struct OpenOrder {
    peers: Mutex<Peers>,
    changed: Notify,
}

#[derive(Default)]
struct Peers {
    by_epoch: HashMap<(String, u64), Opened>,
    /// Insertion order of `by_epoch`, oldest first.
    age: VecDeque<(String, u64)>,
}

#[derive(Default)]
struct Opened {
    done: HashSet<u64>,
    fifo: VecDeque<u64>,
    /// The largest sequence number forgotten from `done`: anything at or below it is
    /// taken as done (it was, or its Hello is long overdue).
    forgotten: u64,
}

impl Opened {
    fn has(&self, seq: u64) -> bool {
        seq <= self.forgotten || self.done.contains(&seq)
    }
}

impl OpenOrder {
    /// Waits until connection `after` of the peer (`edge`, `epoch`) has been connected
    /// to its target (at once when `after` is 0: the first of its chain), at most
    /// `limit`. Returns whether it was; `false` means the wait expired.
    pub(crate) async fn wait_for(
        &self,
        edge: &str,
        epoch: u64,
        after: u64,
        limit: Duration,
    ) -> bool {
        if after == 0 {
            return true;
        }
        let deadline = Instant::now() + limit;
        loop {
            // Registered before the check, so a `done` between the two is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_done(edge, epoch, after) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.is_done(edge, epoch, after);
            }
        }
    }

    /// Records that connection `seq` of the peer (`edge`, `epoch`) has been connected
    /// to its target, or failed to be: the connections after it may go.
    pub(crate) fn done(&self, edge: &str, epoch: u64, seq: u64) {
        {
            let mut peers = self.peers.lock().expect("open order lock");
            let key = (edge.to_string(), epoch);
            if !peers.by_epoch.contains_key(&key) {
                if peers.age.len() >= PEERS_KEPT {
                    if let Some(old) = peers.age.pop_front() {
                        peers.by_epoch.remove(&old);
                    }
                }
                peers.age.push_back(key.clone());
            }
            let opened = peers.by_epoch.entry(key).or_default();
            if opened.done.insert(seq) {
                opened.fifo.push_back(seq);
                if opened.fifo.len() > DONE_KEPT {
                    let old = opened.fifo.pop_front().expect("non-empty");
                    opened.done.remove(&old);
                    opened.forgotten = opened.forgotten.max(old);
                }
            }
        }
        self.changed.notify_waiters();
    }

    fn is_done(&self, edge: &str, epoch: u64, seq: u64) -> bool {
        let peers = self.peers.lock().expect("open order lock");
        peers
            .by_epoch
            .get(&(edge.to_string(), epoch))
            .is_some_and(|o| o.has(seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_connection_waits_for_the_one_it_names() {
        let order = Arc::new(OpenOrder::default());
        let long = Duration::from_secs(10);
        assert!(order.wait_for("a", 1, 0, long).await, "first of its chain");
        let waiting = {
            let order = order.clone();
            tokio::spawn(async move { order.wait_for("a", 1, 7, long).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "went ahead of its predecessor");
        // Another peer's, or another epoch's, connection 7 is not this one's.
        order.done("b", 1, 7);
        order.done("a", 2, 7);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "released by another peer's connection"
        );
        order.done("a", 1, 7);
        assert!(tokio::time::timeout(long, waiting).await.unwrap().unwrap());
        // Already done: no wait.
        assert!(order.wait_for("a", 1, 7, Duration::ZERO).await);
    }

    #[tokio::test]
    async fn a_predecessor_that_never_comes_is_waited_for_a_bounded_time() {
        let order = OpenOrder::default();
        let started = Instant::now();
        assert!(!order.wait_for("a", 1, 3, Duration::from_millis(100)).await);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn memory_is_bounded() {
        let order = OpenOrder::default();
        for seq in 1..=(DONE_KEPT as u64 + 10) {
            order.done("a", 1, seq);
        }
        {
            let peers = order.peers.lock().unwrap();
            let a = &peers.by_epoch[&("a".to_string(), 1)];
            assert_eq!((a.done.len(), a.fifo.len()), (DONE_KEPT, DONE_KEPT));
        }
        for epoch in 0..(PEERS_KEPT as u64 + 5) {
            order.done("p", epoch, 1);
        }
        {
            let peers = order.peers.lock().unwrap();
            assert_eq!(peers.by_epoch.len(), PEERS_KEPT);
            assert_eq!(peers.age.len(), PEERS_KEPT);
        }
        // The oldest epochs went first: "a", then "p" 0..=5.
        assert!(!order.is_done("a", 1, DONE_KEPT as u64 + 10));
        assert!(!order.is_done("p", 0, 1));
        assert!(order.is_done("p", PEERS_KEPT as u64 + 4, 1));
    }

    #[test]
    fn forgotten_connections_count_as_done() {
        let order = OpenOrder::default();
        for seq in 1..=(DONE_KEPT as u64 + 10) {
            order.done("a", 1, seq);
        }
        assert!(order.is_done("a", 1, 3), "forgotten, counted done");
        assert!(order.is_done("a", 1, DONE_KEPT as u64 + 10));
        assert!(!order.is_done("a", 1, DONE_KEPT as u64 + 11));
    }
}
