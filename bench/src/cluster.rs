//! `shrinker-bench cluster`: a cluster of similar VMs migrated by real QEMU, one after
//! another or all at once (`--concurrent`), over the same emulated WAN link, through
//! each alternative a user could pick: directly, through a plain relay pair, through
//! the edge pair, through zstd-3 tunnels (plain, with `--long=27` long-range matching,
//! and one `--long=30` stream shared by all migrations), and QEMU's own multifd-zstd.
//! Reports WAN bytes and migration time side by side; every destination's RAM (and
//! disk) is compared with its source's.
//!
//! Each concurrent migration gets its own lane (entry, shaper port, far end,
//! destination); all lanes share the shaper's one rate-limited link.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering::Relaxed;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};
use testkit::wan_path::{in_namespace, LinkSpec, WanPath};

/// Options of `cluster`.
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// VMs in the cluster.
    #[arg(long, default_value_t = 4)]
    pub vms: u64,
    /// Guest RAM per VM, MiB.
    #[arg(long, default_value_t = 256)]
    pub ram_mib: u64,
    /// Shared page pool (OS-like content common to the VMs), MiB.
    #[arg(long, default_value_t = 96)]
    pub pool_mib: u64,
    /// WAN rate per direction, Mbit/s.
    #[arg(long, default_value_t = 300.0)]
    pub rate_mbit: f64,
    /// WAN one-way delay, ms.
    #[arg(long, default_value_t = 10.0)]
    pub delay_ms: f64,
    /// Scenarios, comma-separated: direct, relay (a plain TCP relay at each end of the
    /// link: the cost of two hops alone), lan (QEMU straight to QEMU on loopback, no
    /// link emulator and no WAN: the fastest any path can be on this machine), lan-relay
    /// (QEMU to QEMU through one plain relay, no link: the LAN-side copies every pair of
    /// hops pays, alone), edge, zstd3, zstd3-long27,
    /// zstd3-long30-shared (one zstd --long=30 stream carrying every migration in
    /// turn), qemu-multifd-zstd (QEMU's own multifd compression, direct over the link).
    #[arg(long, default_value = "direct,edge,zstd3,zstd3-long27")]
    pub scenarios: String,
    /// Share (in 1/1000) of the shared pages that are near-duplicates: the pool page
    /// with 1-4 words changed per VM (relocated pointers, counters).
    #[arg(long, default_value_t = 0)]
    pub near_permille: u32,
    /// Use these guest RAM images (comma-separated, one per VM, each exactly
    /// --ram-mib MiB) instead of generated memory, e.g. real booted guests saved by
    /// `SHRINKER_GUEST_RAM_OUT=DIR cargo test -p shrinker-proxy --test linux_guest`.
    #[arg(long, value_delimiter = ',')]
    pub ram_files: Vec<PathBuf>,
    /// Write bar charts of WAN bytes and migration time per scenario (SVG) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Migrate all VMs at once (each over its own connections, all over the one link)
    /// instead of one after another.
    #[arg(long)]
    pub concurrent: bool,
    /// Migrate with multifd and this many channels (0: off).
    #[arg(long, default_value_t = 0)]
    pub multifd: u32,
    /// Channels of qemu-multifd-zstd when --multifd is off: the other scenarios then
    /// migrate without multifd, so QEMU's own best is timed against them in one run.
    #[arg(long, default_value_t = 4)]
    pub multifd_zstd_channels: u32,
    /// Give each VM a disk of this many MiB, mirrored over NBD (drive-mirror) before
    /// its memory migrates (0: memory only). Disks share the pool's content.
    #[arg(long, default_value_t = 0)]
    pub disk_mib: u64,
    /// Edge compression mode.
    #[arg(long, default_value = "auto")]
    pub compress: String,
    /// Heap each edge touches before serving (the edge's `--prefault-mem`; not given:
    /// the edge's default).
    #[arg(long, value_name = "SIZE")]
    pub prefault_mem: Option<String>,
    /// qemu-system-x86_64 to run.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Firmware directory for that QEMU (`-L`), if not its default.
    #[arg(long)]
    pub firmware: Option<PathBuf>,
    /// The `shrinker` binary (default: beside this one).
    #[arg(long)]
    pub shrinker: Option<PathBuf>,
    /// Write all figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Emulate the WAN at the packet level instead of relaying connections: the source
    /// side (source QEMUs and the hops before the link) and the destination side run in
    /// two network namespaces joined by a link of --rate-mbit and --delay-ms with a
    /// router queue, so the hosts' own TCP sees the round trip (slow start, windows,
    /// socket-buffer limits, losses). Needs root and /dev/net/tun. WAN bytes are then
    /// the IP packets that crossed, headers included; `lan` and `lan-relay` have no
    /// link and are not run.
    #[arg(long)]
    pub packet_path: bool,
    /// With --packet-path: the router queue in front of the bottleneck, as the longest
    /// a packet may wait there (ms); packets that would wait longer are dropped.
    #[arg(long, default_value_t = 20.0)]
    pub queue_ms: f64,
    /// With --packet-path: packets lost at random, percent.
    #[arg(long, default_value_t = 0.0)]
    pub loss_pct: f64,
    /// With --packet-path: MTU of the path's interfaces.
    #[arg(long, default_value_t = 1500)]
    pub mtu: u16,
    /// With --packet-path: a sysctl set on both hosts (their namespaces) before the
    /// run, KEY=VALUE, repeatable: to weigh a host tuning, e.g.
    /// `net.ipv4.tcp_wmem="4096 16384 33554432"` or
    /// `net.ipv4.tcp_slow_start_after_idle=0`.
    #[arg(long, value_name = "KEY=VALUE")]
    pub host_sysctl: Vec<String>,
    /// With --packet-path: options added to both hosts' route across the path, as
    /// `ip route` takes them, e.g. "initcwnd 64 initrwnd 64".
    #[arg(long, value_name = "OPTIONS")]
    pub host_route: Option<String>,
    /// Copy the run's logs and counter files (each edge's, relay's, tunnel's and the
    /// link emulator's) into this directory before the scratch directory is removed,
    /// whether the run succeeded or failed.
    #[arg(long)]
    pub keep_logs: Option<PathBuf>,
}

/// Figures of one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioFigures {
    pub scenario: String,
    pub lan_bytes: u64,
    pub wan_forward_bytes: u64,
    pub wan_reverse_bytes: u64,
    /// Each VM's migration, from `migrate` (or its disk mirror) to the destination's
    /// completion.
    pub migration_secs: Vec<f64>,
    /// The cluster's migration time: the sum of `migration_secs` when sequential,
    /// first start to last finish when concurrent.
    pub migrate_secs: f64,
    /// The whole scenario by the wall clock, VM start-up and RAM checks included.
    pub total_secs: f64,
    /// The sending edge's counters at the end (scenario `edge`).
    pub edge_counters: Option<Value>,
    /// CPU seconds (user + system) used by the scenario's hops on either side of the
    /// link (edges, relays, zstd tunnels; not the link emulator), over the scenario.
    pub path_cpu_secs: f64,
    /// CPU seconds used by the source and destination QEMUs during the migrations.
    pub qemu_cpu_secs: f64,
    /// CPU seconds used by the link emulator over the scenario (it shares the
    /// machine's cores with everything else).
    pub link_cpu_secs: f64,
}

struct Procs(Vec<Child>);

impl Procs {
    /// CPU seconds used so far by these processes (those still running).
    fn cpu_secs(&self) -> f64 {
        self.0.iter().map(|c| cpu_secs(c.id())).sum()
    }

    /// Fails if any of these processes has exited (their logs are in `dir`).
    fn ensure_running(&mut self, dir: &Path) -> anyhow::Result<()> {
        for c in &mut self.0 {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "a path process (pid {}) exited at start-up with {status}; see the logs in {}",
                    c.id(),
                    dir.display()
                );
            }
        }
        Ok(())
    }
}

/// CPU seconds (user + system) process `pid` has used, from /proc (0 when gone).
/// /proc counts in clock ticks of 1/100 s (USER_HZ, 100 on Linux's usual targets).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces, inside parentheses):
    // state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(14) + ticks(15)) as f64 / 100.0
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => bail!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn cmd(&mut self, name: &str, args: Value) -> anyhow::Result<Value> {
        writeln!(self.w, "{}", json!({"execute": name, "arguments": args}))?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("QMP closed during {name}");
            }
            let v: Value = serde_json::from_str(&line)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {e}");
            }
        }
    }
}

fn qemu(
    args: &ClusterArgs,
    env: &Env,
    name: &str,
    ram: &Path,
    incoming: bool,
    disk: Option<(&Path, bool)>,
) -> anyhow::Result<(Child, Qmp)> {
    let dir = &env.dir;
    let qmp = dir.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&qmp);
    // The source on the near side of the link, the destination on the far side.
    let side = if incoming { Side::Far } else { Side::Near };
    let mut c = env.command(side, &args.qemu);
    if let Some(fw) = &args.firmware {
        c.arg("-L").arg(fw);
    }
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-smp",
        "1",
        "-accel",
        "tcg",
        "-S",
    ])
    .args(["-machine", "pc,memory-backend=pc.ram"])
    .arg("-m")
    .arg(format!("{}M", args.ram_mib))
    .arg("-object")
    .arg(format!(
        "memory-backend-file,id=pc.ram,size={}M,mem-path={},share=on",
        args.ram_mib,
        ram.display()
    ))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    // The destination is an incoming VM: its device does not hold write permission
    // until the migration completes, so its disk can be an NBD export meanwhile.
    if let Some((path, device)) = disk {
        c.arg("-drive")
            .arg(format!("if=none,id=d0,file={},format=raw", path.display()));
        if device {
            c.args(["-device", "virtio-blk-pci,drive=d0"]);
        }
    }
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()
        .with_context(|| format!("starting {}", args.qemu.display()))?;
    let q = Qmp::connect(&qmp)?;
    Ok((child, q))
}

/// Waits until something listens on `addr`, without connecting: a probe connection
/// would travel the whole path and be taken by the destination QEMU as its migration.
fn wait_port(env: &Env, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.listening(addr) {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Reads `tcp_table` (/proc/net/tcp) for a LISTEN socket bound to `addr` (IPv4).
fn is_listening(tcp_table: &str, addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    tcp_table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1] == want && f[3] == "0A"
    })
}

fn shaper_bytes(path: &Path) -> (u64, u64) {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map(|v| {
            (
                v["forward_bytes"].as_u64().unwrap_or(0),
                v["reverse_bytes"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or((0, 0))
}

fn spawn(cmd: &mut Command, log: PathBuf) -> anyhow::Result<Child> {
    Ok(cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?)
}

/// The addresses one migration travels through: the source QEMU connects to the
/// scenario's entry (`front`, or `shaper` when nothing sits before the link), `back`
/// is the far end of the link, `dst` the destination QEMU's incoming socket.
#[derive(Clone, Copy, Debug)]
struct Lane {
    front: SocketAddr,
    shaper: SocketAddr,
    back: SocketAddr,
    dst: SocketAddr,
}

/// `n` lanes on scenario `index`'s own loopback address (a scenario's sockets in
/// TIME_WAIT never collide with the next one's). Across a packet path, the near
/// side's addresses are its host's and the far side's the other host's, each
/// scenario on its own ports (there is no shaper hop).
fn lanes(env: &Env, index: u8, n: u64) -> Vec<Lane> {
    let (near, far, base) = match &env.path {
        Some(p) => (
            p.west.to_string(),
            p.east.to_string(),
            22000 + 100 * u64::from(index),
        ),
        None => {
            let ip = format!("127.0.78.{}", 10 + index);
            (ip.clone(), ip, 22000)
        }
    };
    let a = |ip: &str, p: u64| -> SocketAddr { format!("{ip}:{p}").parse().expect("address") };
    (0..n)
        .map(|i| {
            let base = base + 10 * i;
            Lane {
                front: a(&near, base + 1),
                shaper: a(&near, base + 2),
                back: a(&far, base + 3),
                dst: a(&far, base + 4),
            }
        })
        .collect()
}

/// `--listen L --to T` for each pair: the lanes of a shaper, relay or zstd hop.
fn lane_args(pairs: impl IntoIterator<Item = (SocketAddr, SocketAddr)>) -> Vec<String> {
    pairs
        .into_iter()
        .flat_map(|(l, t)| {
            [
                "--listen".into(),
                l.to_string(),
                "--to".into(),
                t.to_string(),
            ]
        })
        .collect()
}

/// Starts the scenario's hops around the shaped link; returns each lane's entry (where
/// the source QEMU connects).
fn start_path(
    args: &ClusterArgs,
    env: &Env,
    scenario: &str,
    lanes: &[Lane],
    stats: &Path,
    procs: &mut Procs,
    link: &mut Procs,
) -> anyhow::Result<Vec<SocketAddr>> {
    // The link to each lane's `to`; returns where the near side sends to cross it: the
    // shaper's port, or across a packet path `to` itself (the path is the network).
    let mut link_to = |to: &dyn Fn(&Lane) -> SocketAddr| -> anyhow::Result<Vec<SocketAddr>> {
        if env.path.is_some() {
            return Ok(lanes.iter().map(to).collect());
        }
        link.0.push(spawn(
            Command::new(&env.me)
                .arg("shaper")
                .args(lane_args(lanes.iter().map(|l| (l.shaper, to(l)))))
                .args(env.link(stats)),
            env.dir.join("shaper.log"),
        )?);
        Ok(lanes.iter().map(|l| l.shaper).collect())
    };
    let fronts = lanes.iter().map(|l| l.front).collect();
    if env.path.is_some() && scenario.starts_with("lan") {
        bail!("{scenario} has no link: run it without --packet-path");
    }
    match scenario {
        // No link at all: what QEMU itself takes here, the floor of every scenario.
        "lan" => Ok(lanes.iter().map(|l| l.dst).collect()),
        // One plain relay between the QEMUs, no link: the LAN-side reads and writes
        // every path of hops pays (a sending edge reads the whole stream from the
        // source QEMU, a receiving edge writes it all to the destination), alone.
        "lan-relay" => {
            procs.0.push(spawn(
                Command::new(&env.me)
                    .arg("relay")
                    .args(lane_args(lanes.iter().map(|l| (l.front, l.dst)))),
                env.dir.join("relay-lan.log"),
            )?);
            Ok(fronts)
        }
        "direct" | "qemu-multifd-zstd" => link_to(&|l| l.dst),
        "relay" => {
            let crossings = link_to(&|l| l.back)?;
            for (i, side, pairs) in [
                (
                    0,
                    Side::Far,
                    lanes.iter().map(|l| (l.back, l.dst)).collect::<Vec<_>>(),
                ),
                (
                    1,
                    Side::Near,
                    lanes.iter().map(|l| l.front).zip(crossings).collect(),
                ),
            ] {
                procs.0.push(spawn(
                    env.command(side, &env.me)
                        .arg("relay")
                        .args(lane_args(pairs)),
                    env.dir.join(format!("relay-{i}.log")),
                )?);
            }
            Ok(fronts)
        }
        "edge" => {
            // One tunnel listener on the far side; every lane's shaper leads to it.
            let tunnel = lanes[0].back;
            let crossings = link_to(&|_| tunnel)?;
            let pki = env.dir.join("pki");
            let tls = |n: &str| {
                vec![
                    "--tls-ca".to_string(),
                    pki.join("ca.crt").display().to_string(),
                    "--tls-cert".into(),
                    pki.join(format!("{n}.crt")).display().to_string(),
                    "--tls-key".into(),
                    pki.join(format!("{n}.key")).display().to_string(),
                ]
            };
            let mut common = vec!["--cache-mem", "4GiB", "--compress", &args.compress];
            if let Some(size) = &args.prefault_mem {
                common.extend(["--prefault-mem", size.as_str()]);
            }
            let stats_of = |n: &str| {
                let path = env.dir.join(format!("edge-{n}.json"));
                let _ = std::fs::remove_file(&path);
                let path = path.display().to_string();
                [
                    "--stats-json".to_string(),
                    path,
                    "--stats-interval".into(),
                    "0.2".into(),
                ]
            };
            procs.0.push(spawn(
                env.command(Side::Far, &env.shrinker)
                    .args([
                        "edge",
                        "--name",
                        "b",
                        "--tunnel-listen",
                        &tunnel.to_string(),
                    ])
                    .args(&common)
                    .args(stats_of("b"))
                    .args(tls("b")),
                env.dir.join("edge-b.log"),
            )?);
            let forwards = lanes.iter().zip(crossings).flat_map(|(l, crossing)| {
                [
                    "--forward".to_string(),
                    format!("{}={}={}", l.front, crossing, l.dst),
                ]
            });
            procs.0.push(spawn(
                env.command(Side::Near, &env.shrinker)
                    .args(["edge", "--name", "a"])
                    .args(forwards)
                    .args(&common)
                    .args(stats_of("a"))
                    .args(tls("a")),
                env.dir.join("edge-a.log"),
            )?);
            Ok(fronts)
        }
        "zstd3" | "zstd3-long27" | "zstd3-long30-shared" => {
            let long = match scenario {
                "zstd3" => "0",
                "zstd3-long27" => "27",
                _ => "30",
            };
            let shared: &[&str] = if scenario == "zstd3-long30-shared" {
                if args.multifd > 0 {
                    // One stream serves one connection at a time, and a multifd
                    // migration needs all its channels at once.
                    bail!("{scenario} cannot carry multifd migrations (--multifd)");
                }
                &["--shared"]
            } else {
                &[]
            };
            let crossings = link_to(&|l| l.back)?;
            for (mode, side, pairs) in [
                (
                    "decompress",
                    Side::Far,
                    lanes.iter().map(|l| (l.back, l.dst)).collect::<Vec<_>>(),
                ),
                (
                    "compress",
                    Side::Near,
                    lanes.iter().map(|l| l.front).zip(crossings).collect(),
                ),
            ] {
                procs.0.push(spawn(
                    env.command(side, &env.me)
                        .args(["ztunnel", "--mode", mode, "--long", long])
                        .args(lane_args(pairs))
                        .args(shared),
                    env.dir.join(format!("z{mode}.log")),
                )?);
            }
            Ok(fronts)
        }
        other => bail!("unknown scenario {other:?}"),
    }
}

fn run_scenario(
    args: &ClusterArgs,
    env: &Env,
    scenario: &str,
    index: u8,
) -> anyhow::Result<ScenarioFigures> {
    if multifd_channels(args, scenario) == 0 && scenario == "qemu-multifd-zstd" {
        bail!("qemu-multifd-zstd needs --multifd-zstd-channels of at least 1");
    }
    let lanes = lanes(env, index, if args.concurrent { args.vms } else { 1 });
    let stats = env.dir.join(format!("shaper-{scenario}.json"));
    // The hops (their CPU time is the path's cost) and the link emulator, apart.
    let mut procs = Procs(Vec::new());
    let mut link = Procs(Vec::new());
    let entries = start_path(args, env, scenario, &lanes, &stats, &mut procs, &mut link)?;
    // Wait for what the scenario started: the link's listeners, and the entry when a
    // hop or the link is in front of the destination (with neither, the entry is the
    // destination QEMU, which listens only once asked to).
    for (lane, entry) in lanes.iter().zip(&entries) {
        if !link.0.is_empty() {
            wait_port(env, lane.shaper)?;
        }
        if !(procs.0.is_empty() && link.0.is_empty()) {
            wait_port(env, *entry)?;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // A hop that could not start (its port taken, say by a leftover of another run)
    // must fail the scenario, not let that leftover carry it.
    procs.ensure_running(&env.dir)?;
    link.ensure_running(&env.dir)?;
    let (f0, r0) = env.link_bytes(&stats);
    let path_cpu_at_start = procs.cpu_secs();
    let link_cpu_at_start = link.cpu_secs() + env.path_cpu_secs();
    let started = Instant::now();
    let mut done = Vec::new();
    if args.concurrent {
        // Every VM ready first, then all migrations at once over the one link.
        let mut vms = Vec::new();
        for vm in 0..args.vms {
            let l = vm as usize;
            vms.push(prepare_vm(args, env, vm, lanes[l], entries[l])?);
        }
        let results: Vec<anyhow::Result<Migrated>> = std::thread::scope(|s| {
            let handles: Vec<_> = vms
                .iter_mut()
                .map(|v| s.spawn(|| migrate_vm(args, scenario, v)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
                })
                .collect()
        });
        for (v, r) in vms.into_iter().zip(results) {
            let m = r?;
            check_vm(scenario, v)?;
            done.push(m);
        }
    } else {
        for vm in 0..args.vms {
            let mut v = prepare_vm(args, env, vm, lanes[0], entries[0])?;
            let m = migrate_vm(args, scenario, &mut v)?;
            check_vm(scenario, v)?;
            done.push(m);
        }
    }
    let total = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let (f1, r1) = env.link_bytes(&stats);
    // Where the sending edge's bytes went (its snapshot is at most 200 ms old).
    let edge_counters = (scenario == "edge")
        .then(|| counters_of(&env.dir, "a"))
        .flatten();
    if let Some(c) = &edge_counters {
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        eprintln!(
            "  edge A sent: {} new chunks ({} B), {} refs ({} recent, {} in runs), {} deltas ({} B of patches, {} zstd), {} word chunks, {} branch chunks, {} literal B; {} batches raw, {} compressed (mean level {:.2}), {} of them streamed, {} in spare time",
            n("chunks_sent"),
            n("chunk_bytes"),
            n("refs_sent"),
            n("refs_recent_sent"),
            n("group_refs_sent"),
            n("deltas_sent"),
            n("delta_patch_bytes"),
            n("zstd_deltas_sent"),
            n("word_chunks_sent"),
            n("branch_chunks_sent"),
            n("literal_bytes"),
            n("batches_raw"),
            n("batches_compressed"),
            n("batch_level_sum") as f64 / n("batches_compressed").max(1) as f64,
            n("batches_streamed"),
            n("spare_batches"),
        );
    }
    if scenario == "edge" {
        let b = counters_of(&env.dir, "b").unwrap_or_default();
        let n = |k: &str| b[k].as_u64().unwrap_or(0);
        eprintln!(
            "  edge B: {} references waited for a chunk on a sibling connection ({} arrived in time), {} misses sent",
            n("refs_deferred"),
            n("refs_deferred_arrived"),
            n("misses_sent"),
        );
    }
    let path_cpu_secs = procs.cpu_secs() - path_cpu_at_start;
    let link_cpu_secs = link.cpu_secs() + env.path_cpu_secs() - link_cpu_at_start;
    drop(procs);
    drop(link);
    let times: Vec<f64> = done
        .iter()
        .map(|m| m.end.duration_since(m.start).as_secs_f64())
        .collect();
    // Sequential: the migrations' sum (VM start-up and checks between them left out);
    // concurrent: first start to last finish.
    let migrate_secs = if args.concurrent {
        let first = done.iter().map(|m| m.start).min();
        let last = done.iter().map(|m| m.end).max();
        first
            .zip(last)
            .map_or(0.0, |(a, b)| b.duration_since(a).as_secs_f64())
    } else {
        times.iter().sum()
    };
    Ok(ScenarioFigures {
        scenario: scenario.to_string(),
        lan_bytes: done.iter().map(|m| m.lan_bytes).sum(),
        wan_forward_bytes: f1 - f0,
        wan_reverse_bytes: r1 - r0,
        migration_secs: times,
        migrate_secs,
        total_secs: total,
        edge_counters,
        path_cpu_secs,
        qemu_cpu_secs: done.iter().map(|m| m.qemu_cpu_secs).sum(),
        link_cpu_secs,
    })
}

/// The counters of edge `name` from its last stats snapshot in `dir`.
fn counters_of(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(format!("edge-{name}.json"))).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    Some(v["counters"].clone())
}

/// A VM pair ready to migrate: source running its RAM image, destination waiting.
struct VmRun {
    vm: u64,
    lane: Lane,
    entry: SocketAddr,
    sq: Qmp,
    dq: Qmp,
    src_ram: PathBuf,
    dst_ram: PathBuf,
    /// Source and destination disk images, when the VMs have disks.
    disks: Option<(PathBuf, PathBuf)>,
    /// Killed on drop, so a failed migration leaves no VM (or busy port) behind.
    procs: Procs,
}

/// What one migration took.
struct Migrated {
    start: Instant,
    end: Instant,
    lan_bytes: u64,
    /// CPU seconds both QEMUs used from start to end.
    qemu_cpu_secs: f64,
}

fn prepare_vm(
    args: &ClusterArgs,
    env: &Env,
    vm: u64,
    lane: Lane,
    entry: SocketAddr,
) -> anyhow::Result<VmRun> {
    let src_ram = env.ram(vm);
    let dst_ram = PathBuf::from(format!(
        "/dev/shm/shrinker-bench-dst-{}-{vm}",
        std::process::id()
    ));
    std::fs::File::create(&dst_ram)?.set_len(args.ram_mib << 20)?;
    let disks = if args.disk_mib > 0 {
        let src_disk = env.dir.join(format!("src-disk-{vm}.raw"));
        if !src_disk.exists() {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&src_disk)?);
            let mut st = testkit::Workload::cluster(2026, args.pool_mib << 20)
                .with_near_duplicates(args.near_permille)
                .stream(100 + vm, args.disk_mib << 20);
            while let Some(p) = st.next_piece(1 << 20) {
                f.write_all(&p)?;
            }
        }
        let dst_disk = env.dir.join(format!("dst-disk-{vm}.raw"));
        std::fs::File::create(&dst_disk)?.set_len(args.disk_mib << 20)?;
        Some((src_disk, dst_disk))
    } else {
        None
    };
    let (dst_child, dq) = qemu(
        args,
        env,
        &format!("dst{vm}"),
        &dst_ram,
        true,
        disks.as_ref().map(|d| (d.1.as_path(), true)),
    )?;
    let mut procs = Procs(vec![dst_child]);
    let (src_child, sq) = qemu(
        args,
        env,
        &format!("src{vm}"),
        &src_ram,
        false,
        disks.as_ref().map(|d| (d.0.as_path(), true)),
    )?;
    procs.0.push(src_child);
    Ok(VmRun {
        vm,
        lane,
        entry,
        sq,
        dq,
        src_ram,
        dst_ram,
        disks,
        procs,
    })
}

/// Multifd channels a scenario's migrations use (0: none): --multifd for every
/// scenario, or QEMU's own compression alone with its channels.
fn multifd_channels(args: &ClusterArgs, scenario: &str) -> u32 {
    match (args.multifd, scenario) {
        (0, "qemu-multifd-zstd") => args.multifd_zstd_channels,
        (n, _) => n,
    }
}

/// How the link is emulated, for titles (nothing for the connection-level shaper).
fn packet_label(args: &ClusterArgs) -> String {
    if !args.packet_path {
        return String::new();
    }
    let loss = if args.loss_pct > 0.0 {
        format!(", {}% loss", args.loss_pct)
    } else {
        String::new()
    };
    format!(
        " (packet path: {} ms queue, MTU {}{loss})",
        args.queue_ms, args.mtu
    )
}

/// How the run's migrations use multifd, for titles.
fn multifd_label(args: &ClusterArgs) -> String {
    let zstd_alone = args
        .scenarios
        .split(',')
        .any(|s| s.trim() == "qemu-multifd-zstd");
    match args.multifd {
        0 if zstd_alone => format!(", qemu-multifd-zstd x{}", args.multifd_zstd_channels),
        0 => String::new(),
        n => format!(", multifd x{n}"),
    }
}

/// Migrates one prepared VM (its disk first, when it has one) and waits until the
/// destination has loaded everything.
fn migrate_vm(args: &ClusterArgs, scenario: &str, v: &mut VmRun) -> anyhow::Result<Migrated> {
    let (vm, dst, entry) = (v.vm, v.lane.dst, v.entry);
    let (sq, dq) = (&mut v.sq, &mut v.dq);
    let channels = multifd_channels(args, scenario);
    if channels > 0 {
        for q in [&mut *sq, &mut *dq] {
            q.cmd(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "multifd", "state": true}]}),
            )?;
            q.cmd(
                "migrate-set-parameters",
                json!({"multifd-channels": channels}),
            )?;
            if scenario == "qemu-multifd-zstd" {
                q.cmd(
                    "migrate-set-parameters",
                    json!({"multifd-compression": "zstd"}),
                )?;
            }
        }
    }
    if v.disks.is_none() {
        dq.cmd("migrate-incoming", json!({"uri": format!("tcp:{dst}")}))?;
    }
    sq.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 10u64 << 30}),
    )?;
    let qemu_cpu_at_start = v.procs.cpu_secs();
    let start = Instant::now();
    let mut lan_bytes = 0;
    if v.disks.is_some() {
        // Storage first, as libvirt's --copy-storage-all does: mirror to an NBD
        // export on the destination, through the same path, then the memory.
        dq.cmd("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": dst.ip().to_string(), "port": dst.port().to_string()}}}))?;
        dq.cmd("nbd-server-add", json!({"device": "d0", "writable": true}))?;
        sq.cmd("drive-mirror", json!({"job-id": "m0", "device": "d0", "target": format!("nbd://{entry}/d0"), "format": "raw", "mode": "existing", "sync": "full"}))?;
        loop {
            let jobs = sq.cmd("query-block-jobs", json!({}))?;
            let job = &jobs[0];
            if !job.is_object() {
                bail!("{scenario}: VM {vm}: mirror job vanished");
            }
            if job["ready"] == true && job["offset"] == job["len"] {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sq.cmd("block-job-cancel", json!({"device": "m0"}))?;
        while sq
            .cmd("query-block-jobs", json!({}))?
            .as_array()
            .is_some_and(|j| !j.is_empty())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        dq.cmd("nbd-server-stop", json!({}))?;
        lan_bytes += args.disk_mib << 20;
        // The NBD server released the port: now the memory's incoming socket.
        dq.cmd("migrate-incoming", json!({"uri": format!("tcp:{dst}")}))?;
    }
    sq.cmd("migrate", json!({"uri": format!("tcp:{entry}")}))?;
    let info = loop {
        let v = sq.cmd("query-migrate", json!({}))?;
        match v["status"].as_str() {
            Some("completed") => break v,
            Some("failed") | Some("cancelled") => {
                bail!("{scenario}: migration of VM {vm} failed: {v}")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    // The migration is over when the destination has loaded everything (the link
    // may still hold data after the source reports completion).
    loop {
        let v = dq.cmd("query-migrate", json!({}))?;
        match v["status"].as_str() {
            Some("completed") => break,
            Some("failed") => bail!("{scenario}: VM {vm}: destination failed: {v}"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
        if start.elapsed() > Duration::from_secs(3600) {
            bail!("{scenario}: VM {vm}: destination never completed");
        }
    }
    lan_bytes += info["ram"]["transferred"].as_u64().unwrap_or(0);
    let end = Instant::now();
    let qemu_cpu_secs = v.procs.cpu_secs() - qemu_cpu_at_start;
    eprintln!(
        "  {scenario:<13} VM {vm}: {:.2} s",
        end.duration_since(start).as_secs_f64()
    );
    Ok(Migrated {
        start,
        end,
        lan_bytes,
        qemu_cpu_secs,
    })
}

/// Stops the VM pair and compares the destination's RAM (and disk) with the source's.
fn check_vm(scenario: &str, v: VmRun) -> anyhow::Result<()> {
    let vm = v.vm;
    drop(v.procs);
    if std::fs::read(&v.src_ram)? != std::fs::read(&v.dst_ram)? {
        bail!("{scenario}: VM {vm}: destination RAM differs from the source's");
    }
    if let Some((src_disk, dst_disk)) = &v.disks {
        if std::fs::read(src_disk)? != std::fs::read(dst_disk)? {
            bail!("{scenario}: VM {vm}: destination disk differs from the source's");
        }
    }
    let _ = std::fs::remove_file(&v.dst_ram);
    Ok(())
}

/// A side of the link: where the source QEMUs (near) or the destinations (far) run.
#[derive(Clone, Copy, Debug)]
enum Side {
    Near,
    Far,
}

struct Env {
    /// The packet-level path (--packet-path), or none: the connection-level shaper.
    path: Option<WanPath>,
    me: PathBuf,
    shrinker: PathBuf,
    dir: PathBuf,
    rate: f64,
    delay: f64,
    ram_mib: u64,
    pool_mib: u64,
    near_permille: u32,
    ram_files: Vec<PathBuf>,
}

impl Env {
    /// `program` to run on `side`: in its host's namespace across a packet path.
    fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.path {
            Some(p) => {
                let ns = match side {
                    Side::Near => &p.west_ns,
                    Side::Far => &p.east_ns,
                };
                // `ip netns exec` execs the program: the child is the program itself.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Whether something listens on `addr`, in the namespace of the host that has it.
    fn listening(&self, addr: SocketAddr) -> bool {
        let table = match &self.path {
            Some(p) => {
                let ns = if addr.ip() == p.east {
                    &p.east_ns
                } else {
                    &p.west_ns
                };
                in_namespace(ns, || std::fs::read_to_string("/proc/thread-self/net/tcp"))
                    .ok()
                    .and_then(Result::ok)
            }
            None => std::fs::read_to_string("/proc/net/tcp").ok(),
        };
        table.is_some_and(|t| is_listening(&t, addr))
    }

    /// Bytes the link carried so far (forward, reverse).
    fn link_bytes(&self, stats: &Path) -> (u64, u64) {
        match &self.path {
            Some(p) => (
                p.eastbound.bytes.load(Relaxed),
                p.westbound.bytes.load(Relaxed),
            ),
            None => shaper_bytes(stats),
        }
    }

    /// CPU seconds the packet path's threads used so far (0 without one).
    fn path_cpu_secs(&self) -> f64 {
        self.path.as_ref().map_or(0.0, WanPath::cpu_secs)
    }

    fn link(&self, stats: &Path) -> Vec<String> {
        vec![
            "--rate-mbit".into(),
            self.rate.to_string(),
            "--delay-ms".into(),
            self.delay.to_string(),
            "--stats".into(),
            stats.display().to_string(),
        ]
    }

    /// The source RAM file of VM `vm` (written once, reused by every scenario).
    fn ram(&self, vm: u64) -> PathBuf {
        let path = PathBuf::from(format!(
            "/dev/shm/shrinker-bench-{}-vm{vm}.ram",
            std::process::id()
        ));
        if let Some(f) = self.ram_files.get(vm as usize) {
            // A copy: QEMU maps the file shared, and the user's image must not change.
            if !path.exists() {
                std::fs::copy(f, &path).expect("copy RAM image to /dev/shm");
            }
            return path;
        }
        if !path.exists() {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("tmpfs"));
            let mut s = testkit::Workload::cluster(2026, self.pool_mib << 20)
                .with_near_duplicates(self.near_permille)
                .stream(vm, self.ram_mib << 20);
            while let Some(p) = s.next_piece(1 << 20) {
                f.write_all(&p).expect("write RAM");
            }
        }
        path
    }
}

/// Runs the cluster benchmark and prints the table.
pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    sweep_leftovers();
    let me = std::env::current_exe()?;
    let shrinker = args
        .shrinker
        .clone()
        .unwrap_or_else(|| me.with_file_name("shrinker"));
    let dir = std::env::temp_dir().join(format!("shrinker-cluster-{}", std::process::id()));
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
    let path = if args.packet_path {
        let link = LinkSpec {
            delay: Duration::from_secs_f64(args.delay_ms / 1000.0),
            rate_bps: (args.rate_mbit * 1e6) as u64,
            queue: Duration::from_secs_f64(args.queue_ms / 1000.0),
            loss: args.loss_pct / 100.0,
            mtu: args.mtu,
        };
        let tag = format!("cb{}", std::process::id() % 100_000);
        let path = WanPath::create(&tag, 94, &link).context("--packet-path")?;
        for setting in &args.host_sysctl {
            path.host_sysctl(setting)
                .with_context(|| format!("--host-sysctl {setting}"))?;
        }
        if let Some(options) = &args.host_route {
            path.host_route_options(options)
                .with_context(|| format!("--host-route {options}"))?;
        }
        Some(path)
    } else {
        None
    };
    let env = Env {
        path,
        me,
        shrinker,
        dir: dir.clone(),
        rate: args.rate_mbit,
        delay: args.delay_ms,
        ram_mib: args.ram_mib,
        pool_mib: args.pool_mib,
        near_permille: args.near_permille,
        ram_files: args.ram_files.clone(),
    };
    if !args.ram_files.is_empty() {
        if args.ram_files.len() as u64 != args.vms {
            bail!(
                "--ram-files names {} images for --vms {}",
                args.ram_files.len(),
                args.vms
            );
        }
        for f in &args.ram_files {
            let len = std::fs::metadata(f)
                .with_context(|| format!("{}", f.display()))?
                .len();
            if len != args.ram_mib << 20 {
                bail!(
                    "{} is {len} bytes, not --ram-mib {} MiB",
                    f.display(),
                    args.ram_mib
                );
            }
        }
    }
    let mut figures = Vec::new();
    let result = (|| {
        for (i, s) in args
            .scenarios
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            eprintln!("scenario {s}:");
            figures.push(run_scenario(&args, &env, s, i as u8)?);
        }
        anyhow::Ok(())
    })();
    for vm in 0..args.vms {
        let pid = std::process::id();
        let _ = std::fs::remove_file(format!("/dev/shm/shrinker-bench-{pid}-vm{vm}.ram"));
        // Left behind by a failed migration.
        let _ = std::fs::remove_file(format!("/dev/shm/shrinker-bench-dst-{pid}-{vm}"));
    }
    if let Err(e) = result {
        // A failed run's logs are the ones most worth reading.
        if let Some(keep) = &args.keep_logs {
            match keep_logs(&dir, keep) {
                Ok(()) => eprintln!("logs of the failed run kept in {}", keep.display()),
                Err(k) => eprintln!("keeping the logs failed too: {k:#}"),
            }
        }
        return Err(e);
    }
    println!(
        "\n{} VMs x {} MiB RAM{} (shared pool {} MiB), WAN {} Mbit/s, {} ms one way{}, {} migrations{}:",
        args.vms,
        args.ram_mib,
        if args.disk_mib > 0 { format!(" + {} MiB disk", args.disk_mib) } else { String::new() },
        args.pool_mib,
        args.rate_mbit,
        args.delay_ms,
        packet_label(&args),
        if args.concurrent { "concurrent" } else { "sequential" },
        multifd_label(&args)
    );
    println!(
        "{:<20} {:>14} {:>14} {:>9} {:>10} {:>9} {:>8} {:>10} {:>10} {:>10}",
        "scenario",
        "QEMU bytes",
        "WAN bytes",
        "WAN/QEMU",
        "migrate s",
        "vs direct",
        "wall s",
        "path cpu s",
        "QEMU cpu s",
        "link cpu s"
    );
    let direct = figures
        .iter()
        .find(|f| f.scenario == "direct")
        .map(|f| f.migrate_secs);
    for f in &figures {
        let wan = f.wan_forward_bytes + f.wan_reverse_bytes;
        println!(
            "{:<20} {:>14} {:>14} {:>8.1}% {:>10.2} {:>9} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
            f.scenario,
            f.lan_bytes,
            wan,
            100.0 * wan as f64 / f.lan_bytes.max(1) as f64,
            f.migrate_secs,
            direct.map_or("-".into(), |d| format!("{:.3}", f.migrate_secs / d)),
            f.total_secs,
            f.path_cpu_secs,
            f.qemu_cpu_secs,
            f.link_cpu_secs
        );
    }
    if let Some(p) = &args.svg {
        let title = format!(
            "{} VMs x {} MiB{}, {}, {} Mbit/s, {} ms one way{}{}",
            args.vms,
            args.ram_mib,
            if args.near_permille > 0 {
                format!(" ({} permille near-duplicate pages)", args.near_permille)
            } else {
                String::new()
            },
            if args.concurrent {
                "concurrent"
            } else {
                "sequential"
            },
            args.rate_mbit,
            args.delay_ms,
            packet_label(&args),
            multifd_label(&args)
        );
        let wan: Vec<(String, f64)> = figures
            .iter()
            .map(|f| {
                (
                    f.scenario.clone(),
                    (f.wan_forward_bytes + f.wan_reverse_bytes) as f64 / 1e6,
                )
            })
            .collect();
        let time: Vec<(String, f64)> = figures
            .iter()
            .map(|f| (f.scenario.clone(), f.migrate_secs))
            .collect();
        std::fs::write(
            p,
            crate::chart::bar_charts(
                &title,
                &[
                    ("WAN bytes (MB)", wan.as_slice()),
                    ("migration time (s)", time.as_slice()),
                ],
            ),
        )?;
    }
    if let Some(p) = &args.json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(
                &json!({"args": format!("{args:?}"), "scenarios": figures}),
            )?,
        )?;
    }
    if let Some(keep) = &args.keep_logs {
        keep_logs(&dir, keep)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Copies the `.log` and `.json` files of the scratch directory `dir` into `keep`.
fn keep_logs(dir: &Path, keep: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(keep)
        .with_context(|| format!("creating {} for the logs", keep.display()))?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("log" | "json")
        ) {
            std::fs::copy(&path, keep.join(entry.file_name()))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// Removes what runs that did not finish (interrupted with Ctrl-C, killed) left
/// behind: guest RAM files on tmpfs (hundreds of MiB each, held in memory until
/// removed) and scratch directories, of processes that no longer exist.
fn sweep_leftovers() {
    let sweep = |dir: &Path, prefixes: &[&str]| {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(pid) = prefixes
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .and_then(|rest| rest.split(['-', '.']).next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if removed.is_ok() {
                eprintln!("removed {} (left by an unfinished run)", path.display());
            }
        }
    };
    sweep(
        Path::new("/dev/shm"),
        &["shrinker-bench-dst-", "shrinker-bench-"],
    );
    sweep(&std::env::temp_dir(), &["shrinker-cluster-"]);
}
