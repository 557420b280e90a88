//! Real QEMU VMs for end-to-end tests: guest RAM in a shared memory-backend-file on
//! tmpfs (so it can be compared byte for byte), QMP over a unix socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A QEMU build under test.
#[derive(Clone, Debug)]
pub struct QemuBuild {
    pub name: &'static str,
    pub binary: PathBuf,
    pub firmware: Option<PathBuf>,
}

/// QEMU 7.2 (Debian bookworm) and 10.x (unpacked from bookworm-backports) as installed
/// by scripts/install-qemu.sh; both are required unless SHRINKER_QEMU_ONLY names one.
pub fn builds() -> Vec<QemuBuild> {
    let dir10 = std::env::var("QEMU10_DIR").unwrap_or_else(|_| "/opt/shrinker-qemu-10.0".into());
    let all = vec![
        QemuBuild {
            name: "7.2",
            binary: std::env::var("SHRINKER_QEMU_72")
                .map(PathBuf::from)
                .unwrap_or_else(|_| "/usr/bin/qemu-system-x86_64".into()),
            firmware: None,
        },
        QemuBuild {
            name: "10.0",
            binary: Path::new(&dir10).join("usr/bin/qemu-system-x86_64"),
            firmware: Some(Path::new(&dir10).join("usr/share/qemu")),
        },
    ];
    let only = std::env::var("SHRINKER_QEMU_ONLY").ok();
    let chosen: Vec<QemuBuild> = all
        .into_iter()
        .filter(|b| only.as_deref().is_none_or(|o| o == b.name))
        .collect();
    for b in &chosen {
        assert!(
            b.binary.exists(),
            "QEMU {} not found at {}: run scripts/install-qemu.sh (or set SHRINKER_QEMU_ONLY to test one version)",
            b.name,
            b.binary.display()
        );
    }
    chosen
}

/// Migration capabilities and parameters, set on both ends before migrating.
#[derive(Clone, Default)]
pub struct Mode {
    pub caps: Vec<&'static str>,
    pub params: serde_json::Value,
}

/// Starts a source VM (RAM from `fill`) and an incoming one, sets `mode` on both,
/// migrates the source to `via` (the destination listens on `dst`), waits for both
/// ends and compares RAM byte for byte; `hosts` are the network namespaces of source
/// and destination (`None`: this one). Returns the source's non-zero pages.
#[allow(clippy::too_many_arguments)]
pub async fn migrate_with_mode(
    hosts: (Option<&str>, Option<&str>),
    build: &QemuBuild,
    dir: &Path,
    name: &str,
    route: (SocketAddr, SocketAddr),
    ram_mib: u64,
    fill: RamFill<'_>,
    mode: &Mode,
) -> u64 {
    migrate_vm(
        hosts,
        build,
        dir,
        name,
        route,
        ram_mib,
        Some(fill),
        None,
        mode,
    )
    .await
}

/// [`migrate_with_mode`] with optional RAM content and an optional guest `kernel`: a
/// guest that boots and keeps writing memory, migrated slowly enough (200 MiB/s, 2 s
/// downtime budget) that the migration needs several precopy rounds, which is
/// asserted.
#[allow(clippy::too_many_arguments)]
pub async fn migrate_vm(
    hosts: (Option<&str>, Option<&str>),
    build: &QemuBuild,
    dir: &Path,
    name: &str,
    (via, dst): (SocketAddr, SocketAddr),
    ram_mib: u64,
    fill: Option<RamFill<'_>>,
    kernel: Option<&Path>,
    mode: &Mode,
) -> u64 {
    let mut src = Vm::start_in(
        hosts.0,
        VmSpec {
            build,
            dir,
            name: format!("{name}-src"),
            ram_mib,
            ram_content: fill,
            incoming: false,
            kernel: kernel.map(Path::to_path_buf),
            disk: None,
        },
    )
    .await;
    let mut dstvm = Vm::start_in(
        hosts.1,
        VmSpec {
            build,
            dir,
            name: format!("{name}-dst"),
            ram_mib,
            ram_content: None,
            incoming: true,
            kernel: kernel.map(Path::to_path_buf),
            disk: None,
        },
    )
    .await;
    let caps: Vec<_> = mode
        .caps
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    for vm in [&mut src, &mut dstvm] {
        if !caps.is_empty() {
            vm.qmp
                .cmd("migrate-set-capabilities", json!({ "capabilities": caps }))
                .await;
        }
        if mode.params.is_object() {
            vm.qmp
                .cmd("migrate-set-parameters", mode.params.clone())
                .await;
        }
    }
    dstvm
        .qmp
        .cmd("migrate-incoming", json!({"uri": format!("tcp:{dst}")}))
        .await;
    let dirty = kernel.is_some();
    src.qmp
        .cmd(
            "migrate-set-parameters",
            if dirty {
                // Slow enough that the guest dirties pages during the first pass, with
                // a downtime budget that lets the second or third pass converge.
                json!({"max-bandwidth": 200u64 << 20, "downtime-limit": 2000})
            } else {
                json!({"max-bandwidth": 8u64 << 30})
            },
        )
        .await;
    if dirty {
        // Let the guest run (and write) for a moment before migrating.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    src.qmp
        .cmd("migrate", json!({"uri": format!("tcp:{via}")}))
        .await;
    let info = src.qmp.wait_migration(Duration::from_secs(300)).await;
    let pages = nonzero_pages(&src.ram);
    dstvm.qmp.wait_incoming_done(Duration::from_secs(120)).await;
    assert_same_file(&src.ram, &dstvm.ram);
    if dirty {
        let dirty_synced = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        assert!(
            dirty_synced >= 2,
            "the guest should force several precopy rounds: {info}"
        );
    }
    pages
}

/// Pages of a RAM file that are not all zeros.
pub fn nonzero_pages(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    data.chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64
}

/// Guest RAM of `ram_mib` MiB from stream `vm` of `workload` (shared OS-like pages in a
/// VM-specific order, unique pages, zero pages; see `testkit::Workload`).
pub fn workload_ram(
    workload: testkit::Workload,
    vm: u64,
    ram_mib: u64,
) -> impl FnMut(&mut std::fs::File) {
    move |f: &mut std::fs::File| {
        use std::io::Write;
        let mut stream = workload.stream(vm, ram_mib << 20);
        let mut w = std::io::BufWriter::new(f);
        while let Some(p) = stream.next_piece(1 << 20) {
            w.write_all(&p).unwrap();
        }
        w.flush().unwrap();
    }
}

/// Writes a guest's initial RAM into its backing file.
pub type RamFill<'a> = Box<dyn FnMut(&mut std::fs::File) + 'a>;

/// A QEMU process, killed on drop.
pub struct Vm {
    child: Child,
    pub qmp: Qmp,
    pub ram: PathBuf,
    /// The backing file of the pc-dimm, when [`Hardware::dimm`] asked for one.
    pub dimm: Option<PathBuf>,
    log: PathBuf,
}

/// Machine type and devices beyond the bare test VM (`pc`, `-nodefaults`, guest RAM
/// in one file): what a VM of a real deployment carries.
pub struct Hardware {
    pub machine: &'static str,
    /// vCPUs.
    pub smp: u32,
    /// Keep QEMU's default devices (VGA, NIC, IDE/CD-ROM, floppy on `pc`).
    pub default_devices: bool,
    /// A pc-dimm of (MiB, stream) in a file of its own, filled on a source with that
    /// stream of the cluster workload the e2e tests' guest RAM comes from (seed 2026,
    /// 48 MiB pool), so its pages repeat pages of the main RAM block.
    pub dimm: Option<(u64, u64)>,
    /// Further command-line arguments (`-device ...`).
    pub devices: Vec<String>,
}

impl Hardware {
    /// Command-line arguments from one line split at spaces (none contains one).
    pub fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            machine: "pc",
            smp: 1,
            default_devices: false,
            dimm: None,
            devices: Vec::new(),
        }
    }
}

pub struct VmSpec<'a> {
    pub build: &'a QemuBuild,
    pub dir: &'a Path,
    pub name: String,
    pub ram_mib: u64,
    /// Prefill the RAM file with this (its length must be ram_mib MiB); None = zeros.
    pub ram_content: Option<RamFill<'a>>,
    pub incoming: bool,
    pub kernel: Option<PathBuf>,
    pub disk: Option<PathBuf>,
}

impl VmSpec<'_> {
    /// Lets an incoming VM start running as soon as migration allows (postcopy).
    pub fn autostart(name: &str) -> bool {
        name.ends_with("-run")
    }
}

impl Vm {
    /// Waits until mirror job `job` is ready with everything copied, then cancels it,
    /// which completes a ready mirror without pivoting (the target stays a copy), and
    /// waits until the job is gone. Panics after `timeout` or if the job vanishes.
    pub async fn finish_mirror(&mut self, job: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let jobs = self.qmp.cmd("query-block-jobs", json!({})).await;
            let j = &jobs[0];
            assert!(j.is_object(), "job {job} vanished: {jobs}\n{}", self.log());
            if j["ready"] == true && j["offset"] == j["len"] {
                break;
            }
            assert!(Instant::now() < deadline, "job {job} not ready: {jobs}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.qmp
            .cmd("block-job-cancel", json!({"device": job}))
            .await;
        loop {
            let jobs = self.qmp.cmd("query-block-jobs", json!({})).await;
            if jobs.as_array().is_some_and(|j| j.is_empty()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} did not finish: {jobs}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A precopy migration of this VM into `dst` at full speed: `dst` listens on
    /// `listen`, this VM connects to `via` (an edge's forward port, or `listen`
    /// itself), both wait until done, and the guest RAM is compared byte for byte.
    /// Returns the source's final `query-migrate`.
    pub async fn migrate_into(
        &mut self,
        dst: &mut Vm,
        via: SocketAddr,
        listen: SocketAddr,
    ) -> Value {
        self.start_migration_into(dst, via, listen, 8 << 30).await;
        let info = self.qmp.wait_migration(Duration::from_secs(300)).await;
        dst.qmp.wait_incoming_done(Duration::from_secs(120)).await;
        assert_same_file(&self.ram, &dst.ram);
        info
    }

    /// Starts a precopy migration of this VM into `dst` (listening on `listen`, reached
    /// through `via`) capped at `max_bandwidth` bytes/s, and returns at once.
    pub async fn start_migration_into(
        &mut self,
        dst: &mut Vm,
        via: SocketAddr,
        listen: SocketAddr,
        max_bandwidth: u64,
    ) {
        dst.qmp
            .cmd("migrate-incoming", json!({"uri": format!("tcp:{listen}")}))
            .await;
        self.qmp
            .cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": max_bandwidth}),
            )
            .await;
        self.qmp
            .cmd("migrate", json!({"uri": format!("tcp:{via}")}))
            .await;
    }

    pub async fn start(spec: VmSpec<'_>) -> Vm {
        Vm::start_in(None, spec).await
    }

    /// Starts the VM inside network namespace `netns` (its QMP socket and RAM file
    /// stay on the shared filesystem).
    pub async fn start_in(netns: Option<&str>, spec: VmSpec<'_>) -> Vm {
        Vm::start_with(netns, spec, &Hardware::default()).await
    }

    /// Starts the VM with the machine and devices of `hw` (the other constructors use
    /// the bare default: `pc`, no default devices).
    pub async fn start_with(netns: Option<&str>, mut spec: VmSpec<'_>, hw: &Hardware) -> Vm {
        let ram = shm_ram_path(spec.dir, &spec.name);
        {
            let mut f = std::fs::File::create(&ram).unwrap();
            if let Some(fill) = spec.ram_content.as_mut() {
                fill(&mut f);
            }
            f.set_len(spec.ram_mib << 20).unwrap();
        }
        let qmp_path = spec.dir.join(format!("{}.qmp", spec.name));
        let _ = std::fs::remove_file(&qmp_path);
        let log = spec.dir.join(format!("{}.qemu.log", spec.name));
        let mut cmd = match netns {
            // `ip netns exec` execs the program: the child is QEMU itself.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&spec.build.binary);
                c
            }
            None => Command::new(&spec.build.binary),
        };
        base_args(&mut cmd, spec.build, hw, spec.ram_mib, &ram);
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        match &spec.kernel {
            Some(k) => {
                cmd.arg("-kernel").arg(k);
            }
            None => {
                cmd.arg("-S");
            }
        }
        if spec.incoming {
            cmd.args(["-incoming", "defer"]);
            if spec.kernel.is_some() && !VmSpec::autostart(&spec.name) {
                cmd.arg("-S");
            }
        }
        if let Some(d) = &spec.disk {
            cmd.arg("-drive")
                .arg(format!("if=none,id=d0,file={},format=raw", d.display()));
            // An NBD export target must not be attached to a guest device (the device
            // would hold the write permission).
            if !spec.name.contains("nbd-dst") {
                cmd.args(["-device", "virtio-blk-pci,drive=d0"]);
            }
        }
        let dimm = hw.dimm.map(|(mib, fill)| {
            // A second RAM block with content of its own (hot-pluggable memory).
            let path = ram.with_extension("dimm");
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(mib << 20).unwrap();
            if !spec.incoming {
                let mut w = std::io::BufWriter::new(f);
                let mut stream = testkit::Workload::cluster(2026, 48 << 20).stream(fill, mib << 20);
                while let Some(p) = stream.next_piece(1 << 20) {
                    std::io::Write::write_all(&mut w, &p).unwrap();
                }
                std::io::Write::flush(&mut w).unwrap();
            }
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-file,id=dimm0,size={mib}M,mem-path={},share=on",
                    path.display()
                ))
                .args(["-device", "pc-dimm,id=dimm0dev,memdev=dimm0"]);
            path
        });
        cmd.args(&hw.devices);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        let qmp = Qmp::connect(&qmp_path, &log).await;
        Vm {
            child,
            qmp,
            ram,
            dimm,
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ram);
        if let Some(d) = &self.dimm {
            let _ = std::fs::remove_file(d);
        }
    }
}

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path, log: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!(
                    "QMP {}: {e}\n{}",
                    path.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                ),
            }
        };
        let (r, w) = stream.into_split();
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting).await.unwrap();
        q.cmd("qmp_capabilities", json!({})).await;
        q
    }

    /// Runs a command; panics on a QMP error.
    pub async fn cmd(&mut self, name: &str, args: Value) -> Value {
        match self.try_cmd(name, args.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("QMP {name} {args}: {e}"),
        }
    }

    pub async fn try_cmd(&mut self, name: &str, args: Value) -> Result<Value, Value> {
        let msg = json!({"execute": name, "arguments": args});
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .unwrap();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.unwrap();
            assert!(n > 0, "QMP closed during {name}");
            let v: Value = serde_json::from_str(&line).unwrap();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
        }
    }

    /// On a destination: polls until the incoming migration has been loaded entirely
    /// (query-migrate reports it completed). The source reports "completed" once it
    /// has *sent* everything; the destination may still be reading and writing pages
    /// (multifd channels and delayed tunnels finish later), so compare RAM only after
    /// this.
    pub async fn wait_incoming_done(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.cmd("query-migrate", json!({})).await;
            match v["status"].as_str() {
                Some("completed") => return v,
                Some("failed") | Some("cancelled") => panic!("incoming migration failed: {v}"),
                // No incoming state reported: fall back to the run state.
                None => {
                    let st = self.cmd("query-status", json!({})).await;
                    if st["status"] != "inmigrate" {
                        return st;
                    }
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "incoming migration not completed in {timeout:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls query-migrate until `ready` holds for its answer, which it returns. Panics
    /// when the migration fails, is cancelled or completes first, or after `timeout`
    /// (`what` names the state waited for). Tests wait for the QEMU state they need
    /// instead of sleeping: a fixed pause that suffices on a quiet machine is outrun on
    /// a busy one.
    /// Waits until precopy is active with at least `bytes` transferred (so a switch,
    /// a kill or a cancel lands mid-stream); returns that `query-migrate`.
    pub async fn wait_transferred(&mut self, bytes: u64) -> Value {
        self.wait_migrate_until("precopy under way", Duration::from_secs(120), |v| {
            v["status"] == "active" && v["ram"]["transferred"].as_u64().unwrap_or(0) >= bytes
        })
        .await
    }

    pub async fn wait_migrate_until(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.cmd("query-migrate", json!({})).await;
            if ready(&v) {
                return v;
            }
            assert!(
                !matches!(
                    v["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                ),
                "migration ended before {what}: {v}"
            );
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls query-migrate until completed (panics on failure or timeout).
    pub async fn wait_migration(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.cmd("query-migrate", json!({})).await;
            match v["status"].as_str() {
                Some("completed") => return v,
                Some("failed") | Some("cancelled") => panic!("migration failed: {v}"),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "migration not completed in {timeout:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Compares two RAM (or disk) files; panics with the first differing page.
pub fn assert_same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        // Enough to tell a page that never arrived (zeros) from wrong content.
        let differing: Vec<usize> = x
            .chunks(4096)
            .zip(y.chunks(4096))
            .enumerate()
            .filter(|(_, (p, q))| p != q)
            .map(|(n, _)| n)
            .collect();
        let page = i / 4096;
        let (p, q) = (&x[page * 4096..][..4096], &y[page * 4096..][..4096]);
        let diff_bytes = p.iter().zip(q).filter(|(u, v)| u != v).count();
        panic!(
            "{} and {} differ at byte {i} (page {page}); {} pages differ (first {:?}); \
             in page {page} {diff_bytes} bytes differ, destination page all zero: {}, \
             source page all zero: {}; source starts {:02x?}, destination {:02x?}",
            a.display(),
            b.display(),
            differing.len(),
            &differing[..differing.len().min(10)],
            q.iter().all(|&v| v == 0),
            p.iter().all(|&v| v == 0),
            &p[..16],
            &q[..16],
        );
    }
}

/// A multiboot kernel (flat binary, address-field header) that loops forever writing
/// one dword per 4 KiB page over guest memory [4 MiB, `end`), so precopy has dirty
/// pages to send again in every round. It writes many pages, never one page in a
/// tight loop (TCG can lose dirty tracking for a single very hot page).
pub fn dirtying_kernel(end: u32) -> Vec<u8> {
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 1 << 16; // address fields valid
    let mut k = Vec::new();
    for v in [
        MAGIC,
        FLAGS,
        MAGIC.wrapping_add(FLAGS).wrapping_neg(),
        0x0010_0000,
        0x0010_0000,
        0,
        0,
        0x0010_0020,
    ] {
        k.extend_from_slice(&v.to_le_bytes());
    }
    // 0x20 outer: mov esi, 0x00400000
    k.extend_from_slice(&[0xBE, 0x00, 0x00, 0x40, 0x00]);
    // 0x25 inner: inc dword [esi]
    k.extend_from_slice(&[0xFF, 0x06]);
    // add esi, 0x1000
    k.extend_from_slice(&[0x81, 0xC6, 0x00, 0x10, 0x00, 0x00]);
    // cmp esi, end
    k.extend_from_slice(&[0x81, 0xFE]);
    k.extend_from_slice(&end.to_le_bytes());
    // jb inner ; jmp outer
    k.extend_from_slice(&[0x72, 0xF0, 0xEB, 0xE9]);
    k
}

/// Where [`write_then_read_kernel`] stores [`WRITES_DONE`] once its write phase is over
/// (guest-physical, so also the offset in the RAM file; below the region it writes).
pub const WRITES_DONE_AT: u32 = 0x0030_0000;
/// The marker ("ENOD" little-endian: "DONE" read as a dword).
pub const WRITES_DONE: u32 = 0x444F_4E45;

/// A multiboot kernel that first writes one dword per page over [4 MiB, `end`) for
/// `passes` passes (dirtying memory), stores [`WRITES_DONE`] at [`WRITES_DONE_AT`], then
/// only *reads* that region forever. Run on a postcopy destination, the reads fault on
/// pages not yet migrated (page requests on the return path, answered on the main or
/// preempt channel) without changing memory, so source and destination RAM stay
/// comparable. [`wait_for_dword`] on the source's RAM file tells when the writes are
/// over.
pub fn write_then_read_kernel(end: u32, passes: u32) -> Vec<u8> {
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 1 << 16;
    let mut k = Vec::new();
    for v in [
        MAGIC,
        FLAGS,
        MAGIC.wrapping_add(FLAGS).wrapping_neg(),
        0x0010_0000,
        0x0010_0000,
        0,
        0,
        0x0010_0020,
    ] {
        k.extend_from_slice(&v.to_le_bytes());
    }
    k.push(0xB9); // 0x20 mov ecx, passes
    k.extend_from_slice(&passes.to_le_bytes());
    k.extend_from_slice(&[0xBE, 0x00, 0x00, 0x40, 0x00]); // 0x25 outer: mov esi, 4 MiB
    k.extend_from_slice(&[0xFF, 0x06]); // 0x2A inner: inc dword [esi]
    k.extend_from_slice(&[0x81, 0xC6, 0x00, 0x10, 0x00, 0x00]); // add esi, 4096
    k.extend_from_slice(&[0x81, 0xFE]); // cmp esi, end
    k.extend_from_slice(&end.to_le_bytes());
    k.extend_from_slice(&[0x72, 0xF0]); // jb inner
    k.push(0x49); // dec ecx
    k.extend_from_slice(&[0x75, 0xE8]); // jnz outer
    k.extend_from_slice(&[0xC7, 0x05]); // 0x3D mov dword [WRITES_DONE_AT], WRITES_DONE
    k.extend_from_slice(&WRITES_DONE_AT.to_le_bytes());
    k.extend_from_slice(&WRITES_DONE.to_le_bytes());
    k.extend_from_slice(&[0xBE, 0x00, 0x00, 0x40, 0x00]); // 0x47 read: mov esi, 4 MiB
    k.extend_from_slice(&[0x8B, 0x06]); // 0x4C mov eax, [esi]
    k.extend_from_slice(&[0x81, 0xC6, 0x00, 0x10, 0x00, 0x00]); // add esi, 4096
    k.extend_from_slice(&[0x81, 0xFE]); // cmp esi, end
    k.extend_from_slice(&end.to_le_bytes());
    k.extend_from_slice(&[0x72, 0xF0, 0xEB, 0xE9]); // jb read_inner; jmp read
    k
}

/// Polls a guest's RAM file (shared with the running guest) until the dword at `offset`
/// reads `value`; panics after `timeout`.
pub async fn wait_for_dword(ram: &Path, offset: u32, value: u32, timeout: Duration) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(ram).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, u64::from(offset)).unwrap();
        if u32::from_le_bytes(b) == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the guest did not store {value:#x} at {offset:#x} within {timeout:?}",
            ram.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Linux guest booted directly (`-kernel`/`-initrd`/`-append`) with its console on
/// a serial port written to a log file (e.g. scripts/guest-linux.sh's kernel and
/// initramfs). The destination of a migration takes the same spec with `incoming`.
pub struct LinuxVmSpec<'a> {
    pub build: &'a QemuBuild,
    pub dir: &'a Path,
    pub name: String,
    pub ram_mib: u64,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub append: &'a str,
    /// `-incoming defer -S`: wait for `migrate-incoming`, stay paused afterwards.
    pub incoming: bool,
}

/// A running Linux guest (see `LinuxVmSpec`); the QEMU process is killed on drop.
pub struct LinuxVm {
    pub vm: Vm,
    pub serial: PathBuf,
}

impl LinuxVm {
    pub async fn start(spec: LinuxVmSpec<'_>) -> LinuxVm {
        let ram = shm_ram_path(spec.dir, &spec.name);
        std::fs::File::create(&ram)
            .unwrap()
            .set_len(spec.ram_mib << 20)
            .unwrap();
        let qmp_path = spec.dir.join(format!("{}.qmp", spec.name));
        let _ = std::fs::remove_file(&qmp_path);
        let log = spec.dir.join(format!("{}.qemu.log", spec.name));
        let serial = spec.dir.join(format!("{}.serial.log", spec.name));
        let _ = std::fs::remove_file(&serial);
        let mut cmd = Command::new(&spec.build.binary);
        base_args(
            &mut cmd,
            spec.build,
            &Hardware::default(),
            spec.ram_mib,
            &ram,
        );
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(spec.kernel)
            .arg("-initrd")
            .arg(spec.initrd)
            .arg("-append")
            .arg(spec.append);
        if spec.incoming {
            cmd.args(["-incoming", "defer", "-S"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // Until the Vm exists (its Drop cleans up), a failed QMP connection must not
        // leave the process or the RAM file behind.
        struct Guard(Option<Child>, PathBuf);
        impl Drop for Guard {
            fn drop(&mut self) {
                if let Some(mut c) = self.0.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                    let _ = std::fs::remove_file(&self.1);
                }
            }
        }
        let mut guard = Guard(Some(cmd.spawn().unwrap()), ram.clone());
        let qmp = Qmp::connect(&qmp_path, &log).await;
        LinuxVm {
            vm: Vm {
                child: guard.0.take().unwrap(),
                qmp,
                ram,
                dimm: None,
                log,
            },
            serial,
        }
    }

    /// Everything the guest wrote to its serial console so far.
    pub fn serial_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// The last `lines` lines of the serial console.
    pub fn serial_tail(&self, lines: usize) -> String {
        let log = self.serial_log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the serial console shows `marker`; panics after `timeout`, at once
    /// if QEMU exits or the guest kernel panics, with the serial log's tail and QEMU's
    /// own log.
    pub async fn wait_for_serial(&mut self, marker: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let log = self.serial_log();
            if log.contains(marker) {
                return;
            }
            let exited = self.vm.child.try_wait().ok().flatten();
            let kernel_panic = log.contains("Kernel panic - not syncing");
            if exited.is_some() || kernel_panic || start.elapsed() > timeout {
                if kernel_panic {
                    // Let the guest finish printing its trace.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                panic!(
                    "guest {} did not print {marker:?} within {timeout:?} \
                     (QEMU exit: {exited:?}, kernel panic: {kernel_panic})\n\
                     --- serial log tail ({}) ---\n{}\n--- QEMU log ---\n{}",
                    self.serial.display(),
                    self.serial.display(),
                    self.serial_tail(40),
                    self.vm.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Where a VM's RAM file lives: on tmpfs (fast; postcopy could register it with
/// userfaultfd), named by the process, the test's scratch directory and the VM, so
/// that tests running at once with the same VM names do not share a file.
/// The arguments every test VM shares: firmware, machine, RAM in a shared file.
fn base_args(cmd: &mut Command, build: &QemuBuild, hw: &Hardware, ram_mib: u64, ram: &Path) {
    if let Some(fw) = &build.firmware {
        cmd.arg("-L").arg(fw);
    }
    if !hw.default_devices {
        cmd.arg("-nodefaults");
    }
    cmd.args(["-no-user-config", "-display", "none", "-accel", "tcg"])
        .arg("-smp")
        .arg(hw.smp.to_string())
        .arg("-machine")
        .arg(format!("{},memory-backend=pc.ram", hw.machine))
        .arg("-m")
        .arg(match hw.dimm {
            None => format!("{ram_mib}M"),
            Some((mib, _)) => format!("{ram_mib}M,slots=2,maxmem={}M", ram_mib + 2 * mib),
        })
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=pc.ram,size={ram_mib}M,mem-path={},share=on",
            ram.display()
        ));
}

fn shm_ram_path(dir: &Path, vm: &str) -> PathBuf {
    let scratch = dir.file_name().and_then(|n| n.to_str()).unwrap_or("vm");
    PathBuf::from(format!(
        "/dev/shm/shrinker-test-{}-{scratch}-{vm}.ram",
        std::process::id()
    ))
}
