//! The tunnel a user would build without Shrinker: one zstd stream per connection
//! (optionally with long-range matching), compressing on one side and decompressing
//! on the other. Blocking I/O with a thread per direction: simple and fast enough.
//!
//! `--shared` is the strongest general-compressor setup: ONE zstd stream for every
//! connection, one after another (`cat vm1 vm2 ... | zstd --long=30` over the wire),
//! so a later migration matches content of earlier ones within the window. Connections
//! are served strictly one at a time, in the order the compressing side accepted them:
//! each WAN connection starts with its 8-byte sequence number (uncompressed), and the
//! decompressing side takes connections in that order whatever order they reach it
//! in, so both sides run the stream over the same bytes. Each connection ends with a
//! zstd flush, so the far side can deliver it whole while the stream's context
//! continues into the next. Concurrent migrations thus queue behind each other: one
//! stream has one history, and that is the price of sharing it.
//!
//! Several lanes (`--listen L1 --to T1 --listen L2 --to T2 ...`) serve several
//! destinations from one process (and, with `--shared`, one stream).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};

use zstd::stream::raw::{CParameter, DParameter, InBuffer, Operation, OutBuffer};

/// zstd tunnel hop settings.
#[derive(Clone, Debug, clap::Args)]
pub struct ZtunnelArgs {
    /// `compress` (near the source) or `decompress` (near the destination).
    #[arg(long)]
    pub mode: String,
    /// Listen here (repeat for more lanes).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// Forward to here (one per --listen, in the same order).
    #[arg(long, required = true)]
    pub to: Vec<SocketAddr>,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    pub level: i32,
    /// Long-range matching window (log2 bytes), e.g. 27 for `--long=27`; 0 = off.
    #[arg(long, default_value_t = 0)]
    pub long: u32,
    /// One zstd stream shared by all connections, served one at a time.
    #[arg(long)]
    pub shared: bool,
}

/// The persistent (de)compressor of `--shared`.
enum SharedCodec {
    Compress(zstd::stream::raw::Encoder<'static>),
    Decompress(zstd::stream::raw::Decoder<'static>),
}

/// `--shared`: the one codec and whose turn it is to use it (a connection's sequence
/// number; connections take the codec in that order).
struct Shared {
    codec: Mutex<SharedCodec>,
    turn: Mutex<u64>,
    next_turn: Condvar,
    /// The compressing side numbers connections as it accepts them.
    accepted: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn new(codec: SharedCodec) -> Self {
        Shared {
            codec: Mutex::new(codec),
            turn: Mutex::new(0),
            next_turn: Condvar::new(),
            accepted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Waits until it is connection `seq`'s turn; the turn passes on when the guard
    /// drops (also when that connection failed, so later ones are not stuck).
    fn wait_turn(&self, seq: u64) -> Turn<'_> {
        let mut turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        while *turn != seq {
            turn = self.next_turn.wait(turn).unwrap_or_else(|p| p.into_inner());
        }
        Turn(self)
    }
}

struct Turn<'a>(&'a Shared);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.turn.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.next_turn.notify_all();
    }
}

/// Runs the hop until killed.
pub fn run(args: ZtunnelArgs) -> anyhow::Result<()> {
    let compress = match args.mode.as_str() {
        "compress" => true,
        "decompress" => false,
        m => anyhow::bail!("--mode {m:?}: use compress or decompress"),
    };
    if args.listen.len() != args.to.len() {
        anyhow::bail!(
            "{} --listen but {} --to: give one --to per --listen",
            args.listen.len(),
            args.to.len()
        );
    }
    let shared = if args.shared {
        let codec = if compress {
            let mut e = zstd::stream::raw::Encoder::new(args.level)?;
            if args.long > 0 {
                e.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
                e.set_parameter(CParameter::WindowLog(args.long))?;
            }
            SharedCodec::Compress(e)
        } else {
            let mut d = zstd::stream::raw::Decoder::new()?;
            d.set_parameter(DParameter::WindowLogMax(args.long.max(27)))?;
            SharedCodec::Decompress(d)
        };
        Some(Arc::new(Shared::new(codec)))
    } else {
        None
    };
    let mut lanes = Vec::new();
    for (&listen, &to) in args.listen.iter().zip(&args.to) {
        let listener = TcpListener::bind(listen)?;
        let (shared, level, long) = (shared.clone(), args.level, args.long);
        lanes.push(std::thread::spawn(move || -> std::io::Result<()> {
            for a in listener.incoming() {
                let a = a?;
                let seq = shared.as_ref().map(|s| s.accepted.fetch_add(1, Relaxed));
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let r = serve(a, to, compress, level, long, shared.as_deref(), seq);
                    if let Err(e) = r {
                        eprintln!("ztunnel {listen}: {e}");
                    }
                });
            }
            Ok(())
        }));
    }
    for lane in lanes {
        lane.join()
            .map_err(|_| anyhow::anyhow!("a lane panicked"))??;
    }
    Ok(())
}

/// One connection: the forward direction (source -> destination) is (de)compressed,
/// the reverse direction (return path) is copied as is.
fn serve(
    mut a: TcpStream,
    to: SocketAddr,
    compress: bool,
    level: i32,
    long: u32,
    shared: Option<&Shared>,
    seq: Option<u64>,
) -> std::io::Result<()> {
    let _ = a.set_nodelay(true);
    let Some(shared) = shared else {
        let b = TcpStream::connect(to)?;
        let _ = b.set_nodelay(true);
        let (a2, b2) = (a.try_clone()?, b.try_clone()?);
        std::thread::spawn(move || plain_copy(b2, a2));
        return if compress {
            compress_copy(a, b, level, long)
        } else {
            decompress_copy(a, b, long)
        };
    };
    // The sequence number: assigned at accept by the compressing side, read from the
    // WAN connection by the decompressing side.
    let seq = match seq.filter(|_| compress) {
        Some(s) => s,
        None => {
            let mut n = [0u8; 8];
            let got = a.read_exact(&mut n);
            // Read failed: the turn is unknown, so nothing can be passed on. The
            // compressing side failed this connection too; the bench reports it.
            got?;
            u64::from_be_bytes(n)
        }
    };
    let turn = shared.wait_turn(seq);
    let mut b = TcpStream::connect(to)?;
    let _ = b.set_nodelay(true);
    if compress {
        b.write_all(&seq.to_be_bytes())?;
    }
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    std::thread::spawn(move || plain_copy(b2, a2));
    let r = shared_copy(a, b, &shared.codec);
    drop(turn);
    r
}

fn compress_copy(mut from: TcpStream, to: TcpStream, level: i32, long: u32) -> std::io::Result<()> {
    let mut enc = zstd::stream::write::Encoder::new(to.try_clone()?, level)?;
    if long > 0 {
        enc.long_distance_matching(true)?;
        enc.window_log(long)?;
    }
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        enc.write_all(&buf[..n])?;
        // End the block so the far side can deliver what arrived (the stream's
        // context is kept: this is what a streaming tunnel does).
        enc.flush()?;
    }
    enc.finish()?;
    to.shutdown(Shutdown::Write)
}

fn decompress_copy(from: TcpStream, mut to: TcpStream, long: u32) -> std::io::Result<()> {
    let mut dec = zstd::stream::read::Decoder::new(from)?;
    if long > 0 {
        dec.window_log_max(long.max(27))?;
    }
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])?;
    }
    to.shutdown(Shutdown::Write)
}

/// Runs one connection through the shared codec, holding it for the whole connection.
fn shared_copy(
    mut from: TcpStream,
    mut to: TcpStream,
    codec: &Mutex<SharedCodec>,
) -> std::io::Result<()> {
    let mut codec = codec.lock().unwrap_or_else(|p| p.into_inner());
    let mut buf = vec![0u8; 256 * 1024];
    let mut obuf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut input = InBuffer::around(&buf[..n]);
        loop {
            let mut out = OutBuffer::around(&mut obuf[..]);
            match &mut *codec {
                SharedCodec::Compress(e) => e.run(&mut input, &mut out)?,
                SharedCodec::Decompress(d) => d.run(&mut input, &mut out)?,
            };
            let full = out.pos() == out.capacity();
            to.write_all(out.as_slice())?;
            if input.pos == n && !full {
                break;
            }
        }
        // End the block so the far side can deliver what arrived; the context stays.
        if let SharedCodec::Compress(e) = &mut *codec {
            loop {
                let mut out = OutBuffer::around(&mut obuf[..]);
                let left = e.flush(&mut out)?;
                to.write_all(out.as_slice())?;
                if left == 0 {
                    break;
                }
            }
        }
    }
    to.shutdown(Shutdown::Write)
}

fn plain_copy(mut from: TcpStream, mut to: TcpStream) -> std::io::Result<()> {
    std::io::copy(&mut from, &mut to)?;
    to.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `data` through `shared_copy` with `codec`, over loopback sockets.
    fn through(codec: &Mutex<SharedCodec>, data: Vec<u8>) -> Vec<u8> {
        let l_in = TcpListener::bind("127.0.0.1:0").unwrap();
        let l_out = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_in, a_out) = (l_in.local_addr().unwrap(), l_out.local_addr().unwrap());
        let writer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(a_in).unwrap();
            s.write_all(&data).unwrap();
        });
        let reader = std::thread::spawn(move || {
            let (mut s, _) = l_out.accept().unwrap();
            let mut v = Vec::new();
            s.read_to_end(&mut v).unwrap();
            v
        });
        let (from, _) = l_in.accept().unwrap();
        let to = TcpStream::connect(a_out).unwrap();
        shared_copy(from, to, codec).unwrap();
        writer.join().unwrap();
        reader.join().unwrap()
    }

    /// A free loopback address (bound, then released).
    fn free_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn connect_retry(addr: SocketAddr) -> TcpStream {
        for _ in 0..500 {
            if let Ok(s) = TcpStream::connect(addr) {
                // A connect to a free loopback port can meet itself (TCP simultaneous
                // open when the kernel picks that port as the source): not the server.
                if s.local_addr().ok() != s.peer_addr().ok() {
                    return s;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("nothing listens on {addr}");
    }

    #[test]
    fn shared_stream_lanes_deliver_concurrent_connections_whole() {
        // Three lanes, compressor -> decompressor -> three sinks, all connections at
        // once: each must reach its own lane's sink, whole, and both sides must run
        // the one stream over the connections in the same order, or it decodes
        // garbage (or fails).
        let lanes = 3;
        let fronts: Vec<SocketAddr> = (0..lanes).map(|_| free_addr()).collect();
        let backs: Vec<SocketAddr> = (0..lanes).map(|_| free_addr()).collect();
        let sinks: Vec<TcpListener> = (0..lanes)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let sink_addrs: Vec<SocketAddr> = sinks.iter().map(|l| l.local_addr().unwrap()).collect();
        for (mode, listen, to) in [
            ("decompress", backs.clone(), sink_addrs),
            ("compress", fronts.clone(), backs),
        ] {
            let args = ZtunnelArgs {
                mode: mode.into(),
                listen,
                to,
                level: 3,
                long: 27,
                shared: true,
            };
            // Serves until the test process ends.
            std::thread::spawn(move || run(args));
        }
        let readers: Vec<_> = sinks
            .into_iter()
            .map(|l| {
                std::thread::spawn(move || {
                    let (mut s, _) = l.accept().unwrap();
                    let mut v = Vec::new();
                    s.read_to_end(&mut v).unwrap();
                    v
                })
            })
            .collect();
        let data: Vec<Vec<u8>> = (0..lanes)
            .map(|i| {
                (0..(1 << 20) + 777 * i)
                    .map(|j| ((j * (i + 3)) ^ (j >> 9)) as u8)
                    .collect()
            })
            .collect();
        let writers: Vec<_> = fronts
            .iter()
            .zip(data.clone())
            .map(|(&f, d)| {
                std::thread::spawn(move || {
                    let mut s = connect_retry(f);
                    for piece in d.chunks(40_000) {
                        s.write_all(piece).unwrap();
                    }
                    s.shutdown(Shutdown::Write).unwrap();
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        for (r, d) in readers.into_iter().zip(data) {
            assert!(r.join().unwrap() == d, "a lane delivered other bytes");
        }
    }

    #[test]
    fn shared_stream_carries_connections_in_turn_and_keeps_context() {
        let mut e = zstd::stream::raw::Encoder::new(3).unwrap();
        e.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .unwrap();
        e.set_parameter(CParameter::WindowLog(27)).unwrap();
        let enc = Mutex::new(SharedCodec::Compress(e));
        let mut d = zstd::stream::raw::Decoder::new().unwrap();
        d.set_parameter(DParameter::WindowLogMax(27)).unwrap();
        let dec = Mutex::new(SharedCodec::Decompress(d));
        let mut x = 1u64;
        let noise: Vec<u8> = (0..3 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let first = through(&enc, noise.clone());
        assert!(
            first.len() > noise.len() * 9 / 10,
            "noise does not compress"
        );
        // The second connection repeats the first: the shared context finds it.
        let second = through(&enc, noise.clone());
        assert!(second.len() < noise.len() / 50, "{} bytes", second.len());
        assert_eq!(through(&dec, first), noise);
        assert_eq!(through(&dec, second), noise);
    }
}
