//! Decides, per batch, whether compression would speed a connection up or slow it down.
//!
//! Compression helps only when the link is the bottleneck: the tunnel's send queue is
//! backed up *and* the queue drains slower than zstd can compress. On a fast link (or
//! when the receiving edge is CPU-bound) compressing would make the CPU the bottleneck,
//! so the batch goes out raw. Both rates are measured, not configured.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Starting guess for zstd-1 throughput, replaced by measurements after the first
/// compressed batches (measured here: ~0.3-0.4 GB/s per core).
const INITIAL_ZSTD_RATE: f64 = 350e6;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.2;
/// Compress only if the link drains below this share of compression speed, so a link
/// that is almost as fast as zstd is not slowed by it.
const MARGIN: f64 = 0.8;
/// Writes shorter than this say more about timer noise than about the link.
const MIN_SAMPLE: Duration = Duration::from_micros(50);

/// Drain rate of one tunnel's socket while its queue is backed up (bytes/s).
#[derive(Debug, Default)]
pub(crate) struct LinkMeter {
    rate_bits: AtomicU64,
}

impl LinkMeter {
    /// Records a write of `bytes` that took `elapsed`, made while more was queued.
    pub(crate) fn record(&self, bytes: usize, elapsed: Duration) {
        if elapsed < MIN_SAMPLE {
            return;
        }
        let sample = bytes as f64 / elapsed.as_secs_f64();
        let old = f64::from_bits(self.rate_bits.load(Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            old + ALPHA * (sample - old)
        };
        self.rate_bits.store(new.to_bits(), Relaxed);
    }

    /// The measured rate, if any.
    pub(crate) fn rate(&self) -> Option<f64> {
        let r = f64::from_bits(self.rate_bits.load(Relaxed));
        (r > 0.0).then_some(r)
    }
}

/// Per-connection compression throughput estimate and the decision.
#[derive(Debug)]
pub(crate) struct CompressGovernor {
    zstd_rate: f64,
}

impl Default for CompressGovernor {
    fn default() -> Self {
        CompressGovernor {
            zstd_rate: INITIAL_ZSTD_RATE,
        }
    }
}

impl CompressGovernor {
    /// Whether the link limits throughput now.
    pub(crate) fn link_limited(&self, backlogged: bool, link_rate: Option<f64>) -> bool {
        backlogged && link_rate.is_none_or(|l| l < self.zstd_rate * MARGIN)
    }

    /// Records a compression of `raw` bytes that took `elapsed`.
    pub(crate) fn record(&mut self, raw: usize, elapsed: Duration) {
        if elapsed < MIN_SAMPLE {
            return;
        }
        let sample = raw as f64 / elapsed.as_secs_f64();
        self.zstd_rate += ALPHA * (sample - self.zstd_rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_link_compresses_fast_link_does_not() {
        let g = CompressGovernor::default();
        assert!(
            !g.link_limited(false, Some(1e6)),
            "an idle queue never compresses"
        );
        assert!(
            g.link_limited(true, None),
            "backed up, rate unknown yet: try"
        );
        assert!(
            g.link_limited(true, Some(12.5e6)),
            "100 Mbit/s is slower than zstd"
        );
        assert!(
            !g.link_limited(true, Some(2e9)),
            "2 GB/s is faster than zstd"
        );
    }

    #[test]
    fn rates_follow_measurements() {
        let m = LinkMeter::default();
        assert_eq!(m.rate(), None);
        m.record(1 << 20, Duration::from_millis(10));
        let r = m.rate().unwrap();
        assert!((r - 104_857_600.0).abs() < 1.0, "{r}");
        m.record(10, Duration::from_nanos(10));
        assert_eq!(m.rate().unwrap(), r, "tiny samples ignored");
        let mut g = CompressGovernor::default();
        for _ in 0..50 {
            g.record(1 << 20, Duration::from_millis(10));
        }
        assert!(
            !g.link_limited(true, Some(200e6)),
            "zstd measured at ~105 MB/s: a 200 MB/s link is faster"
        );
    }
}
