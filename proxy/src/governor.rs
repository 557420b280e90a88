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
//!
//! Those buffers also mean a new connection needs a while to see its link; a
//! migration is a new connection each time, and on a slow link the first megabytes
//! would go out raw. So every connection to a peer shares a [`LinkHistory`]: a new
//! connection starts from the last decision made on any connection to that peer
//! within [`HISTORY_TTL`] (or, knowing nothing, compresses), and corrects it after its
//! own first window.
//!
//! Concurrent connections to one peer each fill only part of the link, but the level
//! still compares the whole link with one connection's zstd speed. Choosing levels by
//! the connection's share of the link was tried (2026-12-01): the capacity measured
//! while the pipeline, not the link, holds the uplinks back drops as compression gets
//! stronger, and the share pushed four concurrent migrations at 1 Gbit/s into the deep
//! level (2.54 s against 2.15 s without; deciding the strong level too, it took 16
//! multifd channels 5.2 s against 4.4 s); at 100 Mbit/s it saved 4% of the bytes.
//!
//! When the link drains far slower than the fast level compresses, batches use the
//! strong level ([`STRONG_LEVEL`]): it costs about twice the CPU and saves a few
//! percent more, which a slow link turns into time; on a link slower still (around
//! 100-150 Mbit/s against one core), the deep level ([`DEEP_LEVEL`]): a quarter of the
//! fast level's speed for another 4% fewer bytes on guest memory; and on a link of
//! 100 Mbit/s or less, the deeper level ([`DEEPER_LEVEL`]): two thirds of the deep
//! level's speed for another 1.2%.
//!
//! zstd's speed is measured in wall-clock time (what compressing costs the pipeline
//! now, contention included: it picks levels and judges a link that made the uplink
//! wait) and in the compressing thread's CPU time (the codec's own speed: whether a
//! link a wait measured is far slower than compression, in a window without a wait; a
//! dip of the wall-clock speed on a busy host otherwise sent a 100 Mbit/s link raw).
//!
//! Those levels assume the compressor has a core to itself. When it has not (the
//! sending edge shares the machine with the hypervisor, or most of a migration's pages
//! are already held by the peer and what remains costs more CPU per byte sent), the
//! link starves while a strong level runs: the uplink waits neither for the link nor
//! for its source, and the link drains below its known pace. Judged over spans of
//! a few windows (one 50 ms window alternates between a burst into kernel buffers and
//! a writer blocked on a full socket, 0 B), two starved spans in a row step the level
//! down a notch, or straight to the fast level when the second drained below half the
//! pace (a *ceiling* under the level the capacity allows), and a span that waits
//! for the link again steps it back up. The pace is what the path delivered in
//! saturated windows where that exceeds the capacity, and a span whose socket held a
//! backlog is not starved (the link was busy): while a CPU-bound sender's backlog
//! drains, the capacity (the smaller of delivered and written, which the levels are
//! tuned to) sinks to the CPU's pace, and a first guest over 100 Mbit/s at the deeper
//! level once idled the link for a second with no span starved (2.5-3.1 s against
//! ~2.15 s, about one run in ten; twelve alternating runs each: 0 such runs against
//! 1, median 4.25 against 4.15 s, 39.24 against 39.17 MB). Later guests of a
//! cluster, mostly references and deltas after the first, sent at the deep level,
//! kept a 100 Mbit/s link busy about half the time (0.78-0.96 s per guest; capped at
//! the fast level 0.51-0.74 s for 2% more bytes).
//!
//! A migration of a later guest lasts half a second, so the ceiling must move within
//! a tenth of that: spans are two windows long, and a new connection starts at the
//! fast level (compressing at once if the link is known to be slow) and climbs a notch
//! per span that waits for the link. A first guest, link-bound, reaches the deeper
//! level within three spans; a later one, CPU-bound from its first batch on a machine
//! it shares with both QEMUs, never pays for the levels above. Four Linux guests over
//! 100 Mbit/s, alternating runs beside the shared zstd stream: starting from the
//! ceiling the last connection reached (the deeper level, after a first guest) with
//! 200 ms spans, 3.82-3.90 s against the stream's 3.58-3.64 s (later guests 0.53-0.67 s
//! each); starting at the strong level, 3.52-3.86 s against 3.56-3.84 s (the first
//! later guest 0.51-0.69 s); starting at the fast level, 3.50-3.54 s against
//! 3.59-3.72 s (later guests 0.43-0.49 s), for ~1% more bytes than the deep start. So
//! the ceiling is each connection's own (the capacity is shared with the next ones).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
/// Consecutive windows draining more than twice the known capacity (without the
/// uplink waiting) before that capacity is dropped as stale: 0.4 s, longer than kernel
/// buffers can fake a fast link.
const STALE_WINDOWS: u32 = 8;
/// What kernel socket buffers and a router queue take from a new connection before
/// the link can make it wait: until a connection has written this much, a window in
/// which it did not wait says nothing about the link, and while no connection to the
/// peer has measured it either, a decision to compress stands (at 100 Mbit/s each of
/// four concurrent migrations sent ~4 MB raw before its first wait; compressing 8 MiB
/// at the fast level costs ~25 ms of CPU on a fast link).
const BUFFER_ALLOWANCE: u64 = 8 << 20;
/// ... and while all connections to the peer together have written less than this
/// since this one started: many connections at once on a fast LAN pass it within a
/// fraction of a second, four migrations filling buffers on a slow link do not.
const PEER_ALLOWANCE: u64 = 32 << 20;
/// Bytes queued on the way to the peer (written, not yet acknowledged, over every
/// connection to it) that, past the allowances, show a link slower than the writers
/// when no wait has measured it: at least this much...
const QUEUE_EVIDENCE: u64 = 1 << 20;
/// ... and at least this share of what arrived since the connection began. A link
/// that keeps up holds about one round trip's worth (a few percent of what arrives
/// over the allowances); four migrations starting together at 100 Mbit/s had half of
/// what they wrote still queued, and, having never waited (the CPU was the limit),
/// sent their next batches raw (54 raw batches, +10 MB).
const QUEUE_SHARE: f64 = 0.25;
/// ... once the connection is this old: during TCP's slow start the link takes in less
/// than it will (a 1 Gbit/s link with a 20 ms round trip passes 8 MiB within ~0.1 s,
/// most of it still in buffers).
const QUEUE_MIN_AGE: Duration = Duration::from_millis(250);
/// How long a decision seen on one connection guides new connections to that peer.
pub(crate) const HISTORY_TTL: Duration = Duration::from_secs(60);
/// zstd level while the link is limited.
pub(crate) const FAST_LEVEL: i32 = 1;
/// zstd level while the link drains below [`STRONG_SHARE`] of the fast level's speed.
pub(crate) const STRONG_LEVEL: i32 = 3;
/// See [`STRONG_LEVEL`]: the strong level runs at roughly a third of the fast one's
/// speed, so below this share it still outpaces the link.
const STRONG_SHARE: f64 = 0.2;
/// zstd level while the link drains below [`DEEP_SHARE`] of the fast level's speed.
pub(crate) const DEEP_LEVEL: i32 = 6;
/// See [`DEEP_LEVEL`]: measured on guest memory in 256 KiB batches, level 6 runs at
/// ~100 MB/s where level 1 runs at ~420 MB/s and emits ~0.43 of its input, ~43 MB/s;
/// below 5% of the fast level's speed (~21 MB/s) the link stays the bottleneck with
/// room left for hashing and deltas.
const DEEP_SHARE: f64 = 0.05;
/// zstd level while the link drains below [`DEEPER_SHARE`] of the fast level's speed.
pub(crate) const DEEPER_LEVEL: i32 = 8;
/// See [`DEEPER_LEVEL`]: on the batches of four Linux guests (`zstd -b`, levels as
/// `wire::zlevel` tunes them), level 8 runs at ~68 MB/s against level 1's ~510 MB/s
/// and emits 1.2% fewer bytes than level 6 (which runs at ~106 MB/s), 0.27 of its
/// input: ~18 MB/s, 3.6% of the fast level's speed. Below 3.5% the link stays the
/// bottleneck (a 100 Mbit/s link is 2.5-3% of it on this machine's cores).
const DEEPER_SHARE: f64 = 0.035;
/// zstd level while nothing has measured the link to the peer (the first connection,
/// or the first after [`HISTORY_TTL`] of silence) once the tunnel socket, or within
/// the last [`PATH_FULL_MEMORY`] a sibling connection's, has held written bytes back
/// ([`PATH_FULL_UNSENT`], the link or TCP's slow start takes less than is written):
/// the batches that fill kernel buffers before any write waits. A first Linux guest
/// over 100 Mbit/s wrote ~7 MiB that way, at the fast level 10.6% larger than at the
/// deeper one. At the strong level the cluster crossed in 0.5% fewer bytes with a
/// faster first guest (36.69 / 36.71 MB against 36.87 / 36.87, 2.09-2.10 s against
/// 2.12-2.26 s); at the deep level 0.8% fewer bytes, but a first guest 0.15 s slower
/// at 1 Gbit/s (docs/BENCHMARKS.md §4 "The allocator's arenas").
/// Until the socket holds bytes back the fast level without transforms runs
/// ([`CompressGovernor::worth_transforms`]): a path that takes everything at once is
/// no evidence of a slow link, and at 1 Gbit/s the strong level with every transform
/// held a first guest's sender to 27-63 MB/s for its first 0.4 s (docs/BENCHMARKS.md
/// §4 "A first guest on an unmeasured link"). A sibling's evidence counts because
/// connections starting together share the link: four migrations at once over 100
/// Mbit/s, each waiting for its own socket, sent 1.1% more bytes than with the strong
/// level from the start; with the siblings' evidence, 0.7%.
pub(crate) const UNMEASURED_LEVEL: i32 = STRONG_LEVEL;
/// The levels, weakest first: the CPU ceiling moves along them a notch at a time.
const LADDER: [i32; 4] = [FAST_LEVEL, STRONG_LEVEL, DEEP_LEVEL, DEEPER_LEVEL];
/// A span drained below this share of the link's known capacity, while the uplink
/// waited neither for the link nor for its source, starved the link (the CPU was the
/// limit).
const STARVED_SHARE: f64 = 0.8;
/// Share of a span the uplink may wait for its source and still count as busy: a
/// source that pauses (a guest's zero pages, a bandwidth cap) sets the pace itself,
/// and a weaker level would only cost bytes.
const SOURCE_SHARE: f64 = 0.25;
/// A span drained below this share of the capacity goes straight to the fast level.
const STARVED_DEEPLY: f64 = 0.5;
/// Length of a span over which the link's use is judged for the ceiling.
const SPAN: Duration = Duration::from_millis(100);
/// Starved spans in a row before the ceiling drops: the bytes of one span can hide in
/// kernel buffers (a first guest, link-bound overall, had single starved spans).
const STARVED_SPANS: u32 = 2;

/// Share of a window a request/reply source (NBD: each write waits for its reply)
/// may leave the uplink waiting for it, at a pace far below compression's, for
/// compression to be worth it with no wait for the link: the source's pace is the
/// link's round trip *plus each request's time on the link*, which fewer bytes
/// shorten. A QEMU drive-mirror of three 128 MiB disks over 300 Mbit/s with a 10 ms
/// delay drained 23-35 MB/s (the link takes 37.5) while the uplink waited for QEMU
/// 30-90% of each window and never for the link: those batches went raw (93-152 MB,
/// 4.2-5.4 s); every batch compressed, 93 MB in 4.16 s.
const REPLY_PACED_SOURCE: f64 = 0.25;

/// Bytes TCP holds back unsent at a window's end that say the path is full: more than
/// a round trip's worth of segments TCP would send at once on a path that keeps up.
const PATH_FULL_UNSENT: u64 = 256 << 10;
/// ... and at most this unsent, with TCP held back by the windows for less than
/// [`PATH_CLEAR_HELD`] of the window, the path took everything written.
const PATH_CLEAR_UNSENT: u64 = 64 << 10;
const PATH_CLEAR_HELD: f64 = 0.05;

/// A clear path on one connection says nothing of a link its siblings keep full: each
/// socket sees only its own share (four migrations at once over 100 Mbit/s: a
/// connection the CPU slowed found its socket clear while the others' were full, and
/// sent batches raw). A clear socket ends the allowance only when no connection to the
/// peer found the path full this long before.
const PATH_FULL_MEMORY: Duration = Duration::from_secs(1);

/// What the tunnel socket says of the path in one window (see
/// [`CompressGovernor::path_verdict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathVerdict {
    /// TCP holds written bytes back: the path is the bottleneck.
    Full,
    /// Everything written left at once: the path keeps up with this connection.
    Clear,
}

/// What to do with the next batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// Send raw: the link is not the bottleneck.
    Raw,
    /// Compress at this zstd level.
    Zstd(i32),
}

/// The last decision made on any connection to one peer (shared by them), and the
/// bytes all of them wrote: the link's pace is what it drains for all connections
/// together (multifd's channels share one link; each alone would see a quarter of
/// it, take the link for slower than it is and pick levels the CPU cannot keep up
/// with).
#[derive(Debug, Default)]
pub(crate) struct LinkHistory {
    /// Bytes written to this peer by every connection.
    meter: LinkMeter,
    /// Of those, the bytes the peer acknowledged (or that belonged to connections that
    /// are gone): see [`crate::delivery`].
    delivered: LinkMeter,
    limited: AtomicBool,
    link_rate: AtomicU64,
    /// Whether `link_rate` was measured by a wait for the link (not by what queued at
    /// the peer, whose pace may be its CPU's).
    rate_by_wait: AtomicBool,
    /// Milliseconds since `origin` of the last update; 0 = never.
    updated_ms: AtomicU64,
    /// Bytes the path took from every connection to the peer, as their sockets report
    /// (`tcp_info`'s bytes acknowledged by the next hop).
    path_taken: LinkMeter,
    /// Milliseconds since `origin` when a connection last found the path full (its
    /// socket held bytes back); 0 = never. See [`PATH_FULL_MEMORY`].
    path_full_ms: AtomicU64,
    /// Milliseconds since `origin` when a connection's socket last held written bytes
    /// back ([`PATH_FULL_UNSENT`]), however young the connection; 0 = never.
    held_ms: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

impl LinkHistory {
    /// Bytes written to this peer by every connection (writers record here).
    pub(crate) fn meter(&self) -> &LinkMeter {
        &self.meter
    }

    /// Bytes the peer has taken in (acknowledgements record here).
    pub(crate) fn delivered(&self) -> &LinkMeter {
        &self.delivered
    }

    fn origin(&self) -> Instant {
        *self.origin.get_or_init(Instant::now)
    }

    fn store(&self, limited: bool, (rate, by_wait): (f64, bool), now: Instant) {
        self.limited.store(limited, Relaxed);
        self.link_rate.store(rate as u64, Relaxed);
        self.rate_by_wait.store(by_wait, Relaxed);
        self.stamp(&self.updated_ms, now);
    }

    /// Stamps `at_ms` with `now`, in milliseconds since `origin` plus one (0 = never).
    fn stamp(&self, at_ms: &AtomicU64, now: Instant) {
        let ms = now.duration_since(self.origin()).as_millis() as u64 + 1;
        at_ms.store(ms, Relaxed);
    }

    fn mark_path_full(&self, now: Instant) {
        self.stamp(&self.path_full_ms, now);
    }

    /// Whether some connection found the path full within [`PATH_FULL_MEMORY`].
    fn path_full_lately(&self, now: Instant) -> bool {
        self.within(&self.path_full_ms, now, PATH_FULL_MEMORY)
    }

    fn mark_held(&self, now: Instant) {
        self.stamp(&self.held_ms, now);
    }

    /// Whether some connection's socket held bytes back within [`PATH_FULL_MEMORY`].
    fn held_lately(&self, now: Instant) -> bool {
        self.within(&self.held_ms, now, PATH_FULL_MEMORY)
    }

    /// Whether the time stamped in `at_ms` ([`LinkHistory::stamp`]) is within `memory`.
    fn within(&self, at_ms: &AtomicU64, now: Instant, memory: Duration) -> bool {
        let at = at_ms.load(Relaxed);
        at != 0
            && now
                .duration_since(self.origin())
                .saturating_sub(Duration::from_millis(at - 1))
                < memory
    }

    /// The last decision, link rate and whether a wait measured that rate, if made
    /// within [`HISTORY_TTL`] of `now`.
    fn recall(&self, now: Instant) -> Option<(bool, f64, bool)> {
        let at = self.updated_ms.load(Relaxed);
        if at == 0 {
            return None;
        }
        let age = now
            .duration_since(self.origin())
            .saturating_sub(Duration::from_millis(at - 1));
        (age < HISTORY_TTL).then(|| {
            (
                self.limited.load(Relaxed),
                self.link_rate.load(Relaxed) as f64,
                self.rate_by_wait.load(Relaxed),
            )
        })
    }
}

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

    pub(crate) fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }
}

/// Per-connection measurements and the decision.
#[derive(Debug)]
pub(crate) struct CompressGovernor {
    history: std::sync::Arc<LinkHistory>,
    /// The fast level's throughput in wall-clock time: what compression takes out of
    /// the pipeline now, contention for the CPU included.
    zstd_rate: f64,
    /// ... and in CPU time: the codec's own speed, whatever else runs on the cores.
    zstd_cpu_rate: f64,
    window_start: Instant,
    /// The meter's reading when the window started; `None` until the first call (the
    /// meter is the peer's, shared with earlier connections: it does not start at 0).
    written_at_start: Option<u64>,
    /// The peer's `path_taken` meter when the window started.
    path_taken_at_start: u64,
    /// Whether the tunnel socket has held written bytes back ([`PATH_FULL_UNSENT`])
    /// since this connection began: before the link is measured, the sign that it may
    /// be slow.
    held_early: bool,
    /// Whether, at the last decision, a sibling connection's socket had held bytes
    /// back lately ([`LinkHistory::held_lately`]).
    sibling_held: bool,
    waited: Duration,
    limited: bool,
    /// The link's rate as last measured while it was saturated (the uplink waited for
    /// it): its capacity, as far as this edge knows.
    capacity: Option<f64>,
    /// Whether a wait for the link measured `capacity` (rather than the queue at the
    /// peer, see [`CompressGovernor::standing_queue`]).
    capacity_by_wait: bool,
    /// What the path delivered in this connection's last saturated windows, for
    /// judging whether the CPU starves the link. `capacity` takes the smaller of
    /// delivered and written, which the levels are tuned to; but while a CPU-bound
    /// sender writes less than its socket's backlog drains, that smaller figure is
    /// the CPU's pace, not the link's, and the link then idled for a second at the
    /// deeper level with no span counted as starved (module notes).
    drained: Option<f64>,
    /// Consecutive unsaturated windows that drained more than twice `capacity`.
    faster_windows: u32,
    /// Bytes drained beyond `capacity` in consecutive windows without a wait.
    excess: f64,
    /// The peer meter's reading at this connection's first batch.
    peer_at_first: u64,
    /// The peer's delivered bytes, and the time, at this connection's first batch.
    delivered_at_first: (u64, Instant),
    /// Time the uplink waited for its source (the local sender) this window.
    source_waited: Duration,
    /// The strongest level the CPU keeps up with (see the module notes).
    ceiling: i32,
    /// The span being measured for the ceiling, from the first window past the
    /// buffer allowance.
    span: Option<Span>,
    /// Consecutive starved spans.
    starved_spans: u32,
    /// Whether the source waits for the peer's replies (see [`REPLY_PACED_SOURCE`]).
    reply_paced: bool,
    /// The tunnel socket's latest kernel state, and its state when the window began.
    path: Option<tcp_info::PathSample>,
    path_at_start: Option<tcp_info::PathSample>,
}

/// Several windows taken together for the CPU ceiling.
#[derive(Debug)]
struct Span {
    start: Instant,
    /// The peer meter's reading at `start`.
    written: u64,
    waited: Duration,
    source_waited: Duration,
    /// Whether the tunnel socket held a backlog back in any of its windows: the link
    /// was busy then, whatever this edge wrote.
    path_full: bool,
}

/// What a finished span says about the link's use.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SpanVerdict {
    /// The uplink waited for the link: the CPU keeps up.
    LinkBound,
    /// Nothing waited but the CPU and the link drained below capacity; `deeply` when
    /// below [`STARVED_DEEPLY`] of it.
    Starved { deeply: bool },
    /// Neither (the source set the pace, or the link ran near capacity).
    Neither,
}

/// A rate estimate after a new measurement: a rise is taken at once, a drop half at a
/// time (see where the capacity is measured).
fn follow_half_down(old: Option<f64>, measured: f64) -> f64 {
    match old {
        Some(o) if measured < o => (measured + o) / 2.0,
        _ => measured,
    }
}

/// The level `by` notches along [`LADDER`] from `level` (the nearest at the ends).
fn notch(level: i32, by: isize) -> i32 {
    let at = LADDER.iter().rposition(|&l| l <= level).unwrap_or(0);
    let to = at.saturating_add_signed(by).min(LADDER.len() - 1);
    LADDER[to]
}

impl CompressGovernor {
    pub(crate) fn new(now: Instant, history: std::sync::Arc<LinkHistory>) -> Self {
        let recalled = history.recall(now);
        // The fast level, whatever the last connection to the peer reached: see the
        // module notes (a new connection earns the stronger levels by waiting for the
        // link).
        let ceiling = FAST_LEVEL;
        // (A recalled capacity of 0 means "not known".)
        CompressGovernor {
            history,
            zstd_rate: INITIAL_ZSTD_RATE,
            zstd_cpu_rate: INITIAL_ZSTD_RATE,
            window_start: now,
            written_at_start: None,
            waited: Duration::ZERO,
            // With nothing known, compress: on a slow link the first megabytes matter
            // and a fast link is recognised after one window (compression then makes
            // the uplink, not the link, the one that waits least).
            limited: recalled.is_none_or(|r| r.0),
            capacity: recalled.map(|r| r.1).filter(|&c| c > 0.0),
            capacity_by_wait: recalled.is_some_and(|r| r.2),
            drained: None,
            faster_windows: 0,
            excess: 0.0,
            peer_at_first: 0,
            delivered_at_first: (0, now),
            source_waited: Duration::ZERO,
            ceiling,
            span: None,
            starved_spans: 0,
            reply_paced: false,
            path: None,
            path_at_start: None,
            path_taken_at_start: 0,
            held_early: false,
            sibling_held: false,
        }
    }

    /// Records what the tunnel socket's kernel state says now (see
    /// [`tcp_info::PathSample`]); `None` where there is no such evidence.
    pub(crate) fn observe_path(&mut self, sample: Option<tcp_info::PathSample>) {
        // Any sample, however young the connection: TCP holding bytes back during its
        // slow start is a slow path for now, as much as a slow link is.
        self.held_early |= sample.is_some_and(|s| s.notsent >= PATH_FULL_UNSENT);
        if let (Some(new), Some(old)) = (sample, self.path) {
            let taken = new.bytes_acked.saturating_sub(old.bytes_acked);
            self.history.path_taken.record(taken as usize);
        }
        self.path = sample;
    }

    /// What to do with the next batch (closes a measurement window when due). `link`
    /// counts the writes of every connection to the peer, `own` this connection's.
    pub(crate) fn encoding(&mut self, now: Instant, link: &LinkMeter, own: &LinkMeter) -> Encoding {
        // The latest sample is told to the peer's history here, where the time is known.
        if self.path.is_some_and(|s| s.notsent >= PATH_FULL_UNSENT) {
            self.history.mark_held(now);
        }
        // Concurrent connections starting together (four migrations at once, multifd's
        // channels) share one link: a sibling's socket holding bytes back speaks for
        // it too.
        self.sibling_held = self.history.held_lately(now);
        if !self.link_limited(now, link, own) {
            return Encoding::Raw;
        }
        if self.capacity.is_none() && self.history.recall(now).is_none() {
            return Encoding::Zstd(if self.suspect() {
                UNMEASURED_LEVEL
            } else {
                FAST_LEVEL
            });
        }
        Encoding::Zstd(self.link_level().min(self.ceiling))
    }

    /// Whether the link's known capacity allows a stronger level than the fast one
    /// (CPU aside): the link is far slower than compression.
    pub(crate) fn link_is_slow(&self) -> bool {
        self.link_level() > FAST_LEVEL
    }

    /// Whether every batch is worth a compression try while the link limits, whatever
    /// earlier batches paid: when the link is far slower than compression (a try that
    /// does not pay costs only CPU the link leaves idle), and while no capacity is
    /// known yet (the first connection to a peer, before a window measured the link).
    /// Without the second, the first Linux guest of a cluster over 100 Mbit/s sent 31
    /// batches raw: five early batches that did not pay (compressed kernel and initrd
    /// images in guest RAM) backed off 1+2+4+8+16 batches, 0.7 MB more on the WAN.
    pub(crate) fn worth_every_try(&self) -> bool {
        self.link_is_slow() || self.capacity.is_none()
    }

    /// Whether the CPU-costly transforms (deltas, word differences, branch targets)
    /// are worth running while the link limits: when it is far slower than compression,
    /// and while no capacity is known yet once the tunnel socket has held written bytes
    /// back (see [`UNMEASURED_LEVEL`]). Before that, nothing says the link is slow.
    pub(crate) fn worth_transforms(&self) -> bool {
        self.link_is_slow() || (self.capacity.is_none() && self.suspect())
    }

    /// Whether a link nothing has measured may be slow: this connection's socket, or
    /// lately a sibling's, held written bytes back.
    fn suspect(&self) -> bool {
        self.held_early || self.sibling_held
    }

    /// The level the link's known capacity allows, CPU aside.
    fn link_level(&self) -> i32 {
        match self.capacity {
            Some(rate) if rate < self.zstd_rate * DEEPER_SHARE => DEEPER_LEVEL,
            Some(rate) if rate < self.zstd_rate * DEEP_SHARE => DEEP_LEVEL,
            Some(rate) if rate < self.zstd_rate * STRONG_SHARE => STRONG_LEVEL,
            _ => FAST_LEVEL,
        }
    }

    /// Adds time the uplink spent waiting for the link (send queue full, window shut).
    pub(crate) fn waited(&mut self, d: Duration) {
        self.waited += d;
    }

    /// Says whether the source paces itself by the peer's replies (a request/reply
    /// protocol such as NBD), which makes the link's speed part of its pace even when
    /// nothing waits for the link.
    pub(crate) fn set_reply_paced(&mut self, reply_paced: bool) {
        self.reply_paced = reply_paced;
    }

    /// Adds time the uplink spent waiting for its source to send more.
    pub(crate) fn source_waited(&mut self, d: Duration) {
        self.source_waited += d;
    }

    /// The rate the peer took bytes in since this connection began, if a standing
    /// queue on the way to it shows the link slower than the writers. (The rate of the
    /// last window alone follows the bursts of acknowledgements: tried, it measured
    /// four concurrent migrations' 100 Mbit/s link as faster than it is and sent more
    /// batches raw, 54-78 MB against 50-58 MB.)
    fn standing_queue(&self, now: Instant, written: u64) -> Option<f64> {
        let delivered = self.history.delivered().written();
        let queued = written.saturating_sub(delivered);
        let (at_first, since) = self.delivered_at_first;
        let arrived = delivered.saturating_sub(at_first);
        let age = now.duration_since(since);
        (age >= QUEUE_MIN_AGE
            && queued >= QUEUE_EVIDENCE
            && queued as f64 >= QUEUE_SHARE * arrived as f64
            && arrived > 0)
            .then(|| arrived as f64 / age.as_secs_f64())
    }

    /// What the tunnel socket's kernel state (`tcp_info`) at the window's end, and its
    /// limited time during the window ([`CompressGovernor::held_back`]), say of the
    /// path beyond this edge: `Full` when TCP holds written bytes back (the link or
    /// the peer takes less than is written), `Clear` when everything written left the
    /// socket at once. `None` without samples, in between, or before the connection is
    /// [`QUEUE_MIN_AGE`] old and has written [`QUEUE_EVIDENCE`] (TCP's slow start
    /// holds bytes back on any link at first).
    fn path_verdict(
        &self,
        now: Instant,
        held_back: Option<(u64, f64)>,
        own_written: u64,
    ) -> Option<PathVerdict> {
        let (unsent, held) = held_back?;
        if now.duration_since(self.delivered_at_first.1) < QUEUE_MIN_AGE
            || own_written < QUEUE_EVIDENCE
        {
            return None;
        }
        if unsent >= PATH_FULL_UNSENT || held >= WAIT_SHARE {
            Some(PathVerdict::Full)
        } else if unsent < PATH_CLEAR_UNSENT && held < PATH_CLEAR_HELD {
            Some(PathVerdict::Clear)
        } else {
            None
        }
    }

    /// What the tunnel socket held back in the window ending now: the bytes unsent at
    /// its end, and the share of it TCP spent held back by the receive window or the
    /// send buffer. `None` without samples.
    fn held_back(&self, elapsed: Duration) -> Option<(u64, f64)> {
        let (p, q) = self.path.zip(self.path_at_start)?;
        let held_us = (p.rwnd_limited_us + p.sndbuf_limited_us)
            .saturating_sub(q.rwnd_limited_us + q.sndbuf_limited_us);
        Some((p.notsent, held_us as f64 / 1e6 / elapsed.as_secs_f64()))
    }

    /// Adds a finished window to the span; at the span's end, what it says. `start`
    /// and `written` are the peer meter's readings at the window's start and end.
    fn close_span(
        &mut self,
        now: Instant,
        (start, written): (u64, u64),
        path_full: bool,
    ) -> Option<SpanVerdict> {
        let span = self.span.get_or_insert(Span {
            start: self.window_start,
            written: start,
            waited: Duration::ZERO,
            source_waited: Duration::ZERO,
            path_full: false,
        });
        span.waited += self.waited;
        span.source_waited += self.source_waited;
        span.path_full |= path_full;
        let elapsed = now.duration_since(span.start);
        if elapsed < SPAN {
            return None;
        }
        let span = self.span.take()?;
        let secs = elapsed.as_secs_f64();
        let rate = written.saturating_sub(span.written) as f64 / secs;
        if span.waited.as_secs_f64() / secs >= WAIT_SHARE {
            return Some(SpanVerdict::LinkBound);
        }
        // The link's pace: the capacity, or what the path delivered when more.
        let pace = self.capacity.map(|c| c.max(self.drained.unwrap_or(0.0)));
        Some(match pace {
            Some(c)
                if span.source_waited.as_secs_f64() / secs < SOURCE_SHARE
                    && !span.path_full
                    && rate < c * STARVED_SHARE =>
            {
                SpanVerdict::Starved {
                    deeply: rate < c * STARVED_DEEPLY,
                }
            }
            _ => SpanVerdict::Neither,
        })
    }

    /// Moves the CPU ceiling after a span: up a notch when it waited for the link,
    /// down after [`STARVED_SPANS`] in a row that starved it.
    fn follow_cpu(&mut self, verdict: SpanVerdict) {
        if let SpanVerdict::Starved { .. } = verdict {
            self.starved_spans += 1;
            if self.starved_spans < STARVED_SPANS {
                return;
            }
        }
        self.starved_spans = 0;
        self.ceiling = match verdict {
            SpanVerdict::LinkBound => notch(self.ceiling, 1),
            SpanVerdict::Starved { deeply: true } => FAST_LEVEL,
            // A notch below the level that starved the link (the ceiling may stand
            // above what the link's pace asks for).
            SpanVerdict::Starved { deeply: false } => {
                notch(self.link_level().min(self.ceiling), -1)
            }
            SpanVerdict::Neither => self.ceiling,
        };
    }

    /// Whether the link limits throughput now; closes a measurement window when due.
    pub(crate) fn link_limited(&mut self, now: Instant, link: &LinkMeter, own: &LinkMeter) -> bool {
        let Some(start) = self.written_at_start else {
            // The first window starts at the first call, from the meter's reading then:
            // counting from 0 would credit this connection with everything earlier
            // connections wrote to the peer (a bogus, huge rate that sent a new
            // migration's first batches raw).
            self.written_at_start = Some(link.written());
            self.path_taken_at_start = self.history.path_taken.written();
            self.peer_at_first = link.written();
            self.delivered_at_first = (self.history.delivered().written(), now);
            self.window_start = now;
            self.waited = Duration::ZERO;
            self.source_waited = Duration::ZERO;
            return self.limited;
        };
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= WINDOW {
            let written = link.written();
            let own_written = own.written();
            let rate = written.saturating_sub(start) as f64 / elapsed.as_secs_f64();
            let waited_share = self.waited.as_secs_f64() / elapsed.as_secs_f64();
            let recalled = self.history.recall(now);
            // What the tunnel socket's kernel state says of the path (module notes).
            let held_back = self.held_back(elapsed);
            let path = match self.path_verdict(now, held_back, own_written) {
                Some(PathVerdict::Full) => {
                    self.history.mark_path_full(now);
                    Some(PathVerdict::Full)
                }
                Some(PathVerdict::Clear) if self.history.path_full_lately(now) => None,
                other => other,
            };
            // Still inside what kernel buffers take, and nothing known of this peer's
            // link from any connection.
            let within_allowance = own_written < BUFFER_ALLOWANCE
                && written.saturating_sub(self.peer_at_first) < PEER_ALLOWANCE
                && recalled.is_none();
            let early = within_allowance && path != Some(PathVerdict::Clear);
            // A clear socket speaks for its own connection only: its verdict tells
            // siblings nothing (four migrations at once over 100 Mbit/s: one
            // connection's clear socket, stored as "nothing limits", ended a
            // sibling's allowance and it sent its batches raw).
            let clear_own = within_allowance && !early;
            // A window in which the uplink waited measures the link, except early on
            // at a rate that would keep compression going: then the wait is as likely
            // the CPU, shared by every connection starting at once (four concurrent
            // migrations at 100 Mbit/s "measured" 62-64 MB/s while buffers filled; a
            // sibling took that for a link too fast to compress for and sent 18
            // batches raw). Such a window decides nothing and tells siblings nothing.
            let known_capacity = self.capacity.or(recalled.map(|r| r.1).filter(|&c| c > 0.0));
            // Nothing has measured the link yet, nothing waited, and the buffers are
            // full: what queues on the way to the peer measures it instead, where the
            // tunnel socket cannot say what the path takes (no `TCP_INFO`). Where it
            // can, the socket's verdict decides: the peer's ACKs stand behind its CPU,
            // its local socket and, for connections sharing content (multifd's
            // channels, concurrent migrations), references waiting for a sibling's
            // chunk. Four multifd channels at 1 Gbit/s, the receiving edge resolving
            // 547 references late, "measured" a 29 MB/s link that way, and every later
            // guest compressed every batch with every transform (2.32-2.67 s against
            // 1.78-2.12 s without this evidence, docs/BENCHMARKS.md §4 "The peer's
            // ACKs are not the link").
            let queued_rate = (!early
                && known_capacity.is_none()
                && waited_share < WAIT_SHARE
                && self.path.is_none())
            .then(|| self.standing_queue(now, written))
            .flatten();
            // A full path's pace is what the socket delivered, not what was written
            // into it: after a pause of the source, a burst refills an empty socket
            // buffer at many times the link's rate, and taken for the capacity it
            // sent a 100 Mbit/s link's batches raw.
            // The capacity is the link's, shared by every connection to the peer: what
            // all their sockets delivered in the window (one channel's own delivery,
            // taken for the link, kept multifd's channels compressing; scaled by the
            // channel's share of the writes, it overstated the link for connections
            // that wrote little and sent their batches raw).
            let path_taken = self.history.path_taken.written();
            let path_rate = match path {
                Some(PathVerdict::Full) if waited_share < WAIT_SHARE => Some(
                    path_taken.saturating_sub(self.path_taken_at_start) as f64
                        / elapsed.as_secs_f64(),
                ),
                _ => None,
            };
            let delivered = queued_rate.or(path_rate).unwrap_or(rate);
            let rate = queued_rate
                .or(path_rate.map(|r| r.min(rate)))
                .unwrap_or(rate);
            // A path the kernel holds bytes back from is saturated whatever this CPU
            // does, so unlike a wait it counts even early on.
            let saturated = queued_rate.is_some()
                || path == Some(PathVerdict::Full)
                || (waited_share >= WAIT_SHARE && !(early && rate < self.zstd_rate * MARGIN));
            if saturated {
                // A drop counts half at a time: one window that waited on a busy CPU
                // at a low rate would otherwise set the deep level at 1 Gbit/s, whose
                // CPU cost then keeps the uplink from ever waiting again (5.99 s
                // against 3.1-3.8 s). A real slowdown gets there in a few windows.
                self.capacity = Some(follow_half_down(self.capacity, rate));
                self.drained = Some(follow_half_down(self.drained, delivered));
                self.capacity_by_wait = queued_rate.is_none();
                self.excess = 0.0;
            } else if let Some(c) = self.capacity {
                // More left than the capacity we believed. Kernel buffers swallow a few
                // megabytes at any speed (at the start of every connection), so only a
                // sustained excess says the capacity is stale: twice the capacity for
                // STALE_WINDOWS, or more bytes beyond it, without a wait, than the
                // buffers of every connection to the peer can hold. (One window at 1
                // Gbit/s that waited while the CPU was busy "measured" 17 MB/s; the
                // deep level it chose then kept the uplinks CPU-bound at ~30 MB/s,
                // never waiting again, for the rest of a cluster migration: 5.7 s
                // against 3.2 s.)
                self.faster_windows = if rate > 2.0 * c {
                    self.faster_windows + 1
                } else {
                    0
                };
                self.excess = if rate > c {
                    self.excess + (rate - c) * elapsed.as_secs_f64()
                } else {
                    0.0
                };
                if self.faster_windows >= STALE_WINDOWS || self.excess > PEER_ALLOWANCE as f64 {
                    self.capacity = None;
                    self.drained = None;
                    self.faster_windows = 0;
                    self.excess = 0.0;
                }
            }
            // Early, with no trusted wait: no evidence either way, keep compressing
            // and tell siblings nothing. Once any connection has measured the link,
            // its finding decides (256 short connections on a LAN would otherwise
            // compress all their bytes: edge/relay ~0.45 against ~0.65).
            let buffering = !saturated && self.limited && early;
            // Whether the CPU keeps up, judged once kernel buffers no longer hide the
            // link.
            let span = if early {
                self.span = None;
                None
            } else {
                self.close_span(now, (start, written), path == Some(PathVerdict::Full))
            };
            if let Some(verdict) = span {
                self.follow_cpu(verdict);
            }
            self.limited = if saturated {
                rate < self.zstd_rate * MARGIN
            } else if buffering {
                true
            } else {
                // The uplink did not wait this window (the source paused, the CPU is
                // busy, or buffers are still filling). A link known (here or by a
                // sibling connection) to be far slower than compression is still the
                // bottleneck: raw bytes would only pile up in front of it, and
                // compressing costs a small share of the CPU. Otherwise go raw. What
                // one window drained says nothing here: after a pause of the source,
                // a burst into kernel buffers "drained" 79 MB/s on a 100 Mbit/s link
                // and sent the next batches raw (60 raw batches, +9 MB on four guests);
                // a link that really got faster makes the capacity stale above.
                // A link a wait measured is "far slower" against the codec's speed in
                // CPU time: on a busy host the wall-clock speed sank to 121 MB/s in one
                // window of a later guest at 100 Mbit/s and sent its batches raw,
                // without deltas (+4 MB on that guest; with one core taken by other
                // work, 4 runs of 10 carried 50-53 MB against 46 MB). A pace only the
                // queue at the peer measured may be the peer's CPU, not the link: then
                // the wall-clock speed, what compressing costs here now, decides (four
                // migrations at once at 1 Gbit/s, all on two cores, measured 17 MB/s
                // that way; compressing through it cost 0.3 s).
                let known = match self.capacity {
                    Some(c) => Some((c, self.capacity_by_wait)),
                    None => recalled.filter(|r| r.1 > 0.0).map(|r| (r.1, r.2)),
                };
                // A request/reply source that waits for the peer at a pace far below
                // compression's: its requests cross faster compressed
                // ([`REPLY_PACED_SOURCE`]); compressing costs a small share of a core.
                let awaits_replies = self.reply_paced
                    && self.source_waited.as_secs_f64() / elapsed.as_secs_f64()
                        >= REPLY_PACED_SOURCE
                    && rate < self.zstd_cpu_rate * STRONG_SHARE;
                // Nothing has measured the link, and the socket holds written bytes
                // back: too young for a verdict (TCP's slow start may be all it is),
                // but no sign either that raw bytes would keep up. The decision
                // stands. (Four migrations at once over 100 Mbit/s: a connection
                // 206 ms old, 2.4 MB unsent and held back the whole window, recalled
                // a sibling's decision made without a capacity and sent its batches
                // raw until its own verdict: 0-9 raw batches a run.)
                let holding = held_back
                    .is_some_and(|(unsent, held)| unsent >= PATH_FULL_UNSENT || held >= WAIT_SHARE);
                awaits_replies
                    || (known.is_none() && holding && self.limited)
                    || known.is_some_and(|(c, by_wait)| {
                        let codec = if by_wait {
                            self.zstd_cpu_rate
                        } else {
                            self.zstd_rate
                        };
                        c < codec * STRONG_SHARE
                    })
            };
            tracing::trace!(
                rate_mbs = rate / 1e6,
                waited_share,
                source_mills = (self.source_waited.as_secs_f64() * 1e3) as u64,
                zstd_mbs = self.zstd_rate / 1e6,
                zstd_cpu_mbs = self.zstd_cpu_rate / 1e6,
                queued_mib = written.saturating_sub(self.history.delivered().written()) >> 20,
                arrived_kib = self.history.delivered().written().saturating_sub(self.delivered_at_first.0) >> 10,
                age_ms = now.duration_since(self.delivered_at_first.1).as_millis() as u64,
                queue_evidence = queued_rate.is_some(),
                saturated,
                buffering,
                span = ?span,
                ceiling = self.ceiling,
                capacity_mbs = self.capacity.map(|c| c / 1e6),
                recalled_mbs = recalled.map(|r| r.1 / 1e6),
                own_mib = own_written >> 20,
                path = ?path,
                notsent_kib = self.path.map(|p| p.notsent >> 10),
                delivery_mbs = self.path.map(|p| p.delivery_rate as f64 / 1e6),
                app_limited = self.path.map(|p| p.app_limited),
                rwnd_ms = self.path.zip(self.path_at_start).map(|(p, q)| p.rwnd_limited_us.saturating_sub(q.rwnd_limited_us) / 1000),
                sndbuf_ms = self.path.zip(self.path_at_start).map(|(p, q)| p.sndbuf_limited_us.saturating_sub(q.sndbuf_limited_us) / 1000),
                acked_kib = self.path.zip(self.path_at_start).map(|(p, q)| p.bytes_acked.saturating_sub(q.bytes_acked) >> 10),
                limited = self.limited,
                "governor window"
            );
            if !buffering && !clear_own {
                self.history.store(
                    self.limited,
                    (self.capacity.unwrap_or(0.0), self.capacity_by_wait),
                    now,
                );
            }
            self.window_start = now;
            self.written_at_start = Some(written);
            self.waited = Duration::ZERO;
            self.source_waited = Duration::ZERO;
            self.path_at_start = self.path;
            self.path_taken_at_start = path_taken;
        }
        self.limited
    }

    /// Records a compression of `raw` bytes at `level` that took `elapsed` (wall
    /// clock) and `cpu` (the compressing thread's CPU time). The rates tracked are the
    /// fast level's; samples at stronger levels are scaled to it by their measured
    /// cost (level 3 ~1.7x, level 6 ~4.2x, level 8 ~7.5x: scaled by less than that
    /// where it errs towards stronger levels).
    pub(crate) fn record(&mut self, raw: usize, level: i32, elapsed: Duration, cpu: Duration) {
        let scale = if level <= FAST_LEVEL {
            1.0
        } else if level <= STRONG_LEVEL {
            3.0
        } else if level <= DEEP_LEVEL {
            4.0
        } else {
            7.0
        };
        let sample =
            |took: Duration| (took >= MIN_SAMPLE).then(|| raw as f64 / took.as_secs_f64() * scale);
        if let Some(s) = sample(elapsed) {
            self.zstd_rate += ALPHA * (s - self.zstd_rate);
        }
        if let Some(s) = sample(cpu) {
            self.zstd_cpu_rate += ALPHA * (s - self.zstd_cpu_rate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 100 ms window of a connection alone on its link.
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
        g.link_limited(*t, link, link)
    }

    /// A 100 ms window in which this connection wrote `own_bytes`, all connections to
    /// the peer `link_bytes` (this connection's included), and this one waited
    /// `waited_ms`.
    fn shared_window(
        g: &mut CompressGovernor,
        t: &mut Instant,
        (link, own): (&LinkMeter, &LinkMeter),
        (own_bytes, link_bytes): (usize, usize),
        waited_ms: u64,
    ) -> bool {
        own.record(own_bytes);
        link.record(link_bytes);
        g.waited(Duration::from_millis(waited_ms));
        *t += Duration::from_millis(100);
        g.link_limited(*t, link, own)
    }

    #[test]
    fn slow_link_compresses_fast_link_does_not() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        let history = std::sync::Arc::new(LinkHistory::default());
        let mut g = CompressGovernor::new(t, history.clone());
        assert!(g.link_limited(t, &link, &link), "no evidence yet: compress");
        // 100 Mbit/s (1.25 MB per 100 ms) with the uplink waiting most of the time.
        assert!(window(&mut g, &mut t, &link, 1_250_000, 80));
        // A fast link: 200 MB per 100 ms, the uplink hardly waits.
        assert!(!window(&mut g, &mut t, &link, 200_000_000, 5));
        // A peer that is slow but faster than zstd: no point compressing.
        assert!(!window(&mut g, &mut t, &link, 60_000_000, 90));
        // A new connection to the same peer starts from the last decision.
        assert!(!CompressGovernor::new(t, history.clone()).link_limited(t, &link, &link));
        // The link turns slow: the capacity follows within a few windows.
        for _ in 0..8 {
            assert!(window(&mut g, &mut t, &link, 1_250_000, 80));
        }
        // A new connection knows the link is slow, and compresses, but at the fast
        // level: the stronger ones it earns by waiting for the link (module notes).
        let mut next = CompressGovernor::new(t, history.clone());
        assert_eq!(next.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        assert!(next.link_is_slow());
        // ... and nothing after the history has aged: then it knows nothing (and compresses).
        let later = t + HISTORY_TTL + Duration::from_secs(1);
        assert!(history.recall(later).is_none());
    }

    #[test]
    fn every_batch_is_tried_while_the_link_is_unknown_or_slow() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        let history = std::sync::Arc::new(LinkHistory::default());
        let mut g = CompressGovernor::new(t, history.clone());
        assert!(g.worth_every_try(), "nothing known yet");
        // A slow link: every batch.
        assert!(window(&mut g, &mut t, &link, 1_250_000, 80));
        assert!(g.worth_every_try());
        // A peer slower than the writer but faster than zstd (a capacity measured by
        // waits, not far below compression): the back-off applies again.
        assert!(!window(&mut g, &mut t, &link, 200_000_000, 5));
        assert!(!window(&mut g, &mut t, &link, 60_000_000, 90));
        assert!(!g.worth_every_try());
        for _ in 0..8 {
            window(&mut g, &mut t, &link, 1_250_000, 80);
        }
        assert!(g.worth_every_try());
        // The next connection starts from that knowledge.
        assert!(CompressGovernor::new(t, history.clone()).worth_every_try());
    }

    #[test]
    fn kernel_buffers_do_not_erase_a_known_slow_link() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        // Past the buffer allowance (earlier windows).
        link.record(BUFFER_ALLOWANCE as usize);
        let mut g = CompressGovernor::new(t, Default::default());
        g.link_limited(t, &link, &link); // starts the first window
        assert!(
            window(&mut g, &mut t, &link, 1_250_000, 80),
            "100 Mbit/s, waiting"
        );
        // A new burst fills socket buffers fast, without waiting: still limited.
        for _ in 0..3 {
            assert!(window(&mut g, &mut t, &link, 8_000_000, 0));
        }
        // Sustained fast draining: the link got faster, the capacity is stale.
        for _ in 0..STALE_WINDOWS {
            window(&mut g, &mut t, &link, 40_000_000, 0);
        }
        assert!(!window(&mut g, &mut t, &link, 40_000_000, 0));
    }

    #[test]
    fn level_follows_the_link_rate() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        let mut g = CompressGovernor::new(t, Default::default());
        // Starts the first window.
        g.link_limited(t, &link, &link);
        // `bytes` per 100 ms with the uplink waiting; the level afterwards.
        let mut waiting = |g: &mut CompressGovernor, bytes: usize| {
            g.waited(Duration::from_millis(80));
            link.record(bytes);
            t += Duration::from_millis(100);
            g.encoding(t, &link, &link)
        };
        // 1 Gbit/s (12.5 MB per 100 ms): fast level (zstd ~350 MB/s).
        assert_eq!(waiting(&mut g, 12_500_000), Encoding::Zstd(FAST_LEVEL));
        // 300 Mbit/s: the strong level, once the drop is confirmed.
        assert_eq!(waiting(&mut g, 3_750_000), Encoding::Zstd(FAST_LEVEL));
        assert_eq!(waiting(&mut g, 3_750_000), Encoding::Zstd(STRONG_LEVEL));
        // 100 Mbit/s: the deep level within a few windows.
        let windows = (1..=8)
            .find(|_| waiting(&mut g, 1_250_000) == Encoding::Zstd(DEEP_LEVEL))
            .expect("deep level");
        assert!(
            windows >= 2,
            "one window at 100 Mbit/s decided the deep level"
        );
    }

    #[test]
    fn a_link_slower_still_takes_the_deeper_level_while_the_cpu_keeps_up() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        link.record(BUFFER_ALLOWANCE as usize);
        let mut g = CompressGovernor::new(t, Default::default());
        g.link_limited(t, &link, &link);
        // 50 Mbit/s, waiting: the link allows the deeper level, but the ceiling starts
        // at the fast one and rises a notch per span that waited for the link.
        assert_eq!(g.ceiling, FAST_LEVEL);
        assert!(window(&mut g, &mut t, &link, 625_000, 80));
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(STRONG_LEVEL));
        assert!(window(&mut g, &mut t, &link, 625_000, 80));
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(DEEP_LEVEL));
        assert!(window(&mut g, &mut t, &link, 625_000, 80));
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(DEEPER_LEVEL));
        // The CPU starves the link for two spans: a notch down, to the deep level.
        for _ in 0..2 {
            window(&mut g, &mut t, &link, 450_000, 0);
        }
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(DEEP_LEVEL));
    }

    #[test]
    fn a_cpu_bound_sender_draining_its_socket_still_counts_as_starving_the_link() {
        // A first guest over 50 Mbit/s (625 kB per 100 ms): waiting spans take the
        // ceiling to the deeper level.
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let link = LinkMeter::default();
        link.record(PEER_ALLOWANCE as usize);
        let mut g = CompressGovernor::new(t, history.clone());
        g.link_limited(t, &link, &link);
        g.observe_path(Some(tcp_info::PathSample::default()));
        for _ in 0..3 {
            window(&mut g, &mut t, &link, 625_000, 80);
        }
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(DEEPER_LEVEL));
        // Then the level is more than the CPU keeps up with: the sender writes 300 kB
        // per 100 ms while its socket's backlog (megabytes) drains at the link's pace.
        // The capacity reads the smaller figure and sinks towards the CPU's pace...
        unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (300_000, 625_000),
            Some((625_000, 100, 2 << 20)),
            4,
        );
        let capacity = g.capacity.expect("a capacity");
        assert!(capacity < 4.5e6, "{capacity}");
        // ...but once the backlog is gone and the sender writes 400 kB per 100 ms
        // (64% of the link), the spans count as starved against what the path
        // delivered: the ceiling comes down a notch.
        unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (400_000, 400_000),
            Some((400_000, 0, 0)),
            3,
        );
        assert_eq!(g.ceiling, DEEP_LEVEL);
    }

    /// A 100 ms window past the allowances in which `bytes` left, the uplink never
    /// waited for the link, and waited `source_ms` for its source.
    fn paced_window(
        g: &mut CompressGovernor,
        t: &mut Instant,
        link: &LinkMeter,
        bytes: usize,
        source_ms: u64,
    ) -> bool {
        g.source_waited(Duration::from_millis(source_ms));
        window(g, t, link, bytes, 0)
    }

    #[test]
    fn a_request_reply_source_waiting_for_replies_compresses_without_a_wait_for_the_link() {
        let start = |reply_paced| {
            let t = Instant::now();
            let link = LinkMeter::default();
            link.record(PEER_ALLOWANCE as usize);
            let mut g = CompressGovernor::new(t, Default::default());
            g.set_reply_paced(reply_paced);
            g.link_limited(t, &link, &link);
            (g, t, link)
        };
        // An NBD mirror over 300 Mbit/s: 3 MB per 100 ms (30 MB/s), QEMU waiting for
        // replies half of each window, nothing waiting for the link: compress.
        let (mut g, mut t, link) = start(true);
        for _ in 0..4 {
            assert!(paced_window(&mut g, &mut t, &link, 3_000_000, 50));
        }
        // The same stream draining at 200 MB/s (a fast LAN): compression would only
        // add its own time to every request's.
        assert!(!paced_window(&mut g, &mut t, &link, 20_000_000, 50));
        // A source that rarely waits: the CPU, not the replies, sets the pace.
        assert!(!paced_window(&mut g, &mut t, &link, 3_000_000, 5));
        assert!(paced_window(&mut g, &mut t, &link, 3_000_000, 50));
        // A stream that does not wait for replies (a migration's source that pauses):
        // its pace does not depend on the link's, and it goes raw.
        let (mut g, mut t, link) = start(false);
        for _ in 0..4 {
            assert!(!paced_window(&mut g, &mut t, &link, 3_000_000, 50));
        }
    }

    #[test]
    fn notches_move_along_the_ladder_and_stop_at_its_ends() {
        assert_eq!(notch(FAST_LEVEL, 1), STRONG_LEVEL);
        assert_eq!(notch(DEEP_LEVEL, 1), DEEPER_LEVEL);
        assert_eq!(notch(DEEPER_LEVEL, 1), DEEPER_LEVEL);
        assert_eq!(notch(DEEPER_LEVEL, -1), DEEP_LEVEL);
        assert_eq!(notch(STRONG_LEVEL, -1), FAST_LEVEL);
        assert_eq!(notch(FAST_LEVEL, -1), FAST_LEVEL);
        // A level between rungs counts as the rung below it.
        assert_eq!(notch(7, -1), STRONG_LEVEL);
    }

    #[test]
    fn one_slow_window_on_a_fast_link_does_not_set_the_deep_level() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        link.record(BUFFER_ALLOWANCE as usize);
        let mut g = CompressGovernor::new(t, Default::default());
        g.link_limited(t, &link, &link);
        // 1 Gbit/s, waiting for the link.
        assert!(window(&mut g, &mut t, &link, 10_400_000, 40));
        // One window that waited on a busy CPU while 1.7 MB left ("17 MB/s").
        assert!(window(&mut g, &mut t, &link, 1_700_000, 30));
        assert_ne!(g.link_level(), DEEP_LEVEL);
    }

    #[test]
    fn bytes_of_earlier_connections_do_not_make_the_link_look_fast() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        // Earlier migrations to this peer wrote 100 MB through the shared meter.
        link.record(100_000_000);
        let mut g = CompressGovernor::new(t, Default::default());
        assert!(g.link_limited(t, &link, &link), "no evidence yet: compress");
        // 100 Mbit/s, waiting: the first window measures 12.5 MB/s, not 1 GB/s.
        assert!(window(&mut g, &mut t, &link, 1_250_000, 80));
        assert_eq!(g.link_level(), DEEP_LEVEL);
    }

    #[test]
    fn filling_kernel_buffers_does_not_make_a_new_connection_send_raw() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        let mut g = CompressGovernor::new(t, Default::default());
        assert!(g.link_limited(t, &link, &link), "no evidence yet: compress");
        // The first megabytes leave fast, into socket buffers: no wait, no verdict.
        for _ in 0..3 {
            assert!(window(&mut g, &mut t, &link, 2_000_000, 0));
        }
        // Past what buffers hold, a link that never makes the uplink wait is fast.
        assert!(!window(&mut g, &mut t, &link, 40_000_000, 0));
    }

    #[test]
    fn many_connections_at_once_end_the_buffer_allowance() {
        let mut t = Instant::now();
        let (link, own) = (LinkMeter::default(), LinkMeter::default());
        let mut g = CompressGovernor::new(t, Default::default());
        assert!(g.link_limited(t, &link, &own));
        // This connection wrote little, but all of them together 40 MB without a
        // wait: a fast link, not buffers filling.
        assert!(!shared_window(
            &mut g,
            &mut t,
            (&link, &own),
            (500_000, 40_000_000),
            0
        ));
    }

    #[test]
    fn a_sibling_that_found_the_link_fast_ends_the_buffer_allowance() {
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let (link, own) = (LinkMeter::default(), LinkMeter::default());
        let mut g = CompressGovernor::new(t, history.clone());
        assert!(g.link_limited(t, &link, &own));
        // This connection's first megabyte leaves without a wait: no evidence.
        assert!(
            shared_window(&mut g, &mut t, (&link, &own), (1_000_000, 1_000_000), 0),
            "no evidence yet"
        );
        // Windows inside the allowance tell the siblings nothing.
        assert!(history.recall(t).is_none());
        // A sibling waited for a link draining 400 MB/s: faster than zstd.
        let mut sibling = CompressGovernor::new(t, history.clone());
        sibling.link_limited(t, &link, &link);
        assert!(!window(&mut sibling, &mut t, &link, 40_000_000, 90));
        // Still inside the allowance, this connection now sends raw.
        assert!(!shared_window(
            &mut g,
            &mut t,
            (&link, &own),
            (1_000_000, 1_000_000),
            0
        ));
    }

    #[test]
    fn an_early_wait_at_a_middling_rate_is_not_taken_for_the_link() {
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let (link, own) = (LinkMeter::default(), LinkMeter::default());
        let mut g = CompressGovernor::new(t, history.clone());
        assert!(g.link_limited(t, &link, &own));
        // Four connections starting at once on a busy CPU: this one waited most of
        // the window while all of them wrote 6.3 MB (63 MB/s) into fresh buffers.
        assert!(
            shared_window(&mut g, &mut t, (&link, &own), (1_500_000, 6_300_000), 80),
            "keeps compressing"
        );
        assert_eq!(g.capacity, None, "no capacity from an early wait");
        assert!(history.recall(t).is_none(), "siblings are told nothing");
        // A sibling starting now is not sent raw by a capacity nobody measured.
        let mut sibling = CompressGovernor::new(t, history.clone());
        let sibling_own = LinkMeter::default();
        assert!(sibling.link_limited(t, &link, &sibling_own));
        assert!(shared_window(
            &mut sibling,
            &mut t,
            (&link, &sibling_own),
            (1_000_000, 3_000_000),
            0
        ));
        // An early wait at a rate faster than compression still decides: raw.
        let mut fast = CompressGovernor::new(t, Default::default());
        let fast_own = LinkMeter::default();
        assert!(fast.link_limited(t, &link, &fast_own));
        assert!(!shared_window(
            &mut fast,
            &mut t,
            (&link, &fast_own),
            (2_000_000, 40_000_000),
            80
        ));
    }

    #[test]
    fn a_capacity_the_link_keeps_exceeding_without_a_wait_is_dropped() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        link.record(BUFFER_ALLOWANCE as usize);
        let history = std::sync::Arc::new(LinkHistory::default());
        let mut g = CompressGovernor::new(t, history.clone());
        g.link_limited(t, &link, &link); // starts the first window
                                         // One window that waited while 1.7 MB left: "17 MB/s", the deep level.
        assert!(window(&mut g, &mut t, &link, 1_700_000, 30));
        assert_eq!(g.link_level(), DEEP_LEVEL);
        // Then 30 MB/s without a wait, window after window (less than twice the
        // capacity): what buffers can hide runs out, and the capacity with it.
        let mut windows = 0;
        while g.capacity.is_some() {
            window(&mut g, &mut t, &link, 3_000_000, 1);
            windows += 1;
            assert!(windows < 40, "the capacity never went stale");
        }
        assert!(
            windows > 8,
            "{windows} windows: buffers could have hidden that"
        );
        assert_ne!(g.link_level(), DEEP_LEVEL);
    }

    /// A governor past the buffer allowance that measured a 100 Mbit/s link (the deep
    /// level), and the meter it reads.
    fn on_a_measured_slow_link(
        t: &mut Instant,
        history: std::sync::Arc<LinkHistory>,
    ) -> (CompressGovernor, LinkMeter) {
        let link = LinkMeter::default();
        link.record(BUFFER_ALLOWANCE as usize);
        let mut g = CompressGovernor::new(*t, history);
        g.link_limited(*t, &link, &link);
        for _ in 0..4 {
            assert!(window(&mut g, t, &link, 1_250_000, 80));
        }
        assert_eq!(g.encoding(*t, &link, &link), Encoding::Zstd(DEEP_LEVEL));
        (g, link)
    }

    #[test]
    fn an_unmeasured_link_gets_the_strong_level_once_the_socket_holds_bytes_back() {
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let link = LinkMeter::default();
        link.record(BUFFER_ALLOWANCE as usize);
        // The first connection to a peer: nothing measured, nothing recalled. While
        // the socket takes everything written, nothing says the link is slow: the fast
        // level, every batch tried, no transforms.
        let mut g = CompressGovernor::new(t, history.clone());
        let unsent = |notsent| {
            Some(tcp_info::PathSample {
                notsent,
                ..Default::default()
            })
        };
        g.observe_path(unsent(PATH_FULL_UNSENT - 1));
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        assert!(g.worth_every_try());
        assert!(!g.worth_transforms());
        // Without samples (not a TCP socket) likewise.
        g.observe_path(None);
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        // The socket holds bytes back (a slow link, or TCP's slow start): the strong
        // level and every transform, and a socket that empties again does not undo it.
        g.observe_path(unsent(PATH_FULL_UNSENT));
        g.observe_path(unsent(0));
        assert_eq!(
            g.encoding(t, &link, &link),
            Encoding::Zstd(UNMEASURED_LEVEL)
        );
        assert!(g.worth_transforms());
        // Waits measure the link: from then on its level, under the CPU ceiling,
        // which climbs from the fast level.
        assert!(window(&mut g, &mut t, &link, 1_250_000, 40));
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(STRONG_LEVEL));
        assert!(window(&mut g, &mut t, &link, 1_250_000, 40));
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(DEEP_LEVEL));
        assert!(g.worth_transforms(), "a slow link");
        // The next connection recalls the link: it starts at the fast level, as a
        // later guest, CPU-bound from its first batch, should.
        let mut next = CompressGovernor::new(t, history);
        assert_eq!(next.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        assert!(next.worth_transforms(), "the recalled link is slow");
    }

    #[test]
    fn a_siblings_socket_holding_bytes_back_makes_an_unmeasured_link_suspect() {
        let t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let link = LinkMeter::default();
        // Two connections starting together (migrations at once, multifd's channels).
        let mut sibling = CompressGovernor::new(t, history.clone());
        let mut g = CompressGovernor::new(t, history.clone());
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        sibling.observe_path(Some(tcp_info::PathSample {
            notsent: PATH_FULL_UNSENT,
            ..Default::default()
        }));
        sibling.encoding(t, &link, &link);
        // Its own socket says nothing yet; the sibling's held bytes back.
        g.observe_path(Some(tcp_info::PathSample::default()));
        assert_eq!(
            g.encoding(t, &link, &link),
            Encoding::Zstd(UNMEASURED_LEVEL)
        );
        assert!(g.worth_transforms());
        // Evidence that old no longer counts.
        let later = t + PATH_FULL_MEMORY + Duration::from_millis(1);
        let mut next = CompressGovernor::new(later, history);
        assert_eq!(
            next.encoding(later, &link, &link),
            Encoding::Zstd(FAST_LEVEL)
        );
        assert!(!next.worth_transforms());
    }

    #[test]
    fn a_fast_link_measured_ends_the_unmeasured_transforms() {
        let mut t = Instant::now();
        let link = LinkMeter::default();
        // Past what kernel buffers take.
        link.record(BUFFER_ALLOWANCE as usize);
        let mut g = CompressGovernor::new(t, std::sync::Arc::new(LinkHistory::default()));
        g.link_limited(t, &link, &link);
        g.observe_path(Some(tcp_info::PathSample {
            notsent: PATH_FULL_UNSENT,
            ..Default::default()
        }));
        assert!(g.worth_transforms());
        // Waits measure a link of 150 MB/s, within reach of the fast level.
        window(&mut g, &mut t, &link, 15_000_000, 90);
        assert!(g.capacity.is_some());
        assert!(!g.link_is_slow());
        assert!(!g.worth_transforms());
    }

    #[test]
    fn a_link_starved_by_the_cpu_lowers_the_level_and_waiting_raises_it() {
        let mut t = Instant::now();
        let (mut g, link) = on_a_measured_slow_link(&mut t, Default::default());
        // Nothing waits, 0.9 MB per 100 ms (72% of the link): one starved span is not
        // enough (kernel buffers may have kept the link busy)...
        window(&mut g, &mut t, &link, 900_000, 0);
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(DEEP_LEVEL));
        // ... a second one in a row steps down a notch, two more to the fast level.
        window(&mut g, &mut t, &link, 900_000, 0);
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(STRONG_LEVEL));
        for _ in 0..2 {
            window(&mut g, &mut t, &link, 900_000, 0);
        }
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        assert!(g.link_is_slow(), "the link itself is still slow");
        // The link makes the uplink wait again: back up a notch per span.
        assert!(window(&mut g, &mut t, &link, 1_250_000, 80));
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(STRONG_LEVEL));
        assert!(window(&mut g, &mut t, &link, 1_250_000, 80));
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(DEEP_LEVEL));
    }

    #[test]
    fn a_link_drained_at_half_its_pace_goes_straight_to_the_fast_level() {
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let (mut g, link) = on_a_measured_slow_link(&mut t, history.clone());
        for _ in 0..4 {
            window(&mut g, &mut t, &link, 500_000, 0);
        }
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        // The next connection to the peer starts at the fast level too (every one
        // does), still compressing: the link is known to be slow.
        let mut next = CompressGovernor::new(t, history);
        assert_eq!(next.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        assert!(next.link_is_slow());
    }

    #[test]
    fn a_source_that_pauses_does_not_lower_the_level() {
        let mut t = Instant::now();
        let (mut g, link) = on_a_measured_slow_link(&mut t, Default::default());
        // Little drains, but the uplink spent half of each window waiting for its
        // source: the source sets the pace, a weaker level would only cost bytes.
        for _ in 0..8 {
            g.source_waited(Duration::from_millis(50));
            window(&mut g, &mut t, &link, 300_000, 0);
        }
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(DEEP_LEVEL));
    }

    #[test]
    fn a_burst_into_kernel_buffers_does_not_send_a_slow_link_raw() {
        let mut t = Instant::now();
        let (mut g, link) = on_a_measured_slow_link(&mut t, Default::default());
        // zstd measured at ~105 MB/s on a busy CPU; after a pause of the source, 10
        // MB leave in one window (100 MB/s, more than 0.8 x zstd): buffers, not the
        // link.
        for _ in 0..300 {
            let took = Duration::from_millis(10);
            g.record(1 << 20, FAST_LEVEL, took, took);
        }
        assert!(window(&mut g, &mut t, &link, 10_000_000, 0));
        assert_ne!(g.encoding(t, &link, &link), Encoding::Raw);
    }

    #[test]
    fn a_busy_cpu_does_not_send_a_slow_link_raw() {
        let mut t = Instant::now();
        let (mut g, link) = on_a_measured_slow_link(&mut t, Default::default());
        // Other work holds the cores: compressing 1 MiB takes 25 ms (42 MB/s) of which
        // 2.5 ms (420 MB/s) on the CPU. The link (12.5 MB/s) is still far slower than
        // the codec: a window that did not wait keeps compressing.
        let busy = |g: &mut CompressGovernor| {
            for _ in 0..300 {
                let (wall, cpu) = (Duration::from_micros(25_000), Duration::from_micros(2_500));
                g.record(1 << 20, FAST_LEVEL, wall, cpu);
            }
        };
        busy(&mut g);
        assert!(window(&mut g, &mut t, &link, 1_000_000, 0));
        assert_ne!(g.encoding(t, &link, &link), Encoding::Raw);
        // A 1 Gbit/s link is not far slower than the codec: a window without a wait
        // goes raw however busy the CPU.
        let link = LinkMeter::default();
        link.record(BUFFER_ALLOWANCE as usize);
        let mut g = CompressGovernor::new(t, Default::default());
        g.link_limited(t, &link, &link);
        assert!(
            window(&mut g, &mut t, &link, 12_500_000, 80),
            "waits at 125 MB/s"
        );
        busy(&mut g);
        assert!(!window(&mut g, &mut t, &link, 10_000_000, 0));
    }

    /// 100 ms windows in which the writers wrote `written` bytes (none waited) and the
    /// peer acknowledged `delivered`; with `path`, the tunnel socket's kernel state
    /// moved by `acked` bytes taken by the path, `held_ms` held back by the windows,
    /// ending with `notsent` unsent. The decision after each.
    fn unwaited_windows(
        g: &mut CompressGovernor,
        t: &mut Instant,
        (link, history): (&LinkMeter, &LinkHistory),
        (written, delivered): (usize, usize),
        path: Option<(u64, u64, u64)>,
        n: usize,
    ) -> Vec<bool> {
        (0..n)
            .map(|_| {
                if let Some((acked, held_ms, notsent)) = path {
                    let mut p = g.path.unwrap_or_default();
                    p.bytes_acked += acked;
                    p.rwnd_limited_us += held_ms * 1000;
                    p.notsent = notsent;
                    g.observe_path(Some(p));
                }
                link.record(written);
                history.delivered().record(delivered);
                *t += Duration::from_millis(100);
                g.link_limited(*t, link, link)
            })
            .collect()
    }

    #[test]
    fn a_queue_on_the_way_measures_a_link_nothing_waited_for() {
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let link = LinkMeter::default();
        let mut g = CompressGovernor::new(t, history.clone());
        assert!(g.link_limited(t, &link, &link));
        // The CPU is the limit (nothing waits), 20 MB/s leave into buffers, the peer
        // takes in 12.5 MB/s: past the allowances, the queue measures the link.
        let decided = unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (2_000_000, 1_250_000),
            None,
            6,
        );
        assert!(decided.iter().all(|&limited| limited), "{decided:?}");
        let capacity = g.capacity.expect("a capacity from the queue");
        assert!((capacity - 12.5e6).abs() < 1e5, "{capacity}");
        // Compressed, but no stronger than a new connection starts: nothing waited
        // for the link, which is what earns the stronger levels.
        assert_eq!(g.encoding(t, &link, &link), Encoding::Zstd(FAST_LEVEL));
        assert_eq!(g.link_level(), DEEP_LEVEL);
        // Siblings learn it too, and that no wait measured it.
        assert!(history
            .recall(t)
            .is_some_and(|(limited, _, by_wait)| limited && !by_wait));
        // The peer's pace may be its CPU's: with this CPU busy too (compression at
        // 42 MB/s in wall-clock time, 420 MB/s in CPU time), a window without a wait
        // judges the pace against what compressing costs now, and goes raw.
        for _ in 0..300 {
            let (wall, cpu) = (Duration::from_micros(25_000), Duration::from_micros(2_500));
            g.record(1 << 20, FAST_LEVEL, wall, cpu);
        }
        assert_eq!(
            unwaited_windows(
                &mut g,
                &mut t,
                (&link, &history),
                (1_000_000, 1_000_000),
                None,
                1
            ),
            [false]
        );
    }

    #[test]
    fn a_socket_that_can_tell_outranks_the_peers_acks() {
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let link = LinkMeter::default();
        let mut g = CompressGovernor::new(t, history.clone());
        g.observe_path(Some(tcp_info::PathSample::default()));
        assert!(g.link_limited(t, &link, &link));
        // The same queue behind the peer's ACKs as above (20 MB/s written, 12.5 MB/s
        // acknowledged), but the socket, which can say what the path takes, holds
        // back nothing worth a verdict (~150 KiB unsent, held back 10% of the time):
        // the ACKs may stand behind the peer (its CPU, references waiting for a
        // sibling connection's chunk), and measure no link.
        unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (2_000_000, 1_250_000),
            Some((2_000_000, 10, 150 << 10)),
            6,
        );
        assert_eq!(g.capacity, None);
        // The socket holding bytes back is what measures it: at the pace the path took.
        unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (2_000_000, 1_250_000),
            Some((1_250_000, 80, 2 << 20)),
            1,
        );
        let capacity = g.capacity.expect("a capacity from the socket");
        assert!((capacity - 12.5e6).abs() < 1e5, "{capacity}");
    }

    #[test]
    fn a_link_that_keeps_up_queues_nothing_and_goes_raw() {
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let link = LinkMeter::default();
        let mut g = CompressGovernor::new(t, history.clone());
        assert!(g.link_limited(t, &link, &link));
        // 40 MB/s written, all of it acknowledged within the window but a round trip.
        let first = unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (4_000_000, 3_900_000),
            None,
            2,
        );
        assert_eq!(first, [true, true], "inside the allowance: no verdict");
        let after = unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (4_000_000, 4_000_000),
            None,
            2,
        );
        assert_eq!(after, [false, false], "a fast link, no queue: raw");
        assert_eq!(g.capacity, None);
    }

    /// A new connection to a new peer whose first batch has been decided (compress:
    /// nothing known), with its socket's kernel state read once: the clock, the
    /// peer's history, the meter of its writes and the governor.
    fn watching_its_socket() -> (
        Instant,
        std::sync::Arc<LinkHistory>,
        LinkMeter,
        CompressGovernor,
    ) {
        let t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let link = LinkMeter::default();
        let mut g = CompressGovernor::new(t, history.clone());
        g.observe_path(Some(tcp_info::PathSample::default()));
        assert!(g.link_limited(t, &link, &link));
        (t, history, link, g)
    }

    #[test]
    fn a_path_that_takes_everything_written_ends_the_buffer_allowance() {
        // Four multifd channels at 1 Gbit/s on a busy CPU: each writes a few MB per
        // migration, far inside the allowances, never waits, and the peer's
        // acknowledgements lag (its CPU); without the socket's word every batch was
        // compressed and the migration took longer than sending everything raw.
        let (mut t, history, link, mut g) = watching_its_socket();
        let decided = unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (600_000, 200_000),
            Some((600_000, 0, 0)),
            5,
        );
        // Young, or less than a megabyte written: no verdict yet, keep compressing;
        // then the kernel says the path took it all: raw, though the peer's
        // acknowledgements queue (they queue at the peer, not on the link).
        assert_eq!(decided, [true, true, false, false, false], "{decided:?}");
        assert_eq!(g.capacity, None);
        // Its own socket speaks for itself only: a sibling, whose share of a shared
        // link may be the one held back, learns nothing from it.
        assert!(history.recall(t).is_none());
    }

    #[test]
    fn a_path_that_holds_bytes_back_is_saturated_at_the_pace_it_delivers() {
        // 100 Mbit/s: kernel buffers take 2 MB per window, but TCP holds most of it
        // back and the path takes 1.25 MB per 100 ms.
        let (mut t, history, link, mut g) = watching_its_socket();
        let decided = unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (2_000_000, 0),
            Some((1_250_000, 100, 4 << 20)),
            4,
        );
        assert!(decided.iter().all(|&l| l), "{decided:?}");
        let capacity = g.capacity.expect("a capacity from the full path");
        assert!((capacity - 12.5e6).abs() < 1e5, "{capacity}");
        // A burst into an emptied socket buffer after a pause of the source is not
        // the link's pace: 40 MB written in a window that ends full.
        let after = unwaited_windows(
            &mut g,
            &mut t,
            (&link, &history),
            (40_000_000, 0),
            Some((1_250_000, 60, 4 << 20)),
            1,
        );
        assert_eq!(after, [true]);
        assert!(g.capacity.is_some_and(|c| c < 13e6), "{:?}", g.capacity);
        // Sibling connections learn it as a measured capacity.
        assert!(history
            .recall(t)
            .is_some_and(|(limited, c, _)| limited && c < 13e6));
    }

    #[test]
    fn a_full_path_is_measured_over_every_connection_to_the_peer() {
        // Four migrations at once over 100 Mbit/s: one connection, slowed by the CPU,
        // writes a twentieth of the peer's bytes and its socket is full; the link
        // takes 1.25 MB per 100 ms from all of them together. Its own delivery (a
        // backlog draining) scaled by its share of the writes overstated the link
        // (capped by what was written: 20 MB/s here), and sent batches raw.
        let mut t = Instant::now();
        let history = std::sync::Arc::new(LinkHistory::default());
        let (link, own) = (LinkMeter::default(), LinkMeter::default());
        let mut g = CompressGovernor::new(t, history.clone());
        let mut sibling = CompressGovernor::new(t, history.clone());
        let (mut mine, mut theirs) = (
            tcp_info::PathSample::default(),
            tcp_info::PathSample::default(),
        );
        g.observe_path(Some(mine));
        sibling.observe_path(Some(theirs));
        assert!(g.link_limited(t, &link, &own));
        // (A verdict needs 1 MiB written by the connection.)
        for _ in 0..12 {
            // This connection: 100 kB written, 300 kB of its backlog taken; the
            // others: 1.9 MB written, 950 kB taken. Both sockets end full.
            mine.bytes_acked += 300_000;
            mine.rwnd_limited_us += 100_000;
            mine.notsent = 1 << 20;
            theirs.bytes_acked += 950_000;
            g.observe_path(Some(mine));
            sibling.observe_path(Some(theirs));
            own.record(100_000);
            link.record(2_000_000);
            t += Duration::from_millis(100);
            assert!(g.link_limited(t, &link, &own));
        }
        let capacity = g.capacity.expect("measured by the full path");
        assert!((capacity - 12.5e6).abs() < 1e5, "{capacity}");
    }

    #[test]
    fn a_socket_holding_bytes_back_keeps_a_young_connection_compressing() {
        // Four migrations at once over 100 Mbit/s: a sibling stores a decision made
        // without a capacity, which ends this connection's allowance; nothing has
        // measured the link, but its socket holds 2.4 MB back: no reason to go raw.
        for holding in [true, false] {
            let (mut t, history, link, mut g) = watching_its_socket();
            let path = if holding {
                (10_000, 100, 2_400_000)
            } else {
                (300_000, 0, 0)
            };
            let mut windows = |n| {
                unwaited_windows(
                    &mut g,
                    &mut t,
                    (&link, &history),
                    (300_000, 0),
                    Some(path),
                    n,
                )
            };
            assert_eq!(windows(1), [true], "inside the allowance");
            history.store(false, (0.0, false), Instant::now());
            // Without the socket's word the young connection goes raw, as before.
            assert_eq!(windows(1), [holding], "holding {holding}");
        }
    }

    #[test]
    fn zstd_rate_follows_measurements() {
        let t = Instant::now();
        let mut g = CompressGovernor::new(t, Default::default());
        for _ in 0..50 {
            g.record(
                1 << 20,
                FAST_LEVEL,
                Duration::from_millis(10),
                Duration::from_millis(4),
            );
        }
        assert!((g.zstd_rate - 104_857_600.0).abs() < 1e6, "{}", g.zstd_rate);
        assert!(
            (g.zstd_cpu_rate - 262_144_000.0).abs() < 1e6,
            "{}",
            g.zstd_cpu_rate
        );
        g.record(
            10,
            FAST_LEVEL,
            Duration::from_nanos(10),
            Duration::from_nanos(5),
        );
        assert!(
            (g.zstd_rate - 104_857_600.0).abs() < 1e6,
            "tiny samples ignored"
        );
        assert!((g.zstd_cpu_rate - 262_144_000.0).abs() < 1e6);
    }
}
