//! A userspace WAN emulator: rate limit (token bucket shared by all connections of a
//! direction) and a fixed one-way delay, between two hops. Counts what it forwards.
//!
//! Several lanes (`--listen L1 --to T1 --listen L2 --to T2 ...`) share one link: the
//! cluster benchmark's concurrent migrations each get a lane, and all of them compete
//! for the same rate, as they would on one WAN.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

/// Bytes per read: small enough that the delay queue stays smooth.
const PIECE: usize = 64 * 1024;

/// A token bucket in bytes per second; `rate == 0` is unlimited.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket of `rate` bytes/s with a burst of 10 ms worth (at least 64 KiB).
    pub fn new(rate: f64) -> Self {
        let burst = (rate * 0.01).max(PIECE as f64);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// When the `n` bytes that reached the link at `ready` may leave (and takes them).
    ///
    /// The time is when the bytes reached the link, not when the emulator got round to
    /// them: on a busy machine the emulator wakes late, and refilling from its own
    /// clock would cap the refill at the burst and lose the link time in between, so
    /// the emulated link would drain below its rate exactly when the hosts on it
    /// work hardest (measured: 100 Mbit/s windows of 3.5-8 MB/s with megabytes
    /// queued). A real link sends while its hosts are busy; late bytes catch up.
    pub fn take(&mut self, n: usize, ready: Instant) -> Instant {
        if self.rate <= 0.0 {
            return ready;
        }
        // Pieces of several lanes may come out of order of their ready times: an
        // earlier one does not refill what a later one already took.
        let now = ready.max(self.last);
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Shaper settings.
#[derive(Clone, Debug, clap::Args)]
pub struct ShaperArgs {
    /// Listen here (repeat for more lanes over the same link).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// Forward to here (one per --listen, in the same order).
    #[arg(long, required = true)]
    pub to: Vec<SocketAddr>,
    /// Rate per direction in Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub rate_mbit: f64,
    /// One-way delay in ms.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    /// Write forwarded byte counts (JSON) here every 200 ms and at exit.
    #[arg(long)]
    pub stats: Option<PathBuf>,
}

#[derive(Default)]
struct Counts {
    forward: AtomicU64,
    reverse: AtomicU64,
}

/// Runs the shaper until SIGTERM/SIGINT.
pub async fn run(args: ShaperArgs) -> anyhow::Result<()> {
    let rate_ok = args.rate_mbit.is_finite() && args.rate_mbit >= 0.0;
    let delay_ok = (0.0..=60_000.0).contains(&args.delay_ms);
    if !rate_ok || !delay_ok {
        anyhow::bail!("--rate-mbit must be >= 0 and --delay-ms between 0 and 60000");
    }
    if args.listen.len() != args.to.len() {
        anyhow::bail!(
            "{} --listen but {} --to: give one --to per --listen",
            args.listen.len(),
            args.to.len()
        );
    }
    let rate = args.rate_mbit * 1e6 / 8.0;
    let up = Arc::new(Mutex::new(Bucket::new(rate)));
    let down = Arc::new(Mutex::new(Bucket::new(rate)));
    let counts = Arc::new(Counts::default());
    let delay = Duration::from_secs_f64(args.delay_ms / 1000.0);
    // What the link holds per connection and direction, like a router queue: the
    // bandwidth-delay product plus 20 ms of buffering (at least 256 KiB). A larger
    // queue would hide the link's rate from the sender for whole seconds.
    let queue_bytes = if rate > 0.0 {
        ((rate * (delay.as_secs_f64() + 0.02)) as usize).max(256 * 1024)
    } else {
        64 << 20
    };
    let write_stats = {
        let counts = counts.clone();
        let path = args.stats.clone();
        move || {
            if let Some(p) = &path {
                let json = serde_json::json!({
                    "forward_bytes": counts.forward.load(Relaxed),
                    "reverse_bytes": counts.reverse.load(Relaxed),
                });
                let tmp = p.with_extension("tmp");
                let _ = std::fs::write(&tmp, json.to_string());
                let _ = std::fs::rename(&tmp, p);
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let link = Link {
        up,
        down,
        counts,
        delay,
        queue_bytes,
    };
    let mut lanes = tokio::task::JoinSet::new();
    for (&listen, &to) in args.listen.iter().zip(&args.to) {
        // A small receive buffer on the link's entry (inherited by accepted sockets): a
        // loopback socket would otherwise autotune to tens of MiB and hide the link's
        // rate from the sender, which a real WAN path does not do.
        let socket = if listen.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if rate > 0.0 {
            socket.set_recv_buffer_size(256 * 1024)?;
        }
        socket.bind(listen)?;
        lanes.spawn(lane(socket.listen(1024)?, to, link.clone()));
    }
    loop {
        tokio::select! {
            Some(r) = lanes.join_next() => {
                r??;
            }
            _ = tick.tick() => write_stats(),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    write_stats();
    Ok(())
}

/// What every lane shares: the link's two buckets, its counters, delay and queue size.
#[derive(Clone)]
struct Link {
    up: Arc<Mutex<Bucket>>,
    down: Arc<Mutex<Bucket>>,
    counts: Arc<Counts>,
    delay: Duration,
    queue_bytes: usize,
}

/// Serves one lane: every connection accepted on `listener` goes to `to` over `link`.
async fn lane(listener: tokio::net::TcpListener, to: SocketAddr, link: Link) -> anyhow::Result<()> {
    // Upstream connections open in the order their clients were accepted: QEMU 7.2
    // tells a migration's channels apart only by accept order (main first, then the
    // multifd channels), and concurrent connects can complete in any order (a
    // destination once took the main channel for multifd channel 0: "received packet
    // magic 5145564d expected 11223344", and the migration hung).
    let mut previous: Option<tokio::sync::oneshot::Receiver<()>> = None;
    loop {
        let (a, _) = listener.accept().await?;
        let link = link.clone();
        let (connected, next) = tokio::sync::oneshot::channel();
        let before = previous.replace(next);
        tokio::spawn(async move {
            if let Some(before) = before {
                // Err: that connect failed or its task ended; go on either way.
                let _ = before.await;
            }
            let b = TcpStream::connect(to).await;
            let _ = connected.send(());
            let Ok(b) = b else { return };
            let _ = a.set_nodelay(true);
            let _ = b.set_nodelay(true);
            let (ar, aw) = a.into_split();
            let (br, bw) = b.into_split();
            let Link {
                up,
                down,
                counts,
                delay,
                queue_bytes,
            } = link;
            let c1 = counts.clone();
            let f = tokio::spawn(pipe(ar, bw, up, delay, queue_bytes, move |n| {
                c1.forward.fetch_add(n, Relaxed);
            }));
            let r = tokio::spawn(pipe(br, aw, down, delay, queue_bytes, move |n| {
                counts.reverse.fetch_add(n, Relaxed);
            }));
            let _ = tokio::join!(f, r);
        });
    }
}

/// One direction: read, stamp, hold for `delay`, pace through the bucket, write.
/// Ends by shutting the writer down (half-close propagation) once the reader hit EOF
/// and everything queued was delivered.
async fn pipe<R, W>(
    mut r: R,
    mut w: W,
    bucket: Arc<Mutex<Bucket>>,
    delay: Duration,
    queue_bytes: usize,
    count: impl Fn(u64) + Send + 'static,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // The queue is bounded in bytes: the reader stops reading (TCP backpressure to the
    // sender) while the link holds `queue_bytes`.
    let queue_bytes = queue_bytes.clamp(1, u32::MAX as usize);
    let room = Arc::new(tokio::sync::Semaphore::new(queue_bytes));
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(Instant, Vec<u8>, tokio::sync::OwnedSemaphorePermit)>();
    let reader_room = room.clone();
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; PIECE.min(queue_bytes)];
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    let Ok(permit) = reader_room.clone().acquire_many_owned(n as u32).await else {
                        break;
                    };
                    // Stamped when the link admits it: it leaves `delay` later.
                    if tx.send((Instant::now(), buf, permit)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut unblocked = Instant::now();
    while let Some((at, piece, _permit)) = rx.recv().await {
        // tokio's timer has 1 ms granularity: never touch it when no delay is asked.
        if !delay.is_zero() && Instant::now() < at + delay {
            tokio::time::sleep_until(at + delay).await;
        }
        // The piece reached the end of the delay line at `ready`; it leaves when the
        // rate allows, counted from then (see `Bucket::take`), but not from before the
        // next hop last took a write: time in which it held the link back (its
        // socket full, as TCP's window would stop a real sender) is no credit.
        let ready = (at + delay).max(unblocked);
        let leave = bucket.lock().await.take(piece.len(), ready);
        if leave > Instant::now() {
            tokio::time::sleep_until(leave).await;
        }
        let before = Instant::now();
        if w.write_all(&piece).await.is_err() {
            break;
        }
        let after = Instant::now();
        if after - before > Duration::from_millis(1) {
            unblocked = after;
        }
        count(piece.len() as u64);
    }
    let _ = w.shutdown().await;
    reader.abort();
    let _ = reader.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lanes_reach_their_own_targets_and_share_the_counters() {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let targets = [
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ];
        let listen = vec![free(), free()];
        let stats = std::env::temp_dir().join(format!("shaper-lanes-{}.json", std::process::id()));
        tokio::spawn(run(ShaperArgs {
            listen: listen.clone(),
            to: targets.iter().map(|t| t.local_addr().unwrap()).collect(),
            rate_mbit: 0.0,
            delay_ms: 0.0,
            stats: Some(stats.clone()),
        }));
        for (i, (l, t)) in listen.iter().zip(&targets).enumerate() {
            let mut c = loop {
                if let Ok(c) = TcpStream::connect(l).await {
                    break c;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let msg = format!("lane {i}");
            c.write_all(msg.as_bytes()).await.unwrap();
            c.shutdown().await.unwrap();
            let (mut s, _) = t.accept().await.unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).await.unwrap();
            assert_eq!(got, msg);
        }
        // Both lanes count on the one link (written every 200 ms).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v: serde_json::Value = std::fs::read_to_string(&stats)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            if v["forward_bytes"] == 12 {
                break;
            }
            assert!(Instant::now() < deadline, "counters: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_file(stats);
    }

    #[test]
    fn bucket_paces_to_its_rate() {
        let mut b = Bucket::new(1e6); // 1 MB/s, burst 64 KiB
        let t0 = Instant::now();
        assert_eq!(b.take(65_536, t0), t0);
        let w = b.take(100_000, t0) - t0;
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-3, "{w:?}");
        let mut free = Bucket::new(0.0);
        assert_eq!(free.take(1 << 30, t0), t0);
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 7) as u8)
            .collect()
    }

    /// Runs `data` through one shaped direction over in-memory pipes; returns what came
    /// out, when its first byte came out and when the last did (from the first write).
    async fn through(
        data: Vec<u8>,
        rate: f64,
        delay: Duration,
    ) -> (Vec<u8>, Duration, Duration, u64) {
        let (mut src, pipe_in) = tokio::io::duplex(64 * 1024);
        let (pipe_out, mut dst) = tokio::io::duplex(64 * 1024);
        let counted = Arc::new(AtomicU64::new(0));
        let c = counted.clone();
        let queue = ((rate * (delay.as_secs_f64() + 0.02)) as usize).max(256 * 1024);
        let task = tokio::spawn(pipe(
            pipe_in,
            pipe_out,
            Arc::new(Mutex::new(Bucket::new(rate))),
            delay,
            queue,
            move |n| {
                c.fetch_add(n, Relaxed);
            },
        ));
        let t0 = Instant::now();
        let writer = tokio::spawn(async move {
            // Pieces of uneven sizes, so reads and queue entries do not line up.
            let mut rest = &data[..];
            let mut k = 1usize;
            while !rest.is_empty() {
                let n = (k * 7919 % 50_000 + 1).min(rest.len());
                src.write_all(&rest[..n]).await.unwrap();
                rest = &rest[n..];
                k += 1;
            }
            src.shutdown().await.unwrap();
            src
        });
        let mut out = Vec::new();
        let mut first = None;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = dst.read(&mut buf).await.unwrap();
            if n == 0 {
                break; // the shaper propagated the half-close
            }
            first.get_or_insert_with(|| t0.elapsed());
            out.extend_from_slice(&buf[..n]);
        }
        let last = t0.elapsed();
        task.await.unwrap();
        drop(writer.await.unwrap());
        (out, first.unwrap_or(last), last, counted.load(Relaxed))
    }

    #[test]
    fn bucket_is_shared_debt() {
        // Two takers in a row at the same instant: the second waits for both.
        let mut b = Bucket::new(1e6);
        let t0 = Instant::now();
        assert_eq!(b.take(65_536, t0), t0);
        let w1 = b.take(10_000, t0) - t0;
        let w2 = b.take(10_000, t0) - t0;
        assert!((w1.as_secs_f64() - 0.01).abs() < 1e-4, "{w1:?}");
        assert!((w2.as_secs_f64() - 0.02).abs() < 1e-4, "{w2:?}");
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.take(65_536 - 20_000, later), later);
        assert!(b.take(20_001, later) > later);
        // A piece that reached the link before one already taken does not refill.
        let at = later + Duration::from_millis(5);
        let first = b.take(10_000, at);
        assert!(b.take(10_000, later) > first);
    }

    #[tokio::test]
    async fn delay_line_keeps_order_and_delays() {
        let data = pattern(600_000);
        let delay = Duration::from_millis(40);
        let (out, first, _, counted) = through(data.clone(), 0.0, delay).await;
        assert_eq!(out.len(), data.len());
        assert!(out == data, "bytes reordered or corrupted");
        assert_eq!(counted, data.len() as u64);
        assert!(
            first >= delay,
            "first byte after {first:?}, delay {delay:?}"
        );
        // Not one sleep per piece: the whole stream is late by about one delay.
        let (_, _, last, _) = through(data.clone(), 0.0, delay).await;
        assert!(last < delay * 10, "took {last:?}");
    }

    #[tokio::test]
    async fn rate_limit_paces_the_stream() {
        // 4 MB/s: 400 kB take ~100 ms minus the 64 KiB burst.
        let data = pattern(400_000);
        let (out, _, last, _) = through(data.clone(), 4e6, Duration::ZERO).await;
        assert!(out == data);
        let ideal = (400_000.0 - 65_536.0) / 4e6;
        assert!(
            last.as_secs_f64() > ideal * 0.9 && last.as_secs_f64() < ideal + 1.0,
            "{last:?} vs {ideal}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_late_emulator_does_not_slow_the_link() {
        // 2 MB at 4 MB/s: ~0.5 s of link. Meanwhile the (only) runtime thread is
        // blocked four times for 80 ms, as a busy machine deschedules the emulator:
        // the bytes that reached the link meanwhile leave at once when it wakes. With
        // the refill counted from the emulator's own clock (capped at the 16 ms burst)
        // each block cost ~64 ms of link time: ~0.75 s in all.
        let blocker = tokio::spawn(async {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                std::thread::sleep(Duration::from_millis(80));
            }
        });
        let data = pattern(2_000_000);
        let (out, _, last, _) = through(data.clone(), 4e6, Duration::ZERO).await;
        blocker.await.unwrap();
        assert!(out == data);
        let ideal = (2_000_000.0 - 65_536.0) / 4e6;
        assert!(
            last.as_secs_f64() < ideal + 0.15,
            "{last:?} for {ideal:.3} s of link"
        );
    }

    #[tokio::test]
    async fn queue_is_bounded() {
        // Nobody reads the far side: the shaper must stop taking input at about the
        // queue size plus the pipes' own buffers.
        let (mut src, pipe_in) = tokio::io::duplex(64 * 1024);
        let (pipe_out, _dst) = tokio::io::duplex(64 * 1024);
        let queue = 256 * 1024;
        tokio::spawn(pipe(
            pipe_in,
            pipe_out,
            Arc::new(Mutex::new(Bucket::new(0.0))),
            Duration::ZERO,
            queue,
            |_| {},
        ));
        let chunk = vec![1u8; 16 * 1024];
        let mut accepted = 0usize;
        while tokio::time::timeout(Duration::from_millis(200), src.write_all(&chunk))
            .await
            .is_ok()
        {
            accepted += chunk.len();
            assert!(accepted < 8 << 20, "unbounded");
        }
        let bound = queue + 3 * 64 * 1024 + PIECE + chunk.len();
        assert!(accepted <= bound, "{accepted} > {bound}");
        assert!(accepted >= queue, "{accepted} < {queue}");
    }
}
