//! The tunnel a user would build without Shrinker: one zstd stream per connection
//! (optionally with long-range matching), compressing on one side and decompressing
//! on the other. Blocking I/O with a thread per direction: simple and fast enough.
//!
//! `--shared` is the strongest general-compressor setup: ONE zstd stream for every
//! connection, one after another (`cat vm1 vm2 ... | zstd --long=30` over the wire),
//! so a later migration matches content of earlier ones within the window. Connections
//! are served strictly one at a time (the cluster benchmark migrates sequentially); each
//! ends with a zstd flush, so the far side can deliver it whole while the stream's
//! context continues into the next.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use zstd::stream::raw::{CParameter, DParameter, InBuffer, Operation, OutBuffer};

/// zstd tunnel hop settings.
#[derive(Clone, Debug, clap::Args)]
pub struct ZtunnelArgs {
    /// `compress` (near the source) or `decompress` (near the destination).
    #[arg(long)]
    pub mode: String,
    /// Listen here.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Forward to here.
    #[arg(long)]
    pub to: SocketAddr,
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

/// Runs the hop until killed.
pub fn run(args: ZtunnelArgs) -> anyhow::Result<()> {
    let compress = match args.mode.as_str() {
        "compress" => true,
        "decompress" => false,
        m => anyhow::bail!("--mode {m:?}: use compress or decompress"),
    };
    let listener = TcpListener::bind(args.listen)?;
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
        Some(Arc::new(Mutex::new(codec)))
    } else {
        None
    };
    for a in listener.incoming() {
        let a = a?;
        let b = TcpStream::connect(args.to)?;
        let _ = a.set_nodelay(true);
        let _ = b.set_nodelay(true);
        let (level, long) = (args.level, args.long);
        // Forward direction (source -> destination) is (de)compressed; the reverse
        // direction (return path) is copied as is.
        let (a2, b2) = (a.try_clone()?, b.try_clone()?);
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = if let Some(codec) = shared {
                shared_copy(a, b, &codec)
            } else if compress {
                compress_copy(a, b, level, long)
            } else {
                decompress_copy(a, b, long)
            };
        });
        std::thread::spawn(move || {
            let _ = plain_copy(b2, a2);
        });
    }
    Ok(())
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
