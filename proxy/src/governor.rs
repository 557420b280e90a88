//! Decides, per batch, whether compression would speed a connection up or slow it down.
//!
//! Compression helps only when the link is the bottleneck. The uplink measures, over
//! short windows, how much of its time it spent *waiting for the link* (on the send
//! queue or the flow-control window) and how fast bytes actually left on the tunnel
//! socket. The link limits the connection when the uplink waited for a good share of
//! the window *and* the link drained slower than zstd compresses; only then do batches
//! get compressed. On a fast link (or when the peer is CPU-bound at a rate zstd cannot
//! beat) compressing would make the CPU the bottleneck, so batches go out raw. Kernel
//! socket buffers hide a slow link for megabytes, which is why the decision rests on
//! measured rates, not on the send queue's state at one instant.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

/// Starting guess for zstd-1 throughput, replaced by measurements after the first
/// compressed batches (measured here: ~0.3-0.4 GB/s per core).
const INITIAL_ZSTD_RATE: f64 = 350e6;
/// Weight of a new zstd sample in its moving average.
const ALPHA: f64 = 0.2;
/// Compress only if the link drains below this share of compression speed, so a link
/// that is almost as fast as zstd is not slowed by it.
const MARGIN: f64 = 0.8;
/// Compressions shorter than this say more about timer noise than about zstd.
const MIN_SAMPLE: Duration = Duration::from_micros(50);
/// Length of a measurement window.
const WINDOW: Duration = Duration::from_millis(50);
/// Share of a window spent waiting for the link that makes the link the bottleneck.
const WAIT_SHARE: f64 = 0.25;

/// Bytes written to one tunnel's socket (the writer adds, the uplink reads).
#[derive(Debug, Default)]
pub(crate) struct LinkMeter {
    written: AtomicU64,
}

impl LinkMeter {
    /// Records `bytes` written to the tunnel.
    pub(crate) fn record(&self, bytes: usize) {
        self.written.fetch_add(bytes as u64, Relaxed);
    }

    fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }
}

/// Per-connection measurements and the decision.
#[derive(Debug)]
pub(crate) struct CompressGovernor {
    zstd_rate: f64,
    window_start: Instant,
    written_at_start: u64,
    waited: Duration,
    limited: bool,
    link_rate: Option<f64>,
}

impl CompressGovernor {
    pub(crate) fn new(now: Instant) -> Self {
        CompressGovernor {
            zstd_rate: INITIAL_ZSTD_RATE,
            window_start: now,
            written_at_start: 0,
            waited: Duration::ZERO,
            limited: false,
            link_rate: None,
        }
    }

    /// Adds time the uplink spent waiting for the link (send queue full, window shut).
    pub(crate) fn waited(&mut self, d: Duration) {
        self.waited += d;
    }

    /// Whether the link limits throughput now; closes a measurement window when due.
    pub(crate) fn link_limited(&mut self, now: Instant, link: &LinkMeter) -> bool {
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= WINDOW {
            let written = link.written();
            let rate = (written - self.written_at_start) as f64 / elapsed.as_secs_f64();
            let share = self.waited.as_secs_f64() / elapsed.as_secs_f64();
            self.link_rate = Some(rate);
            self.limited = share >= WAIT_SHARE && rate < self.zstd_rate * MARGIN;
            self.window_start = now;
            self.written_at_start = written;
            self.waited = Duration::ZERO;
        }
        self.limited
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

    fn window(
        g: &mut CompressGovernor,
        t: &mut Instant,
        link: &LinkMeter,
        bytes: usize,
        waited_ms: u64,
    ) -> bool {
        g.waited(Duration::from_millis(waited_ms));
        link.record(bytes);
        *t += Duration::from_millis(100);
        g.link_limited(*t, link)
    }

    #[test]
    fn slow_link_compresses_fast_link_does_not() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        let mut g = CompressGovernor::new(t);
        assert!(!g.link_limited(t, &link), "no evidence yet");
        // 100 Mbit/s (1.25 MB per 100 ms) with the uplink waiting most of the time.
        assert!(window(&mut g, &mut t, &link, 1_250_000, 80));
        // A fast link: 200 MB per 100 ms, the uplink hardly waits.
        assert!(!window(&mut g, &mut t, &link, 200_000_000, 5));
        // A peer that is slow but faster than zstd: no point compressing.
        assert!(!window(&mut g, &mut t, &link, 60_000_000, 90));
    }

    #[test]
    fn zstd_rate_follows_measurements() {
        let t = Instant::now();
        let mut g = CompressGovernor::new(t);
        for _ in 0..50 {
            g.record(1 << 20, Duration::from_millis(10));
        }
        assert!((g.zstd_rate - 104_857_600.0).abs() < 1e6, "{}", g.zstd_rate);
        g.record(10, Duration::from_nanos(10));
        assert!(
            (g.zstd_rate - 104_857_600.0).abs() < 1e6,
            "tiny samples ignored"
        );
    }
}
