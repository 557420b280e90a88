//! Picks the protocol parser for a connection from its first bytes.

use std::collections::VecDeque;

use super::blocks::BlockFinder;
use super::multifd::MultifdFinder;
use super::nbd::NbdClientFinder;
use super::nbd_server::NbdServerFinder;
use super::qemu::QemuMainFinder;

/// Bytes needed to tell the stream kinds apart (NBD: client flags + `IHAVEOPT`).
const DETECT_LEN: usize = 12;

/// Dispatches to the QEMU main-channel (new or resumed by postcopy recovery), multifd,
/// postcopy-preempt, NBD-client or NBD-server parser, or gives up at byte 0 (the stream is then content-chunked).
#[derive(Debug)]
pub enum DetectingFinder {
    /// Fewer than 12 bytes seen.
    Undecided(Vec<u8>),
    /// QEMU main migration channel.
    Main(QemuMainFinder),
    /// QEMU multifd channel.
    Multifd(MultifdFinder),
    /// NBD client (disk mirror to an NBD export).
    Nbd(NbdClientFinder),
    /// NBD server (its READ replies: a disk pulled from an export).
    NbdServer(NbdServerFinder),
    /// Something else.
    Unknown,
}

impl Default for DetectingFinder {
    fn default() -> Self {
        DetectingFinder::Undecided(Vec::new())
    }
}

impl BlockFinder for DetectingFinder {
    fn feed(&mut self, data: &[u8], out: &mut VecDeque<u64>) {
        match self {
            DetectingFinder::Main(f) => f.feed(data, out),
            DetectingFinder::Multifd(f) => f.feed(data, out),
            DetectingFinder::Nbd(f) => f.feed(data, out),
            DetectingFinder::NbdServer(f) => f.feed(data, out),
            DetectingFinder::Unknown => {}
            DetectingFinder::Undecided(seen) => {
                let take = (DETECT_LEN - seen.len()).min(data.len());
                seen.extend_from_slice(&data[..take]);
                if seen.len() < DETECT_LEN {
                    return;
                }
                let first = std::mem::take(seen);
                *self = if QemuMainFinder::matches(&first) {
                    DetectingFinder::Main(QemuMainFinder::new())
                } else if MultifdFinder::matches(&first) {
                    DetectingFinder::Multifd(MultifdFinder::new())
                } else if NbdClientFinder::matches(&first) {
                    DetectingFinder::Nbd(NbdClientFinder::new())
                } else if NbdServerFinder::matches(&first) {
                    DetectingFinder::NbdServer(NbdServerFinder::new())
                } else if QemuMainFinder::matches_resumed(&first) {
                    DetectingFinder::Main(QemuMainFinder::resumed())
                } else if QemuMainFinder::matches_preempt(&first) {
                    DetectingFinder::Main(QemuMainFinder::preempt())
                } else {
                    DetectingFinder::Unknown
                };
                // Replay what was held back, then the rest.
                self.feed(&first, out);
                self.feed(&data[take..], out);
            }
        }
    }

    fn gave_up(&self) -> Option<(u64, &str)> {
        match self {
            DetectingFinder::Main(f) => f.gave_up(),
            DetectingFinder::Multifd(f) => f.gave_up(),
            DetectingFinder::Nbd(f) => f.gave_up(),
            DetectingFinder::NbdServer(f) => f.gave_up(),
            DetectingFinder::Unknown => Some((0, "not a QEMU migration or NBD stream")),
            DetectingFinder::Undecided(_) => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            DetectingFinder::Main(f) => f.kind(),
            DetectingFinder::Multifd(f) => f.kind(),
            DetectingFinder::Nbd(f) => f.kind(),
            DetectingFinder::NbdServer(f) => f.kind(),
            DetectingFinder::Unknown | DetectingFinder::Undecided(_) => "unknown",
        }
    }

    fn awaits_replies(&self) -> bool {
        match self {
            DetectingFinder::Main(f) => f.awaits_replies(),
            DetectingFinder::Multifd(f) => f.awaits_replies(),
            DetectingFinder::Nbd(f) => f.awaits_replies(),
            DetectingFinder::NbdServer(f) => f.awaits_replies(),
            DetectingFinder::Unknown | DetectingFinder::Undecided(_) => false,
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        match self {
            DetectingFinder::Main(f) => f.counters(),
            DetectingFinder::Multifd(f) => f.counters(),
            DetectingFinder::Nbd(f) => f.counters(),
            DetectingFinder::NbdServer(f) => f.counters(),
            _ => Vec::new(),
        }
    }
}
