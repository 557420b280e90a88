//! `shrinker demo`: the main job on embedded defaults. Two edges on loopback (mutual
//! TLS with a throw-away CA), a migration-like stream per VM of a small cluster sent
//! through them one after another, every byte checked, the savings printed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::config::{EdgeArgs, Forward};
use crate::size::ByteSize;
use crate::Edge;

/// Options of `shrinker demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// VMs in the cluster.
    #[arg(long, default_value_t = 4)]
    pub vms: u64,
    /// Memory per VM.
    #[arg(long, default_value = "256MiB")]
    pub vm_size: ByteSize,
    /// Memory of the shared pool of pages (OS and libraries common to the VMs).
    #[arg(long, default_value = "128MiB")]
    pub shared_pool: ByteSize,
    /// Compression on the WAN leg: off, auto or always.
    #[arg(long, default_value = "always")]
    pub compress: wire::session::CompressMode,
}

/// Runs the demo, printing a table.
///
/// # Errors
/// Any failure of the pair (a mismatch is an error, not a line in the table).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let certs = tls::generate_certs(dir.path(), &["site-a".into(), "site-b".into()])
        .context("creating demo certificates")?;
    let files = |n: &str| certs.tls_files(n).expect("generated");

    // The "destination hypervisor": accepts one stream per VM and hashes it.
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let (hash_tx, mut hash_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sink.accept().await {
            let tx = hash_tx.clone();
            tokio::spawn(async move {
                let mut h = blake3::Hasher::new();
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => {
                            h.update(&buf[..k]);
                            n += k as u64;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok((n, h.finalize())));
            });
        }
    });

    let site = |name: &str| {
        let f = files(name);
        EdgeArgs {
            name: Some(name.into()),
            tls_ca: Some(f.ca),
            tls_cert: Some(f.cert),
            tls_key: Some(f.key),
            compress: Some(args.compress),
            cache_mem: Some(ByteSize(1 << 30)),
            ..Default::default()
        }
    };
    let b = Edge::bind(
        EdgeArgs {
            tunnel_listen: Some("127.0.0.1:0".parse()?),
            ..site("site-b")
        }
        .resolve()?,
    )
    .await?;
    let b_addr = b.tunnel_addr().expect("bound");
    let a = Edge::bind(
        EdgeArgs {
            forwards: vec![Forward {
                listen: "127.0.0.1:0".parse()?,
                peer: b_addr.to_string(),
                target: sink_addr.to_string(),
            }],
            ..site("site-a")
        }
        .resolve()?,
    )
    .await?;
    let a_addr = a.forward_addrs()[0];
    let a_stats = a.stats();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (stop_b_tx, stop_b_rx) = oneshot::channel::<()>();
    let ta = tokio::spawn(a.run(async {
        let _ = stop_rx.await;
    }));
    let tb = tokio::spawn(b.run(async {
        let _ = stop_b_rx.await;
    }));

    println!(
        "Shrinker demo: {} VMs x {} through two edges on loopback (mutual TLS 1.3), shared pool {}",
        args.vms, args.vm_size, args.shared_pool
    );
    println!(
        "{:>4} {:>12} {:>12} {:>8} {:>9} {:>10}  check",
        "vm", "LAN bytes", "WAN bytes", "WAN/LAN", "seconds", "MB/s"
    );
    let workload = testkit::Workload::cluster(2026, args.shared_pool.0);
    let (mut lan_total, mut wan_total) = (0u64, 0u64);
    let started = Instant::now();
    for vm in 0..args.vms {
        let wan_before = a_stats
            .wan_bytes_out
            .load(std::sync::atomic::Ordering::Relaxed);
        let t = Instant::now();
        let (sent, hash) = send_stream(a_addr, workload.stream(vm, args.vm_size.0)).await?;
        let got = tokio::time::timeout(Duration::from_secs(600), hash_rx.recv())
            .await
            .context("the destination did not finish")?
            .context("destination gone")?;
        let (n, h) = got.map_err(|e| anyhow::anyhow!("destination read failed: {e}"))?;
        if n != sent || h != hash {
            bail!("VM {vm}: destination received {n} bytes with a different hash: the invariant is broken");
        }
        let secs = t.elapsed().as_secs_f64();
        // Let the final frames' byte counts settle.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let wan = a_stats
            .wan_bytes_out
            .load(std::sync::atomic::Ordering::Relaxed)
            - wan_before;
        lan_total += sent;
        wan_total += wan;
        println!(
            "{:>4} {:>12} {:>12} {:>7.1}% {:>9.2} {:>10.0}  byte-exact",
            vm,
            sent,
            wan,
            100.0 * wan as f64 / sent as f64,
            secs,
            sent as f64 / secs / 1e6
        );
    }
    println!(
        "total {:>11} {:>12} {:>7.1}% {:>9.2}   -> the WAN carried {:.1}% fewer bytes",
        lan_total,
        wan_total,
        100.0 * wan_total as f64 / lan_total as f64,
        started.elapsed().as_secs_f64(),
        100.0 - 100.0 * wan_total as f64 / lan_total as f64
    );
    let _ = stop_tx.send(());
    let _ = stop_b_tx.send(());
    ta.await??;
    tb.await??;
    Ok(())
}

async fn send_stream(
    addr: SocketAddr,
    mut stream: testkit::Stream,
) -> anyhow::Result<(u64, blake3::Hash)> {
    let mut s = TcpStream::connect(addr)
        .await
        .context("connecting to the source edge")?;
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    while let Some(piece) = stream.next_piece(256 * 1024) {
        h.update(&piece);
        n += piece.len() as u64;
        s.write_all(&piece)
            .await
            .context("sending through the edge")?;
    }
    s.shutdown().await?;
    // The edge closes its side once the stream is delivered.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .await
        .context("waiting for the edge to finish")?;
    Ok((n, h.finalize()))
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
    let base = std::env::temp_dir().join(format!("shrinker-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(TempDir(base))
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
