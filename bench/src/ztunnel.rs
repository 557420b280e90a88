//! The tunnel a user would build without Shrinker: one zstd stream per connection
//! (optionally with long-range matching), compressing on one side and decompressing
//! on the other. Blocking I/O with a thread per direction: simple and fast enough.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

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
}

/// Runs the hop until killed.
pub fn run(args: ZtunnelArgs) -> anyhow::Result<()> {
    let compress = match args.mode.as_str() {
        "compress" => true,
        "decompress" => false,
        m => anyhow::bail!("--mode {m:?}: use compress or decompress"),
    };
    let listener = TcpListener::bind(args.listen)?;
    for a in listener.incoming() {
        let a = a?;
        let b = TcpStream::connect(args.to)?;
        let _ = a.set_nodelay(true);
        let _ = b.set_nodelay(true);
        let (level, long) = (args.level, args.long);
        // Forward direction (source -> destination) is (de)compressed; the reverse
        // direction (return path) is copied as is.
        let (a2, b2) = (a.try_clone()?, b.try_clone()?);
        std::thread::spawn(move || {
            let _ = if compress {
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

fn plain_copy(mut from: TcpStream, mut to: TcpStream) -> std::io::Result<()> {
    std::io::copy(&mut from, &mut to)?;
    to.shutdown(Shutdown::Write)
}
