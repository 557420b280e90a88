//! `shrinker-bench cluster`: a cluster of similar VMs migrated by real QEMU, one after
//! another, over the same emulated WAN link, through each alternative a user could
//! pick: directly, through the edge pair, and through zstd-3 tunnels (plain and with
//! `--long=27` long-range matching). Reports WAN bytes and migration time side by
//! side; every destination's RAM is compared with its source's.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

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
    /// Scenarios, comma-separated: direct, edge, zstd3, zstd3-long27,
    /// zstd3-long30-shared (one zstd --long=30 stream carrying every migration in
    /// turn), and with --multifd: qemu-multifd-zstd (QEMU's own multifd compression).
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
    /// Migrate with multifd and this many channels (0: off).
    #[arg(long, default_value_t = 0)]
    pub multifd: u32,
    /// Give each VM a disk of this many MiB, mirrored over NBD (drive-mirror) before
    /// its memory migrates (0: memory only). Disks share the pool's content.
    #[arg(long, default_value_t = 0)]
    pub disk_mib: u64,
    /// Edge compression mode.
    #[arg(long, default_value = "auto")]
    pub compress: String,
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
}

/// Figures of one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioFigures {
    pub scenario: String,
    pub lan_bytes: u64,
    pub wan_forward_bytes: u64,
    pub wan_reverse_bytes: u64,
    pub migration_secs: Vec<f64>,
    pub total_secs: f64,
}

struct Procs(Vec<Child>);

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
    dir: &Path,
    name: &str,
    ram: &Path,
    incoming: bool,
    disk: Option<(&Path, bool)>,
) -> anyhow::Result<(Child, Qmp)> {
    let qmp = dir.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&qmp);
    let mut c = Command::new(&args.qemu);
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
fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_listening(addr) {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Reads /proc/net/tcp for a LISTEN socket bound to `addr` (IPv4).
fn is_listening(addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
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

fn run_scenario(
    args: &ClusterArgs,
    env: &Env,
    scenario: &str,
    index: u8,
) -> anyhow::Result<ScenarioFigures> {
    let ip = format!("127.0.78.{}", 10 + index);
    let a = |p: u16| -> SocketAddr { format!("{ip}:{p}").parse().expect("address") };
    let (front, shaper, back, dst) = (a(22001), a(22002), a(22003), a(22004));
    let stats = env.dir.join(format!("shaper-{scenario}.json"));
    let mut procs = Procs(Vec::new());
    // The QEMU source connects to `entry`; the shaper always sits on the WAN leg.
    let entry = match scenario {
        "direct" | "qemu-multifd-zstd" => {
            procs.0.push(spawn(
                Command::new(&env.me)
                    .args([
                        "shaper",
                        "--listen",
                        &shaper.to_string(),
                        "--to",
                        &dst.to_string(),
                    ])
                    .args(env.link(&stats)),
                env.dir.join("shaper.log"),
            )?);
            shaper
        }
        "edge" => {
            procs.0.push(spawn(
                Command::new(&env.me)
                    .args([
                        "shaper",
                        "--listen",
                        &shaper.to_string(),
                        "--to",
                        &back.to_string(),
                    ])
                    .args(env.link(&stats)),
                env.dir.join("shaper.log"),
            )?);
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
            procs.0.push(spawn(
                Command::new(&env.shrinker)
                    .args([
                        "edge",
                        "--name",
                        "b",
                        "--tunnel-listen",
                        &back.to_string(),
                        "--cache-mem",
                        "4GiB",
                        "--compress",
                        &args.compress,
                    ])
                    .args(tls("b")),
                env.dir.join("edge-b.log"),
            )?);
            procs.0.push(spawn(
                Command::new(&env.shrinker)
                    .args([
                        "edge",
                        "--name",
                        "a",
                        "--forward",
                        &format!("{front}={shaper}={dst}"),
                        "--cache-mem",
                        "4GiB",
                        "--compress",
                        &args.compress,
                    ])
                    .args(tls("a")),
                env.dir.join("edge-a.log"),
            )?);
            front
        }
        "zstd3" | "zstd3-long27" | "zstd3-long30-shared" => {
            let long = match scenario {
                "zstd3" => "0",
                "zstd3-long27" => "27",
                _ => "30",
            };
            let shared: &[&str] = if scenario == "zstd3-long30-shared" {
                &["--shared"]
            } else {
                &[]
            };
            procs.0.push(spawn(
                Command::new(&env.me)
                    .args([
                        "shaper",
                        "--listen",
                        &shaper.to_string(),
                        "--to",
                        &back.to_string(),
                    ])
                    .args(env.link(&stats)),
                env.dir.join("shaper.log"),
            )?);
            procs.0.push(spawn(
                Command::new(&env.me)
                    .args([
                        "ztunnel",
                        "--mode",
                        "decompress",
                        "--listen",
                        &back.to_string(),
                        "--to",
                        &dst.to_string(),
                        "--long",
                        long,
                    ])
                    .args(shared),
                env.dir.join("zdec.log"),
            )?);
            procs.0.push(spawn(
                Command::new(&env.me)
                    .args([
                        "ztunnel",
                        "--mode",
                        "compress",
                        "--listen",
                        &front.to_string(),
                        "--to",
                        &shaper.to_string(),
                        "--long",
                        long,
                    ])
                    .args(shared),
                env.dir.join("zenc.log"),
            )?);
            front
        }
        other => bail!("unknown scenario {other:?}"),
    };
    wait_port(shaper)?;
    std::thread::sleep(Duration::from_millis(300));
    let (f0, r0) = shaper_bytes(&stats);
    let mut times = Vec::new();
    let mut lan = 0;
    let started = Instant::now();
    for vm in 0..args.vms {
        let src_ram = env.ram(vm);
        let dst_ram = PathBuf::from(format!(
            "/dev/shm/shrinker-bench-dst-{}",
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
            let dst_disk = env.dir.join("dst-disk.raw");
            std::fs::File::create(&dst_disk)?.set_len(args.disk_mib << 20)?;
            Some((src_disk, dst_disk))
        } else {
            None
        };
        let (dst_child, mut dq) = qemu(
            args,
            &env.dir,
            "dst",
            &dst_ram,
            true,
            disks.as_ref().map(|d| (d.1.as_path(), true)),
        )?;
        // Killed on drop, so a failed migration leaves no VM (or busy port) behind.
        let mut vm_procs = Procs(vec![dst_child]);
        let (src_child, mut sq) = qemu(
            args,
            &env.dir,
            "src",
            &src_ram,
            false,
            disks.as_ref().map(|d| (d.0.as_path(), true)),
        )?;
        vm_procs.0.push(src_child);
        if args.multifd > 0 {
            for q in [&mut sq, &mut dq] {
                q.cmd(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "multifd", "state": true}]}),
                )?;
                q.cmd(
                    "migrate-set-parameters",
                    json!({"multifd-channels": args.multifd}),
                )?;
                if scenario == "qemu-multifd-zstd" {
                    q.cmd(
                        "migrate-set-parameters",
                        json!({"multifd-compression": "zstd"}),
                    )?;
                }
            }
        } else if scenario == "qemu-multifd-zstd" {
            bail!("qemu-multifd-zstd needs --multifd N");
        }
        if disks.is_none() {
            dq.cmd("migrate-incoming", json!({"uri": format!("tcp:{dst}")}))?;
        }
        sq.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 10u64 << 30}),
        )?;
        if scenario == "edge" {
            wait_port(front)?;
        } else if scenario != "direct" {
            wait_port(entry)?;
        }
        let t = Instant::now();
        if disks.is_some() {
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
            lan += args.disk_mib << 20;
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
            if t.elapsed() > Duration::from_secs(3600) {
                bail!("{scenario}: VM {vm}: destination never completed");
            }
        }
        times.push(t.elapsed().as_secs_f64());
        lan += info["ram"]["transferred"].as_u64().unwrap_or(0);
        drop(vm_procs);
        if std::fs::read(&src_ram)? != std::fs::read(&dst_ram)? {
            bail!("{scenario}: VM {vm}: destination RAM differs from the source's");
        }
        if let Some((src_disk, dst_disk)) = &disks {
            if std::fs::read(src_disk)? != std::fs::read(dst_disk)? {
                bail!("{scenario}: VM {vm}: destination disk differs from the source's");
            }
        }
        let _ = std::fs::remove_file(&dst_ram);
        eprintln!(
            "  {scenario:<13} VM {vm}: {:.2} s",
            times.last().copied().unwrap_or(0.0)
        );
    }
    let total = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let (f1, r1) = shaper_bytes(&stats);
    drop(procs);
    Ok(ScenarioFigures {
        scenario: scenario.to_string(),
        lan_bytes: lan,
        wan_forward_bytes: f1 - f0,
        wan_reverse_bytes: r1 - r0,
        migration_secs: times,
        total_secs: total,
    })
}

struct Env {
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
    let env = Env {
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
        let _ = std::fs::remove_file(format!(
            "/dev/shm/shrinker-bench-{}-vm{vm}.ram",
            std::process::id()
        ));
    }
    result?;
    println!(
        "\n{} VMs x {} MiB RAM{} (shared pool {} MiB), WAN {} Mbit/s, {} ms one way, sequential migrations{}:",
        args.vms,
        args.ram_mib,
        if args.disk_mib > 0 { format!(" + {} MiB disk", args.disk_mib) } else { String::new() },
        args.pool_mib,
        args.rate_mbit,
        args.delay_ms,
        if args.multifd > 0 { format!(", multifd x{}", args.multifd) } else { String::new() }
    );
    println!(
        "{:<14} {:>14} {:>14} {:>9} {:>10} {:>9}",
        "scenario", "QEMU bytes", "WAN bytes", "WAN/QEMU", "total s", "vs direct"
    );
    let direct = figures
        .iter()
        .find(|f| f.scenario == "direct")
        .map(|f| f.total_secs);
    for f in &figures {
        let wan = f.wan_forward_bytes + f.wan_reverse_bytes;
        println!(
            "{:<14} {:>14} {:>14} {:>8.1}% {:>10.2} {:>9}",
            f.scenario,
            f.lan_bytes,
            wan,
            100.0 * wan as f64 / f.lan_bytes.max(1) as f64,
            f.total_secs,
            direct.map_or("-".into(), |d| format!("{:.3}", f.total_secs / d))
        );
    }
    if let Some(p) = &args.svg {
        let title = format!(
            "{} VMs x {} MiB{}, {} Mbit/s, {} ms one way{}",
            args.vms,
            args.ram_mib,
            if args.near_permille > 0 {
                format!(" ({} permille near-duplicate pages)", args.near_permille)
            } else {
                String::new()
            },
            args.rate_mbit,
            args.delay_ms,
            if args.multifd > 0 {
                format!(", multifd x{}", args.multifd)
            } else {
                String::new()
            }
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
            .map(|f| (f.scenario.clone(), f.total_secs))
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
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
