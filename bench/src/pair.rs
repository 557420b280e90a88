//! `shrinker-bench pair`: migration-like streams through (a) a plain relay pair and
//! (b) the edge pair, each hop its own process, with the same userspace WAN shaper
//! between the two hops; runs alternate a/b so machine drift cancels out.
//!
//! ```text
//! relay:  client -> relay1 -> shaper -> relay2 -> sink
//! edge:   client -> shrinker A -> shaper -> shrinker B -> sink
//! ```
//! The sink hashes each bulk stream and sends the hash back, so every byte is checked
//! end to end; a ping-pong connection measures small-message latency.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Options of `pair`.
#[derive(Clone, Debug, clap::Args)]
pub struct PairArgs {
    /// Bytes per stream.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub bytes: u64,
    /// Streams (VMs).
    #[arg(long, default_value_t = 4)]
    pub streams: u64,
    /// Send the streams at once instead of one after another.
    #[arg(long)]
    pub concurrent: bool,
    /// Shared page pool of the workload (default: a quarter of all bytes).
    #[arg(long, value_parser = parse_size)]
    pub pool: Option<u64>,
    /// WAN rate per direction in Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub rate_mbit: f64,
    /// WAN one-way delay in ms.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    /// Edge compression: off, auto, always.
    #[arg(long, default_value = "auto")]
    pub compress: String,
    /// Round trips of 64-byte messages for the latency figures.
    #[arg(long, default_value_t = 2000)]
    pub pings: u32,
    /// Runs of each scenario (alternating).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// The `shrinker` binary (default: beside this one).
    #[arg(long)]
    pub shrinker: Option<PathBuf>,
    /// Edges without TLS.
    #[arg(long)]
    pub plaintext: bool,
    /// Write all figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Give up after this many seconds in total.
    #[arg(long, default_value_t = 1200)]
    pub timeout_secs: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("bad size {s:?}"))?;
    let m = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(format!("bad unit in {s:?} (use KiB, MiB, GiB)")),
    };
    Ok(n * m)
}

/// Figures of one run of one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct RunFigures {
    pub scenario: &'static str,
    pub run: u32,
    pub lan_bytes: u64,
    pub wall_secs: f64,
    pub throughput_mb_s: f64,
    pub wan_forward_bytes: u64,
    pub wan_reverse_bytes: u64,
    pub wan_lan_ratio: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub peak_rss_mib: Vec<f64>,
}

/// Child processes, killed on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    fn peak_rss_mib(&self) -> Vec<f64> {
        self.0
            .iter()
            .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/status", c.id())).ok())
            .filter_map(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map(|kib| kib / 1024.0)
            .collect()
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

/// The sink: `B` + stream → replies blake3 (32 B) + length (8 B); `P` → echoes 64-byte
/// messages until EOF.
async fn sink(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut kind = [0u8; 1];
            if s.read_exact(&mut kind).await.is_err() {
                return;
            }
            if kind[0] == b'P' {
                let mut msg = [0u8; 64];
                while s.read_exact(&mut msg).await.is_ok() {
                    if s.write_all(&msg).await.is_err() {
                        return;
                    }
                }
                return;
            }
            let mut h = blake3::Hasher::new();
            let mut n = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(k) => {
                        h.update(&buf[..k]);
                        n += k as u64;
                    }
                    Err(_) => return,
                }
            }
            let mut reply = h.finalize().as_bytes().to_vec();
            reply.extend_from_slice(&n.to_be_bytes());
            let _ = s.write_all(&reply).await;
            let _ = s.shutdown().await;
        });
    }
}

async fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn send_stream(front: SocketAddr, data: &[u8]) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(front).await?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.split();
    let expect = {
        let mut e = blake3::hash(data).as_bytes().to_vec();
        e.extend_from_slice(&(data.len() as u64).to_be_bytes());
        e
    };
    let send = async {
        w.write_all(b"B").await?;
        for piece in data.chunks(256 * 1024) {
            w.write_all(piece).await?;
        }
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let recv = async {
        let mut reply = Vec::new();
        r.read_to_end(&mut reply).await?;
        anyhow::Ok(reply)
    };
    let (sent, reply) = tokio::join!(send, recv);
    sent?;
    if reply? != expect {
        bail!("the sink received different bytes: the invariant is broken");
    }
    Ok(())
}

async fn pings(front: SocketAddr, n: u32) -> anyhow::Result<Histogram<u64>> {
    let mut s = TcpStream::connect(front).await?;
    s.set_nodelay(true)?;
    s.write_all(b"P").await?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut msg = [7u8; 64];
    for i in 0..n {
        msg[..4].copy_from_slice(&i.to_be_bytes());
        let t = Instant::now();
        s.write_all(&msg).await?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back).await?;
        if back != msg {
            bail!("ping {i} came back different");
        }
        h.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    Ok(h)
}

fn read_shaper(path: &Path) -> (u64, u64) {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| {
            (
                v["forward_bytes"].as_u64().unwrap_or(0),
                v["reverse_bytes"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or((0, 0))
}

struct Env {
    me: PathBuf,
    shrinker: PathBuf,
    dir: PathBuf,
    sink: SocketAddr,
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    env: &Env,
    args: &PairArgs,
    edge: bool,
    run: u32,
    streams: &[Vec<u8>],
) -> anyhow::Result<RunFigures> {
    let scenario = if edge { "edge pair" } else { "relay pair" };
    let net = 10 + run as u8 * 2 + edge as u8;
    let ip = format!("127.0.77.{net}");
    let addr = |port: u16| -> SocketAddr { format!("{ip}:{port}").parse().expect("address") };
    let (front, shaper, back) = (addr(21001), addr(21002), addr(21003));
    let stats = env.dir.join(format!("shaper-{run}-{edge}.json"));
    let _ = std::fs::remove_file(&stats);
    let mut procs = Procs(Vec::new());
    let shaper_args = [
        "shaper".to_string(),
        "--listen".into(),
        shaper.to_string(),
        "--to".into(),
        back.to_string(),
        "--rate-mbit".into(),
        args.rate_mbit.to_string(),
        "--delay-ms".into(),
        args.delay_ms.to_string(),
        "--stats".into(),
        stats.display().to_string(),
    ];
    procs.0.push(spawn(
        Command::new(&env.me).args(shaper_args),
        &env.dir.join("shaper.log"),
    )?);
    if edge {
        let tls = |name: &str| -> Vec<String> {
            if args.plaintext {
                vec!["--insecure-plaintext".into()]
            } else {
                vec![
                    "--tls-ca".into(),
                    env.dir.join("pki/ca.crt").display().to_string(),
                    "--tls-cert".into(),
                    env.dir
                        .join(format!("pki/{name}.crt"))
                        .display()
                        .to_string(),
                    "--tls-key".into(),
                    env.dir
                        .join(format!("pki/{name}.key"))
                        .display()
                        .to_string(),
                ]
            }
        };
        let common = ["--cache-mem", "2GiB", "--compress", args.compress.as_str()];
        procs.0.push(spawn(
            Command::new(&env.shrinker)
                .args(["edge", "--name", "b", "--tunnel-listen", &back.to_string()])
                .args(common)
                .args(tls("b")),
            &env.dir.join("edge-b.log"),
        )?);
        procs.0.push(spawn(
            Command::new(&env.shrinker)
                .args([
                    "edge",
                    "--name",
                    "a",
                    "--forward",
                    &format!("{front}={shaper}={}", env.sink),
                ])
                .args(common)
                .args(tls("a")),
            &env.dir.join("edge-a.log"),
        )?);
    } else {
        procs.0.push(spawn(
            Command::new(&env.me).args([
                "relay",
                "--listen",
                &back.to_string(),
                "--to",
                &env.sink.to_string(),
            ]),
            &env.dir.join("relay2.log"),
        )?);
        procs.0.push(spawn(
            Command::new(&env.me).args([
                "relay",
                "--listen",
                &front.to_string(),
                "--to",
                &shaper.to_string(),
            ]),
            &env.dir.join("relay1.log"),
        )?);
    }
    for a in [shaper, back, front] {
        wait_port(a).await?;
    }
    // A warm-up ping makes sure the whole path is up; then take the byte baseline.
    pings(front, 5).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (f0, r0) = read_shaper(&stats);
    let started = Instant::now();
    if args.concurrent {
        let jobs: Vec<_> = streams.iter().map(|d| send_stream(front, d)).collect();
        for r in futures_all(jobs).await {
            r?;
        }
    } else {
        for d in streams {
            send_stream(front, d).await?;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let hist = pings(front, args.pings).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (f1, r1) = read_shaper(&stats);
    let lan: u64 = streams.iter().map(|s| s.len() as u64).sum();
    let fig = RunFigures {
        scenario,
        run,
        lan_bytes: lan,
        wall_secs: wall,
        throughput_mb_s: lan as f64 / wall / 1e6,
        wan_forward_bytes: f1 - f0,
        wan_reverse_bytes: r1 - r0,
        wan_lan_ratio: (f1 - f0) as f64 / lan as f64,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        peak_rss_mib: if edge {
            procs.peak_rss_mib()[1..].to_vec()
        } else {
            Vec::new()
        },
    };
    drop(procs);
    Ok(fig)
}

/// Polls all futures on this task (the bench has no other use for a join helper).
async fn futures_all<F: std::future::Future>(jobs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = jobs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Runs the benchmark and prints the table.
pub async fn run(args: PairArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let shrinker = args
        .shrinker
        .clone()
        .unwrap_or_else(|| me.with_file_name("shrinker"));
    if !shrinker.exists() {
        bail!("{} not found: build it with `cargo build --release -p shrinker-proxy` or pass --shrinker", shrinker.display());
    }
    let dir = std::env::temp_dir().join(format!("shrinker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = Command::new(&shrinker)
        .args(["certs", "--out"])
        .arg(dir.join("pki"))
        .args(["a", "b"])
        .output()?;
    if !out.status.success() {
        bail!(
            "shrinker certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sink_addr: SocketAddr = "127.0.77.1:21004".parse()?;
    tokio::spawn(sink(
        TcpListener::bind(sink_addr)
            .await
            .context("binding the sink")?,
    ));
    let env = Env {
        me,
        shrinker,
        dir: dir.clone(),
        sink: sink_addr,
    };

    let pool = args
        .pool
        .unwrap_or((args.bytes * args.streams / 4).max(1 << 20));
    eprintln!(
        "generating {} stream(s) of {} MiB (shared pool {} MiB)...",
        args.streams,
        args.bytes >> 20,
        pool >> 20
    );
    let w = testkit::Workload::cluster(2026, pool);
    let streams: Vec<Vec<u8>> = (0..args.streams)
        .map(|i| w.stream(i, args.bytes).collect_all())
        .collect();

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut all = Vec::new();
    for run in 0..args.runs {
        for edge in [false, true] {
            if Instant::now() > deadline {
                bail!("out of time after {} runs", all.len());
            }
            let fig = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                run_one(&env, &args, edge, run, &streams),
            )
            .await
            .context("benchmark timed out")??;
            eprintln!(
                "run {} {:<10}: {:>8.1} MB/s  {:>7.2} s  WAN {:>6.1}% of LAN  p99 {} us",
                run,
                fig.scenario,
                fig.throughput_mb_s,
                fig.wall_secs,
                100.0 * fig.wan_lan_ratio,
                fig.p99_us
            );
            all.push(fig);
        }
    }
    let pick = |s: &str, f: fn(&RunFigures) -> f64| {
        median(all.iter().filter(|r| r.scenario == s).map(f).collect())
    };
    println!(
        "\n{} stream(s) x {} MiB{}, WAN {} Mbit/s, {} ms one way, compress {}, {} run(s), medians:",
        args.streams,
        args.bytes >> 20,
        if args.concurrent { " (concurrent)" } else { "" },
        if args.rate_mbit > 0.0 {
            args.rate_mbit.to_string()
        } else {
            "unlimited".into()
        },
        args.delay_ms,
        args.compress,
        args.runs
    );
    println!(
        "{:<11} {:>10} {:>8} {:>14} {:>9} {:>8} {:>8} {:>8}",
        "scenario", "MB/s", "wall s", "WAN bytes", "WAN/LAN", "p50 us", "p99 us", "p999 us"
    );
    for s in ["relay pair", "edge pair"] {
        println!(
            "{:<11} {:>10.1} {:>8.2} {:>14.0} {:>8.1}% {:>8.0} {:>8.0} {:>8.0}",
            s,
            pick(s, |r| r.throughput_mb_s),
            pick(s, |r| r.wall_secs),
            pick(s, |r| (r.wan_forward_bytes + r.wan_reverse_bytes) as f64),
            100.0 * pick(s, |r| r.wan_lan_ratio),
            pick(s, |r| r.p50_us as f64),
            pick(s, |r| r.p99_us as f64),
            pick(s, |r| r.p999_us as f64),
        );
    }
    // Ratios pair by pair (run k of each), then their median.
    let relay: Vec<_> = all.iter().filter(|r| r.scenario == "relay pair").collect();
    let edge: Vec<_> = all.iter().filter(|r| r.scenario == "edge pair").collect();
    let thr = median(
        relay
            .iter()
            .zip(&edge)
            .map(|(a, b)| b.throughput_mb_s / a.throughput_mb_s)
            .collect(),
    );
    let lat = median(
        relay
            .iter()
            .zip(&edge)
            .map(|(a, b)| b.p99_us as f64 - a.p99_us as f64)
            .collect(),
    );
    let rss = median(
        edge.iter()
            .flat_map(|r| r.peak_rss_mib.iter().copied())
            .collect(),
    );
    println!("edge/relay throughput (median of per-run ratios): {thr:.3}");
    println!("edge p99 - relay p99 (median of per-run differences): {lat:.0} us");
    println!("edge peak RSS (median over edges and runs): {rss:.0} MiB");
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "args": format!("{args:?}"), "runs": all, "edge_over_relay_throughput": thr, "added_p99_us": lat });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
