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
    /// Each edge's chunk store (`--cache-mem`).
    #[arg(long, default_value = "2GiB")]
    pub cache_mem: String,
    /// Each edge's memory for delta bases (`--delta-mem`).
    #[arg(long, default_value = "512MiB")]
    pub delta_mem: String,
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
    /// Run the edges' tunnel without TLS (passes --insecure-plaintext to both).
    #[arg(long)]
    pub plaintext: bool,
    /// Write bar charts (SVG) of throughput, WAN bytes and round-trip latency
    /// percentiles, relay pair vs edge pair (medians), here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write all figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Give up after this many seconds in total.
    #[arg(long, default_value_t = 1200)]
    pub timeout_secs: u64,
}

/// `n` bytes as the largest whole binary unit (e.g. 256MiB), for titles.
fn fmt_size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
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
    n.checked_mul(m)
        .ok_or_else(|| format!("size {s:?} is too large"))
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
    /// (forward + reverse) / LAN bytes.
    pub wan_lan_ratio: f64,
    /// forward / LAN bytes.
    pub wan_forward_lan_ratio: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Connect plus the first round trip of the latency connection, µs.
    pub first_rtt_us: u64,
    /// Peak RSS (VmHWM) of the sending edge A, MiB (edge pair only).
    pub edge_a_peak_rss_mib: Option<f64>,
    /// Peak RSS of the receiving edge B (it holds the chunk store), MiB.
    pub edge_b_peak_rss_mib: Option<f64>,
}

/// Child processes, killed (and reaped) on drop, so an error, a timeout or Ctrl-C
/// never leaves a hop behind.
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
    /// Fails if a hop already exited (a bad flag, a port in use): its log says why.
    fn check_alive(&mut self, dir: &Path) -> anyhow::Result<()> {
        for c in &mut self.0 {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "a hop (pid {}) exited early with {status}; see the logs in {}",
                    c.id(),
                    dir.display()
                );
            }
        }
        Ok(())
    }
}

/// Peak resident memory (VmHWM) of a live process, MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The scratch directory (certificates, hop logs, shaper counters): removed on drop
/// after a successful benchmark, kept (and named) after a failure for its logs.
struct ScratchDir {
    path: PathBuf,
    ok: bool,
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if self.ok {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            eprintln!("hop logs kept in {}", self.path.display());
        }
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

/// Waits until `addr` accepts connections, failing early if a hop died.
async fn wait_port(addr: SocketAddr, procs: &mut Procs, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        procs.check_alive(dir)?;
        if Instant::now() > deadline {
            bail!(
                "nothing listens on {addr} after 20 s; see the logs in {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the sink must answer for a stream: its BLAKE3 (32 B) and length (8 B, BE).
fn expected_reply(data: &[u8]) -> [u8; 40] {
    let mut e = [0u8; 40];
    e[..32].copy_from_slice(blake3::hash(data).as_bytes());
    e[32..].copy_from_slice(&(data.len() as u64).to_be_bytes());
    e
}

/// Sends one stream; the sink's hash and length must match `expect`.
async fn send_stream(
    front: SocketAddr,
    index: usize,
    data: &[u8],
    expect: &[u8; 40],
) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(front)
        .await
        .with_context(|| format!("stream {index}: connecting to {front}"))?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.split();
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
    sent.with_context(|| format!("stream {index}: sending"))?;
    let reply = reply.with_context(|| format!("stream {index}: waiting for the sink"))?;
    if reply[..] != expect[..] {
        let got_len = reply
            .get(32..40)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
        bail!(
            "MISMATCH on stream {index}: sent {} bytes with BLAKE3 {}, the sink got {} with {}: the path corrupted or lost data",
            data.len(),
            hex32(&expect[..32]),
            got_len.map_or("nothing (connection closed early)".to_string(), |n| format!("{n} bytes")),
            reply.get(..32).map_or("-".to_string(), hex32),
        );
    }
    Ok(())
}

fn hex32(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The latency test: one connection; the first round trip (which also carries the
/// connection's setup through every hop) is timed on its own from the connect, then
/// `n` round trips of 64 bytes on the established connection go in the histogram.
async fn pings(front: SocketAddr, n: u32) -> anyhow::Result<(u64, Histogram<u64>)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(front)
        .await
        .with_context(|| format!("ping connection to {front}"))?;
    s.set_nodelay(true)?;
    s.write_all(b"P").await?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut msg = [7u8; 64];
    let mut first_us = 0;
    for i in 0..=n {
        msg[..4].copy_from_slice(&i.to_be_bytes());
        let t_i = Instant::now();
        s.write_all(&msg).await?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back).await?;
        if back != msg {
            bail!("ping {i} came back different");
        }
        if i == 0 {
            first_us = t.elapsed().as_micros() as u64;
        } else {
            h.record(t_i.elapsed().as_micros().max(1) as u64)?;
        }
    }
    Ok((first_us, h))
}

/// The shaper's counters (forward, reverse bytes) from its stats file.
fn read_shaper(path: &Path) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the shaper's counters {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing the shaper's counters {}", path.display()))?;
    match (v["forward_bytes"].as_u64(), v["reverse_bytes"].as_u64()) {
        (Some(f), Some(r)) => Ok((f, r)),
        _ => bail!("{}: no forward_bytes/reverse_bytes", path.display()),
    }
}

struct Env {
    me: PathBuf,
    shrinker: PathBuf,
    dir: PathBuf,
    sink: SocketAddr,
}

/// The loopback address of run `run`'s hops: a fresh IP per run and scenario, so no
/// listener ever meets the TIME_WAIT leftovers of the previous one, on ports below
/// the ephemeral range, so an outbound connection never takes one of them.
fn hop_ip(run: u32, edge: bool) -> String {
    let net = 10 + (run * 2 + u32::from(edge)) % 240;
    format!("127.0.77.{net}")
}

async fn run_one(
    env: &Env,
    args: &PairArgs,
    edge: bool,
    run: u32,
    streams: &[(Vec<u8>, [u8; 40])],
) -> anyhow::Result<RunFigures> {
    let scenario = if edge { "edge pair" } else { "relay pair" };
    let ip = hop_ip(run, edge);
    let addr = |port: u16| -> SocketAddr { format!("{ip}:{port}").parse().expect("address") };
    let (front, shaper, back) = (addr(21001), addr(21002), addr(21003));
    let stats = env.dir.join(format!("shaper-{run}-{edge}.json"));
    let _ = std::fs::remove_file(&stats);
    let mut procs = Procs(Vec::new());
    let (mut pid_a, mut pid_b) = (None, None);
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
        let common = [
            "--cache-mem",
            args.cache_mem.as_str(),
            "--delta-mem",
            args.delta_mem.as_str(),
            "--compress",
            args.compress.as_str(),
        ];
        procs.0.push(spawn(
            Command::new(&env.shrinker)
                .args(["edge", "--name", "b", "--tunnel-listen", &back.to_string()])
                .args(common)
                .args(tls("b")),
            &env.dir.join("edge-b.log"),
        )?);
        pid_b = Some(procs.0.last().expect("pushed").id());
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
        pid_a = Some(procs.0.last().expect("pushed").id());
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
        wait_port(a, &mut procs, &env.dir).await?;
    }
    // A warm-up ping makes sure the whole path is up; then take the byte baseline
    // (the shaper writes its counters every 200 ms).
    pings(front, 5).await?;
    tokio::time::sleep(Duration::from_millis(450)).await;
    procs.check_alive(&env.dir)?;
    let (f0, r0) = read_shaper(&stats)?;
    let started = Instant::now();
    if args.concurrent {
        let jobs: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(i, (d, e))| send_stream(front, i, d, e))
            .collect();
        for r in futures_all(jobs).await {
            r?;
        }
    } else {
        for (i, (d, e)) in streams.iter().enumerate() {
            send_stream(front, i, d, e).await?;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    // WAN bytes of the bulk streams alone: read before the latency test.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (f1, r1) = read_shaper(&stats)?;
    let (first_rtt_us, hist) = pings(front, args.pings).await?;
    let lan: u64 = streams.iter().map(|s| s.0.len() as u64).sum();
    let fig = RunFigures {
        scenario,
        run,
        lan_bytes: lan,
        wall_secs: wall,
        throughput_mb_s: lan as f64 / wall / 1e6,
        wan_forward_bytes: f1 - f0,
        wan_reverse_bytes: r1 - r0,
        wan_lan_ratio: (f1 - f0 + r1 - r0) as f64 / lan as f64,
        wan_forward_lan_ratio: (f1 - f0) as f64 / lan as f64,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        first_rtt_us,
        edge_a_peak_rss_mib: pid_a.and_then(peak_rss_mib),
        edge_b_peak_rss_mib: pid_b.and_then(peak_rss_mib),
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

/// Medians of one scenario over its runs.
#[derive(Clone, Debug, Serialize)]
pub struct Medians {
    pub scenario: &'static str,
    pub runs: usize,
    pub throughput_mb_s: f64,
    pub wall_secs: f64,
    pub wan_bytes: f64,
    pub wan_lan_ratio: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub first_rtt_us: f64,
    pub edge_a_peak_rss_mib: Option<f64>,
    pub edge_b_peak_rss_mib: Option<f64>,
}

fn medians(all: &[RunFigures], scenario: &'static str) -> Medians {
    let runs: Vec<&RunFigures> = all.iter().filter(|r| r.scenario == scenario).collect();
    let m = |f: fn(&RunFigures) -> f64| median(runs.iter().map(|r| f(r)).collect());
    let rss = |f: fn(&RunFigures) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
        (!v.is_empty()).then(|| median(v))
    };
    Medians {
        scenario,
        runs: runs.len(),
        throughput_mb_s: m(|r| r.throughput_mb_s),
        wall_secs: m(|r| r.wall_secs),
        wan_bytes: m(|r| (r.wan_forward_bytes + r.wan_reverse_bytes) as f64),
        wan_lan_ratio: m(|r| r.wan_lan_ratio),
        p50_us: m(|r| r.p50_us as f64),
        p99_us: m(|r| r.p99_us as f64),
        p999_us: m(|r| r.p999_us as f64),
        max_us: m(|r| r.max_us as f64),
        first_rtt_us: m(|r| r.first_rtt_us as f64),
        edge_a_peak_rss_mib: rss(|r| r.edge_a_peak_rss_mib),
        edge_b_peak_rss_mib: rss(|r| r.edge_b_peak_rss_mib),
    }
}

/// Bytes the kernel says are available (MemAvailable), if readable.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs the benchmark and prints the table.
pub async fn run(args: PairArgs) -> anyhow::Result<()> {
    if args.streams == 0 || args.bytes == 0 || args.runs == 0 {
        bail!("--streams, --bytes and --runs must be at least 1");
    }
    if !["off", "auto", "always"].contains(&args.compress.as_str()) {
        bail!("--compress must be off, auto or always");
    }
    if !(args.rate_mbit >= 0.0 && args.delay_ms >= 0.0 && args.delay_ms <= 10_000.0) {
        bail!("--rate-mbit must be >= 0 and --delay-ms between 0 and 10000");
    }
    let me = std::env::current_exe()?;
    let shrinker = args
        .shrinker
        .clone()
        .unwrap_or_else(|| me.with_file_name("shrinker"));
    if !shrinker.exists() {
        bail!("{} not found: build it with `cargo build --release -p shrinker-proxy` or pass --shrinker", shrinker.display());
    }
    // The streams are generated once, before any timing, and held in memory (the
    // generator would otherwise compete for the CPU with the hops being measured).
    let total = args
        .bytes
        .checked_mul(args.streams)
        .context("--bytes x --streams overflows")?;
    if let Some(avail) = mem_available() {
        if total > avail / 2 {
            bail!(
                "{total} bytes of streams do not fit in half the available memory ({avail} bytes): lower --bytes or --streams"
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("shrinker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut scratch = ScratchDir {
        path: dir.clone(),
        ok: false,
    };
    let out = Command::new(&shrinker)
        .args(["certs", "--out"])
        .arg(dir.join("pki"))
        .args(["a", "b"])
        .output()
        .with_context(|| format!("running {} certs", shrinker.display()))?;
    if !out.status.success() {
        bail!(
            "shrinker certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sink_addr: SocketAddr = "127.0.77.1:21004".parse()?;
    let sink_task = tokio::spawn(sink(
        TcpListener::bind(sink_addr)
            .await
            .with_context(|| format!("binding the sink on {sink_addr}"))?,
    ));
    let env = Env {
        me,
        shrinker,
        dir: dir.clone(),
        sink: sink_addr,
    };

    let pool = args.pool.unwrap_or((total / 4).max(1 << 20));
    eprintln!(
        "generating {} stream(s) of {} MiB (shared pool {} MiB)...",
        args.streams,
        args.bytes >> 20,
        pool >> 20
    );
    let t = Instant::now();
    let w = testkit::Workload::cluster(2026, pool);
    let streams: Vec<(Vec<u8>, [u8; 40])> = (0..args.streams)
        .map(|i| {
            let data = w.stream(i, args.bytes).collect_all();
            let expect = expected_reply(&data);
            (data, expect)
        })
        .collect();
    eprintln!("generated in {:.1} s", t.elapsed().as_secs_f64());

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut all = Vec::new();
    for run in 0..args.runs {
        // Alternate which scenario goes first, so drift hits both alike.
        let order = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for edge in order {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "out of time (--timeout-secs {}) after {} run(s)",
                    args.timeout_secs,
                    all.len()
                );
            }
            eprintln!(
                "run {}/{} {}...",
                run + 1,
                args.runs,
                if edge { "edge pair" } else { "relay pair" }
            );
            // Dropping run_one (timeout, Ctrl-C) kills its hops.
            let fig = tokio::select! {
                r = tokio::time::timeout(left, run_one(&env, &args, edge, run, &streams)) => {
                    r.context("benchmark timed out (--timeout-secs)")??
                }
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            };
            eprintln!(
                "run {}/{} {:<10}: {:>8.1} MB/s  {:>7.2} s  WAN {:>6.1}% of LAN  p50 {} us  p99 {} us{}",
                run + 1,
                args.runs,
                fig.scenario,
                fig.throughput_mb_s,
                fig.wall_secs,
                100.0 * fig.wan_lan_ratio,
                fig.p50_us,
                fig.p99_us,
                match (fig.edge_a_peak_rss_mib, fig.edge_b_peak_rss_mib) {
                    (Some(a), Some(b)) => format!("  peak RSS A {a:.0} MiB, B {b:.0} MiB"),
                    _ => String::new(),
                }
            );
            all.push(fig);
        }
    }
    sink_task.abort();
    let relay_m = medians(&all, "relay pair");
    let edge_m = medians(&all, "edge pair");
    println!(
        "\n{} stream(s) x {} MiB{}, WAN {}, {} ms one way, compress {}{}, {} run(s), medians:",
        args.streams,
        args.bytes >> 20,
        if args.concurrent {
            " (concurrent)"
        } else {
            " (sequential)"
        },
        if args.rate_mbit > 0.0 {
            format!("{} Mbit/s", args.rate_mbit)
        } else {
            "unlimited".into()
        },
        args.delay_ms,
        args.compress,
        if args.plaintext {
            ", plaintext tunnel"
        } else {
            ", mutual TLS"
        },
        args.runs
    );
    println!(
        "{:<11} {:>10} {:>8} {:>14} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "scenario",
        "MB/s",
        "wall s",
        "WAN bytes",
        "WAN/LAN",
        "p50 us",
        "p99 us",
        "p999 us",
        "max us",
        "1st RT us"
    );
    for m in [&relay_m, &edge_m] {
        println!(
            "{:<11} {:>10.1} {:>8.2} {:>14.0} {:>8.1}% {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0}",
            m.scenario,
            m.throughput_mb_s,
            m.wall_secs,
            m.wan_bytes,
            100.0 * m.wan_lan_ratio,
            m.p50_us,
            m.p99_us,
            m.p999_us,
            m.max_us,
            m.first_rtt_us,
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
    println!("edge/relay throughput (median of per-run ratios): {thr:.3}");
    println!("edge p99 - relay p99 (median of per-run differences): {lat:.0} us");
    if let (Some(a), Some(b)) = (edge_m.edge_a_peak_rss_mib, edge_m.edge_b_peak_rss_mib) {
        println!("edge peak RSS (medians): A (sender) {a:.0} MiB, B (receiver, holds the store) {b:.0} MiB");
    }
    if let Some(path) = &args.svg {
        let both = |f: &dyn Fn(&Medians) -> f64| -> Vec<(String, f64)> {
            [&relay_m, &edge_m]
                .iter()
                .map(|m| (m.scenario.to_string(), f(m)))
                .collect()
        };
        let mut latency = Vec::new();
        for (q, f) in [
            ("p50", (|m: &Medians| m.p50_us) as fn(&Medians) -> f64),
            ("p99", |m: &Medians| m.p99_us),
            ("p999", |m: &Medians| m.p999_us),
        ] {
            for m in [&relay_m, &edge_m] {
                latency.push((format!("{} {q}", m.scenario), f(m)));
            }
        }
        let title = format!(
            "{} x {} streams{}, WAN {}, compress {}, medians of {} runs",
            fmt_size(args.bytes),
            args.streams,
            if args.concurrent { " (concurrent)" } else { "" },
            if args.rate_mbit > 0.0 {
                format!("{} Mbit/s + {} ms", args.rate_mbit, args.delay_ms)
            } else {
                "unlimited".into()
            },
            args.compress,
            args.runs
        );
        std::fs::write(
            path,
            crate::chart::bar_charts(
                &title,
                &[
                    (
                        "throughput (MB/s, LAN side)",
                        both(&|m| m.throughput_mb_s).as_slice(),
                    ),
                    ("WAN bytes (MB)", both(&|m| m.wan_bytes / 1e6).as_slice()),
                    ("64-byte round trip (us)", latency.as_slice()),
                ],
            ),
        )?;
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "args": {
                "bytes": args.bytes,
                "streams": args.streams,
                "concurrent": args.concurrent,
                "pool": pool,
                "rate_mbit": args.rate_mbit,
                "delay_ms": args.delay_ms,
                "compress": args.compress,
                "pings": args.pings,
                "runs": args.runs,
                "plaintext": args.plaintext,
            },
            "runs": all,
            "medians": [relay_m, edge_m],
            "edge_over_relay_throughput": thr,
            "added_p99_us": lat,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    scratch.ok = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_format_for_titles() {
        assert_eq!(fmt_size(256 << 20), "256MiB");
        assert_eq!(fmt_size(1 << 30), "1GiB");
        assert_eq!(fmt_size(4096), "4KiB");
        assert_eq!(fmt_size(1000), "1000B");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn medians_and_addresses() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
        // Every run and scenario gets its own loopback IP, never the sink's.
        let mut seen = std::collections::HashSet::new();
        for run in 0..100 {
            for edge in [false, true] {
                let ip = hop_ip(run, edge);
                assert!(ip.starts_with("127.0.77.") && ip != "127.0.77.1");
                assert!(seen.insert(ip));
            }
        }
    }

    #[test]
    fn expected_reply_is_hash_then_length() {
        let e = expected_reply(b"abc");
        assert_eq!(&e[..32], blake3::hash(b"abc").as_bytes());
        assert_eq!(u64::from_be_bytes(e[32..].try_into().unwrap()), 3);
    }
}
