//! A userspace WAN emulator: rate limit (token bucket shared by all connections of a
//! direction) and a fixed one-way delay, between two hops. Counts what it forwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    /// How long to wait before `n` bytes may pass (and takes them).
    pub fn take(&mut self, n: usize, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Shaper settings.
#[derive(Clone, Debug, clap::Args)]
pub struct ShaperArgs {
    /// Listen here.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Forward to here.
    #[arg(long)]
    pub to: SocketAddr,
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
    let rate = args.rate_mbit * 1e6 / 8.0;
    // A small receive buffer on the link's entry (inherited by accepted sockets): a
    // loopback socket would otherwise autotune to tens of MiB and hide the link's
    // rate from the sender, which a real WAN path does not do.
    let socket = if args.listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if rate > 0.0 {
        socket.set_recv_buffer_size(256 * 1024)?;
    }
    socket.bind(args.listen)?;
    let listener = socket.listen(1024)?;
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
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (a, _) = r?;
                let to = args.to;
                let (up, down, counts) = (up.clone(), down.clone(), counts.clone());
                tokio::spawn(async move {
                    let Ok(b) = TcpStream::connect(to).await else { return };
                    let _ = a.set_nodelay(true);
                    let _ = b.set_nodelay(true);
                    let (ar, aw) = a.into_split();
                    let (br, bw) = b.into_split();
                    let c1 = counts.clone();
                    let f = tokio::spawn(pipe(ar, bw, up, delay, queue_bytes, move |n| { c1.forward.fetch_add(n, Relaxed); }));
                    let r = tokio::spawn(pipe(br, aw, down, delay, queue_bytes, move |n| { counts.reverse.fetch_add(n, Relaxed); }));
                    let _ = tokio::join!(f, r);
                });
            }
            _ = tick.tick() => write_stats(),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    write_stats();
    Ok(())
}

/// One direction: read, stamp, hold for `delay`, pace through the bucket, write.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    bucket: Arc<Mutex<Bucket>>,
    delay: Duration,
    queue_bytes: usize,
    count: impl Fn(u64) + Send + 'static,
) {
    // The queue is bounded in bytes: the reader stops reading (TCP backpressure to the
    // sender) while the link holds `queue_bytes`.
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
                    if tx.send((Instant::now(), buf, permit)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    while let Some((at, piece, _permit)) = rx.recv().await {
        // tokio's timer has 1 ms granularity: never touch it when no delay is asked.
        if !delay.is_zero() && Instant::now() < at + delay {
            tokio::time::sleep_until(at + delay).await;
        }
        let wait = bucket.lock().await.take(piece.len(), Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if w.write_all(&piece).await.is_err() {
            break;
        }
        count(piece.len() as u64);
    }
    let _ = w.shutdown().await;
    let _ = reader.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1e6); // 1 MB/s, burst 64 KiB
        assert_eq!(b.take(65_536, t0), Duration::ZERO);
        let w = b.take(100_000, t0);
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-3, "{w:?}");
        let mut free = Bucket::new(0.0);
        assert_eq!(free.take(1 << 30, t0), Duration::ZERO);
    }
}
