//! Telling the operator when this host's TCP send buffer holds tunnel connections back.
//!
//! A TCP connection carries at most what its send buffer holds per round trip, and
//! Linux grows that buffer only up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by
//! default): at a 100 ms round trip, ~40 MB/s per connection however fast the link
//! (docs/DEPLOY.md "Long and fast links"; docs/BENCHMARKS.md §4 "A packet-level WAN
//! path": QEMU straight across 1 Gbit/s at 100 ms took 17.5 s untuned, 8.4 s tuned).
//! The kernel knows when that happens: `TCP_INFO`'s `tcpi_sndbuf_limited` counts the
//! time the sender had nothing unsent, room in its congestion window, and an
//! application blocked on a full buffer, which is this cap and nothing else (a slow
//! receiver shows as receive-window time instead; a slow link as congestion-window
//! time). A connection held back that way for a large share of its sending time makes
//! the edge say what to raise, once.

use std::time::Duration;

use tcp_info::PathSample;

/// Held back at least this long ...
const WARN_MIN: Duration = Duration::from_millis(250);
/// ... and for at least this share of the time it had data in flight.
const WARN_SHARE: f64 = 0.25;

/// `net.ipv4.tcp_wmem`'s maximum on this host (in this network namespace), bytes.
pub(crate) fn tcp_wmem_max() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").ok()?;
    text.split_whitespace().nth(2)?.parse().ok()
}

/// The warning for a tunnel connection that ended in state `end`, if its send buffer
/// held it back enough to be worth one; `wmem_max` is [`tcp_wmem_max`], asked only
/// then (every connection ends here, and on a well-tuned host none needs it).
pub(crate) fn advice(end: &PathSample, wmem_max: impl FnOnce() -> Option<u64>) -> Option<String> {
    let held = Duration::from_micros(end.sndbuf_limited_us);
    let busy = Duration::from_micros(end.busy_us);
    if held < WARN_MIN || held.as_secs_f64() < WARN_SHARE * busy.as_secs_f64() {
        return None;
    }
    let rtt = Duration::from_micros(u64::from(end.rtt_us));
    let cap = match wmem_max() {
        Some(max) if !rtt.is_zero() => format!(
            "net.ipv4.tcp_wmem allows at most {max} B, ~{:.0} MB/s per connection at that \
             round trip",
            max as f64 / rtt.as_secs_f64() / 1e6
        ),
        Some(max) => format!("net.ipv4.tcp_wmem allows at most {max} B"),
        None => "net.ipv4.tcp_wmem caps it".to_string(),
    };
    Some(format!(
        "a tunnel connection was held back by this host's TCP send buffer for {} ms of \
         the {} ms it was sending (round trip {:.1} ms; {cap}): raise the maximum of \
         net.ipv4.tcp_wmem on this host, to about twice the link's rate x round trip \
         (docs/DEPLOY.md \"Long and fast links\")",
        held.as_millis(),
        busy.as_millis(),
        rtt.as_secs_f64() * 1e3,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sndbuf_ms: u64, busy_ms: u64) -> PathSample {
        PathSample {
            sndbuf_limited_us: sndbuf_ms * 1000,
            busy_us: busy_ms * 1000,
            rtt_us: 100_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_connection_mostly_held_back_by_its_send_buffer_gets_advice() {
        let a = advice(&sample(900, 2000), || Some(4 << 20)).expect("advice");
        assert!(a.contains("900 ms of the 2000 ms"), "{a}");
        assert!(a.contains("round trip 100.0 ms"), "{a}");
        // 4 MiB per 100 ms.
        assert!(a.contains("~42 MB/s per connection"), "{a}");
        assert!(a.contains("net.ipv4.tcp_wmem"), "{a}");
    }

    #[test]
    fn brief_or_minor_holds_are_not_worth_a_warning() {
        // Short: the buffer growing with the window at a connection's start.
        assert_eq!(advice(&sample(200, 300), || Some(4 << 20)), None);
        // A small share of a long transfer.
        assert_eq!(advice(&sample(400, 4000), || Some(4 << 20)), None);
        // Nothing measured (no TCP_INFO fields: an old kernel).
        let never = || -> Option<u64> { panic!("the maximum is read only for advice") };
        assert_eq!(advice(&PathSample::default(), never), None);
    }

    #[test]
    fn this_host_has_a_send_buffer_maximum() {
        let max = tcp_wmem_max().expect("/proc/sys/net/ipv4/tcp_wmem on Linux");
        assert!(max >= 4096, "{max}");
    }
}
