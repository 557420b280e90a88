//! Real QEMU migrations through two edge processes, on every QEMU build the project
//! supports (7.2 and 10.0, see scripts/install-qemu.sh): the destination's guest RAM
//! (and disk) must equal the source's byte for byte, and the source edge must have
//! recognised the stream as QEMU and every guest page in it.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::qemu::{
    assert_same_file, builds, dirtying_kernel, migrate_vm, migrate_with_mode, nonzero_pages,
    wait_for_dword, workload_ram, write_then_read_kernel, Hardware, Mode, QemuBuild, RamFill, Vm,
    VmSpec, WRITES_DONE, WRITES_DONE_AT,
};
use common::*;
use serde_json::json;

const RAM_MIB: u64 = 128;

fn s(v: &str) -> String {
    v.to_string()
}

/// Guest RAM of VM `vm` in a cluster: shared OS-like pages in a VM-specific order,
/// unique pages and zero pages.
fn cluster_ram(vm: u64) -> impl FnMut(&mut std::fs::File) {
    workload_ram(testkit::Workload::cluster(2026, 48 << 20), vm, RAM_MIB)
}

/// Guest RAM in which no page repeats another (pseudo-random, from `seed`).
fn unique_ram(seed: u64) -> impl FnMut(&mut std::fs::File) {
    move |f: &mut std::fs::File| {
        let mut xof = blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof();
        let mut w = std::io::BufWriter::new(f);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..RAM_MIB {
            xof.fill(&mut buf);
            w.write_all(&buf).unwrap();
        }
        w.flush().unwrap();
    }
}

/// Guest RAM of VM `vm` in a cluster whose shared pages are often near-duplicates
/// (a few words differ per VM: relocated pointers, counters).
fn near_cluster_ram(vm: u64) -> impl FnMut(&mut std::fs::File) {
    let workload = testkit::Workload::cluster(2027, 48 << 20).with_near_duplicates(400);
    workload_ram(workload, vm, RAM_MIB)
}

struct Pair {
    a: EdgeProc,
    b: EdgeProc,
}

/// Edge B accepts tunnels; edge A forwards `fwd[i]` to `dst[i]` through B.
fn start_pair(dir: &Path, net: u8, n: u16) -> (Pair, Vec<SocketAddr>, Vec<SocketAddr>) {
    start_pair_with(dir, net, n, &[])
}

fn start_pair_with(
    dir: &Path,
    net: u8,
    n: u16,
    extra: &[String],
) -> (Pair, Vec<SocketAddr>, Vec<SocketAddr>) {
    certs(dir, &["a", "b"]);
    let tunnel = addr(net, 17000);
    let fwd: Vec<SocketAddr> = (0..n).map(|i| addr(net, 14000 + i)).collect();
    let dst: Vec<SocketAddr> = (0..n).map(|i| addr(net, 15000 + i)).collect();
    let mut bargs = vec![
        s("--tunnel-listen"),
        tunnel.to_string(),
        s("--cache-mem"),
        s("2GiB"),
    ];
    bargs.extend_from_slice(extra);
    let b = EdgeProc::start(dir, "b", &bargs, tunnel);
    let mut args = vec![s("--cache-mem"), s("2GiB")];
    args.extend_from_slice(extra);
    for i in 0..n as usize {
        args.push(s("--forward"));
        args.push(format!("{}={}={}", fwd[i], tunnel, dst[i]));
    }
    let a = EdgeProc::start(dir, "a", &args, fwd[0]);
    (Pair { a, b }, fwd, dst)
}

/// One precopy migration through `via` into `dst` ([`migrate_vm`] with this file's RAM
/// size and no capabilities): RAM compared byte for byte; returns the source's
/// non-zero pages.
async fn migrate_one(
    build: &QemuBuild,
    dir: &Path,
    name: &str,
    via: SocketAddr,
    dst: SocketAddr,
    fill: Option<RamFill<'_>>,
    kernel: Option<&Path>,
) -> u64 {
    migrate_vm(
        (None, None),
        build,
        dir,
        name,
        (via, dst),
        RAM_MIB,
        fill,
        kernel,
        &Mode::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_vm_migrates_byte_exact() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-one-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 30 + i as u8, 1);
        let pages = migrate_one(
            build,
            dir.path(),
            "vm0",
            fwd[0],
            dst[0],
            Some(Box::new(cluster_ram(0))),
            None,
        )
        .await;
        let st = pair.a.wait_for("migration connection done", |c| {
            c["connections_completed"].as_u64().unwrap() >= 1
        });
        let c = &st["counters"];
        assert_eq!(
            c["qemu_streams"], 1,
            "QEMU {}: stream not recognised: {st}",
            build.name
        );
        assert_eq!(
            c["parser_fallbacks"],
            0,
            "QEMU {}: parser gave up: {}",
            build.name,
            pair.a.log()
        );
        assert!(
            c["protocol_blocks"].as_u64().unwrap() >= pages,
            "QEMU {}: {pages} guest pages, {c}",
            build.name
        );
        // The per-migration summary is in the snapshot too.
        let recent = &st["recent_connections"][0];
        assert_eq!(recent["kind"], "qemu-main", "{recent}");
        assert_eq!(recent["result"], "ok");
        assert!(recent["pages"].as_u64().unwrap() >= pages, "{recent}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_four_sequential_then_concurrent() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-cluster-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 32 + i as u8, 8);
        let mut pages = 0;
        for vm in 0..4u64 {
            let v = vm as usize;
            pages += migrate_one(
                build,
                dir.path(),
                &format!("seq{vm}"),
                fwd[v],
                dst[v],
                Some(Box::new(cluster_ram(vm))),
                None,
            )
            .await;
        }
        let seq = pair.a.wait_for("4 migrations", |c| {
            c["connections_completed"].as_u64().unwrap() >= 4
        });
        let (lan, wan) = (
            seq["counters"]["lan_bytes_in"].as_u64().unwrap(),
            seq["counters"]["wan_bytes_out"].as_u64().unwrap(),
        );
        assert!(seq["counters"]["protocol_blocks"].as_u64().unwrap() >= pages);
        // Shared pages cross once: the cluster costs far less than its size.
        assert!(wan * 2 < lan, "QEMU {}: WAN {wan} of LAN {lan}", build.name);
        // The same cluster again, all four at once, on fresh VMs (same content).
        let dir_ref = dir.path();
        let jobs = (0..4u64).map(|vm| {
            let v = 4 + vm as usize;
            let (f, d) = (fwd[v], dst[v]);
            async move {
                migrate_one(
                    build,
                    dir_ref,
                    &format!("con{vm}"),
                    f,
                    d,
                    Some(Box::new(cluster_ram(vm))),
                    None,
                )
                .await
            }
        });
        futures_join_all(jobs).await;
        let all = pair.a.wait_for("8 migrations", |c| {
            c["connections_completed"].as_u64().unwrap() >= 8
        });
        let c = &all["counters"];
        assert_eq!(c["parser_fallbacks"], 0, "{c}");
        assert_eq!(c["connections_failed"], 0, "{c}");
        let (lan2, wan2) = (
            c["lan_bytes_in"].as_u64().unwrap() - lan,
            c["wan_bytes_out"].as_u64().unwrap() - wan,
        );
        // Everything was seen before: the second round is almost all references.
        assert!(
            wan2 * 10 < lan2,
            "QEMU {}: concurrent round WAN {wan2} of LAN {lan2}",
            build.name
        );
    }
}

async fn futures_join_all<F: std::future::Future<Output = u64>>(jobs: impl Iterator<Item = F>) {
    let handles: Vec<_> = jobs.collect();
    // Poll all futures concurrently on this task.
    let mut set = Vec::new();
    for h in handles {
        set.push(Box::pin(h));
    }
    let mut done = vec![false; set.len()];
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in set.iter_mut().enumerate() {
            if !done[i] {
                if f.as_mut().poll(cx).is_ready() {
                    done[i] = true;
                } else {
                    all = false;
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writing_memory_needs_several_rounds_and_stays_exact() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-dirty-{}", build.name));
        let kernel = dir.path().join("dirty.bin");
        std::fs::write(&kernel, dirtying_kernel(0x0200_0000)).unwrap();
        let (pair, fwd, dst) = start_pair(dir.path(), 36 + i as u8, 1);
        migrate_one(
            build,
            dir.path(),
            "dirty",
            fwd[0],
            dst[0],
            Some(Box::new(cluster_ram(9))),
            Some(&kernel),
        )
        .await;
        let st = pair.a.wait_for("done", |c| {
            c["connections_completed"].as_u64().unwrap() >= 1
        });
        assert_eq!(st["counters"]["parser_fallbacks"], 0, "{st}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_block_migration_on_7_2() {
    let Some(build) = builds().into_iter().find(|b| b.name == "7.2") else {
        return; // SHRINKER_QEMU_ONLY excludes 7.2: block migration was removed in 9.1.
    };
    let dir = Scratch::new("qemu-blk");
    let (pair, fwd, dst) = start_pair(dir.path(), 38, 1);
    let (src_disk, dst_disk) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    {
        // 64 MiB disk: OS-like blocks shared with the guest's RAM, zeros, unique data.
        let mut f = std::fs::File::create(&src_disk).unwrap();
        let mut stream = testkit::Workload::cluster(2026, 48 << 20).stream(77, 64 << 20);
        while let Some(p) = stream.next_piece(1 << 20) {
            f.write_all(&p).unwrap();
        }
        std::fs::File::create(&dst_disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
    }
    let mut src = Vm::start(VmSpec {
        build: &build,
        dir: dir.path(),
        name: "blk-src".into(),
        ram_mib: RAM_MIB,
        ram_content: Some(Box::new(cluster_ram(5))),
        incoming: false,
        kernel: None,
        disk: Some(src_disk.clone()),
    })
    .await;
    let mut dstvm = Vm::start(VmSpec {
        build: &build,
        dir: dir.path(),
        name: "blk-dst".into(),
        ram_mib: RAM_MIB,
        ram_content: None,
        incoming: true,
        kernel: None,
        disk: Some(dst_disk.clone()),
    })
    .await;
    dstvm
        .qmp
        .cmd(
            "migrate-incoming",
            json!({"uri": format!("tcp:{}", dst[0])}),
        )
        .await;
    src.qmp
        .cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 8u64 << 30}),
        )
        .await;
    src.qmp
        .cmd(
            "migrate",
            json!({"uri": format!("tcp:{}", fwd[0]), "blk": true}),
        )
        .await;
    src.qmp.wait_migration(Duration::from_secs(300)).await;
    dstvm.qmp.wait_incoming_done(Duration::from_secs(120)).await;
    assert_same_file(&src.ram, &dstvm.ram);
    drop(src);
    drop(dstvm);
    assert_same_file(&src_disk, &dst_disk);
    let st = pair.a.wait_for("done", |c| {
        c["connections_completed"].as_u64().unwrap() >= 1
    });
    let c = &st["counters"];
    assert_eq!(c["parser_fallbacks"], 0, "{}", pair.a.log());
    // 64 MiB of disk = 16384 blocks, plus the RAM pages.
    assert!(c["protocol_blocks"].as_u64().unwrap() >= 16384, "{c}");
}

/// Captures a VM's migration stream into a file (`migrate "exec:cat > FILE"`).
async fn capture(build: &QemuBuild, dir: &Path, name: &str, fill: RamFill<'_>, out: &Path) {
    let mut src = Vm::start(VmSpec {
        build,
        dir,
        name: name.into(),
        ram_mib: RAM_MIB,
        ram_content: Some(fill),
        incoming: false,
        kernel: None,
        disk: None,
    })
    .await;
    src.qmp
        .cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 8u64 << 30}),
        )
        .await;
    src.qmp
        .cmd(
            "migrate",
            json!({"uri": format!("exec:cat > {}", out.display())}),
        )
        .await;
    src.qmp.wait_migration(Duration::from_secs(300)).await;
}

/// The cluster's WAN bytes through the pair are within 5% of the ideal that
/// `shrinker inspect` computes from captures of the same migrations, and inspect's
/// count of distinct pages agrees with one taken directly from the guests' RAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wan_bytes_near_ideal() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-ideal-{}", build.name));
        let (pair, fwd, dst) =
            start_pair_with(dir.path(), 40 + i as u8, 4, &[s("--compress"), s("always")]);
        let mut files = Vec::new();
        let mut distinct_ram = std::collections::HashSet::new();
        for vm in 0..4u64 {
            let f = dir.path().join(format!("vm{vm}.mig"));
            capture(
                build,
                dir.path(),
                &format!("cap{vm}"),
                Box::new(cluster_ram(vm)),
                &f,
            )
            .await;
            files.push(f);
            let mut ram = Vec::new();
            cluster_ram(vm)(&mut tempfile_rw(dir.path(), &mut ram));
            for p in ram.chunks(4096).filter(|p| p.iter().any(|&b| b != 0)) {
                distinct_ram.insert(blake3::hash(p));
            }
        }
        for vm in 0..4u64 {
            let v = vm as usize;
            migrate_one(
                build,
                dir.path(),
                &format!("m{vm}"),
                fwd[v],
                dst[v],
                Some(Box::new(cluster_ram(vm))),
                None,
            )
            .await;
        }
        let st = pair.a.wait_for("4 migrations", |c| {
            c["connections_completed"].as_u64().unwrap() >= 4
        });
        let wan = st["counters"]["wan_bytes_out"].as_u64().unwrap();
        let report = inspect_report(&files);
        let total = &report["total"];
        let ideal = total["ideal_bytes"].as_u64().unwrap();
        let distinct = total["distinct_blocks"].as_u64().unwrap();
        // ROM blocks (BIOS, option ROMs, ACPI tables) add a few distinct pages.
        let ram_distinct = distinct_ram.len() as u64;
        assert!(
            distinct >= ram_distinct && distinct <= ram_distinct + 256,
            "QEMU {}: inspect found {distinct} distinct blocks, the RAM files hold {ram_distinct}",
            build.name
        );
        eprintln!(
            "QEMU {}: cluster LAN {} B, pair WAN {wan} B (TLS included), ideal {ideal} B, ratio {:.4}",
            build.name,
            total["bytes"],
            wan as f64 / ideal as f64
        );
        assert!(
            (wan as f64) <= 1.05 * ideal as f64,
            "QEMU {}: WAN {wan} B is more than 1.05 x the ideal {ideal} B",
            build.name
        );
        // The tunnel a user would otherwise build: zstd -3 with long-range matching
        // (--long=27, a 128 MiB window) per connection.
        let mut zstd_long = 0u64;
        for f in &files {
            let out = std::process::Command::new("zstd")
                .args(["-3", "--long=27", "-c", "-q"])
                .arg(f)
                .output()
                .expect("zstd CLI (scripts/test.sh installs it)");
            assert!(out.status.success());
            zstd_long += out.stdout.len() as u64;
        }
        eprintln!(
            "QEMU {}: zstd -3 --long=27 per connection {zstd_long} B",
            build.name
        );
        assert!(
            wan < zstd_long,
            "QEMU {}: pair {wan} B vs zstd --long=27 {zstd_long} B",
            build.name
        );
    }
}

/// A cluster of similar VMs whose shared pages are often near-duplicates: the pair
/// sends those as deltas, migrations stay byte-exact, and the WAN carries far fewer
/// bytes than the exact-page ideal and about what one zstd -3 --long=30 stream shared
/// by all four migrations makes of them (the best general compressor setting a user
/// could pick; this workload's new pages are half random, so nothing compresses them
/// much further, and the stream pays almost nothing per repeated run of pages while
/// the pair pays a reference or a delta header per page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_duplicate_pages_cross_as_deltas() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-near-{}", build.name));
        let (pair, fwd, dst) =
            start_pair_with(dir.path(), 60 + i as u8, 4, &[s("--compress"), s("always")]);
        let mut files = Vec::new();
        for vm in 0..4u64 {
            let f = dir.path().join(format!("vm{vm}.mig"));
            capture(
                build,
                dir.path(),
                &format!("ncap{vm}"),
                Box::new(near_cluster_ram(vm)),
                &f,
            )
            .await;
            files.push(f);
        }
        for vm in 0..4u64 {
            let v = vm as usize;
            migrate_one(
                build,
                dir.path(),
                &format!("n{vm}"),
                fwd[v],
                dst[v],
                Some(Box::new(near_cluster_ram(vm))),
                None,
            )
            .await;
        }
        let st = pair.a.wait_for("4 migrations", |c| {
            c["connections_completed"].as_u64().unwrap() >= 4
        });
        let c = &st["counters"];
        let wan = c["wan_bytes_out"].as_u64().unwrap();
        let deltas = c["deltas_sent"].as_u64().unwrap();
        let applied = pair.b.counter("deltas_applied");
        assert_eq!(deltas, applied, "every delta rebuilt at the far edge");
        let report = inspect_report(&files);
        let ideal = report["total"]["ideal_bytes"].as_u64().unwrap();
        let all: Vec<u8> = files
            .iter()
            .flat_map(|f| std::fs::read(f).unwrap())
            .collect();
        let shared_long30 = zstd_cli_len(&["-3", "--long=30"], &all);
        eprintln!(
            "QEMU {}: near-duplicate cluster: pair WAN {wan} B (TLS included), {deltas} deltas \
             ({} B of pages as {} B of patches); exact-page ideal {ideal} B; one shared \
             zstd -3 --long=30 stream {shared_long30} B; pair/shared {:.3}",
            build.name,
            c["delta_bytes"],
            c["delta_patch_bytes"],
            wan as f64 / shared_long30 as f64
        );
        assert!(deltas > 10_000, "QEMU {}: only {deltas} deltas", build.name);
        // Measured 0.54 of the ideal and 1.046 of the shared stream (2026-11-25).
        assert!(
            (wan as f64) < 0.65 * ideal as f64,
            "QEMU {}: WAN {wan} B not well below the exact-page ideal {ideal} B",
            build.name
        );
        assert!(
            (wan as f64) <= 1.10 * shared_long30 as f64,
            "QEMU {}: WAN {wan} B vs one shared zstd --long=30 stream {shared_long30} B",
            build.name
        );
    }
}

/// Bytes `zstd ARGS` makes of `data`.
fn zstd_cli_len(args: &[&str], data: &[u8]) -> u64 {
    use std::process::{Command, Stdio};
    let mut child = Command::new("zstd")
        .args(args)
        .args(["-c", "-q", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("zstd CLI (scripts/test.sh installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success());
    out.stdout.len() as u64
}

/// Runs a RAM fill function into memory (through a scratch file).
fn tempfile_rw<'a>(dir: &Path, sink: &'a mut Vec<u8>) -> FileToVec<'a> {
    FileToVec {
        file: std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("ram-scratch"))
            .unwrap(),
        sink,
    }
}

struct FileToVec<'a> {
    file: std::fs::File,
    sink: &'a mut Vec<u8>,
}

impl std::ops::Deref for FileToVec<'_> {
    type Target = std::fs::File;
    fn deref(&self) -> &std::fs::File {
        &self.file
    }
}

impl std::ops::DerefMut for FileToVec<'_> {
    fn deref_mut(&mut self) -> &mut std::fs::File {
        &mut self.file
    }
}

impl Drop for FileToVec<'_> {
    fn drop(&mut self) {
        use std::io::{Read, Seek};
        self.file.seek(std::io::SeekFrom::Start(0)).unwrap();
        self.file.read_to_end(self.sink).unwrap();
    }
}

/// multifd with 4 channels: the channels reach the destination in the order the
/// source opened them (7.2 tells main from multifd by accept order only), every page
/// on a multifd channel is found, and a cluster deduplicates across channels and VMs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_four_channels_one_vm_and_cluster() {
    let mode = Mode {
        caps: vec!["multifd"],
        params: json!({"multifd-channels": 4}),
    };
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-multifd-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 44 + i as u8, 4);
        let mut pages = 0;
        for vm in 0..4u64 {
            let v = vm as usize;
            pages += migrate_with_mode(
                (None, None),
                build,
                dir.path(),
                &format!("mf{vm}"),
                (fwd[v], dst[v]),
                RAM_MIB,
                Box::new(cluster_ram(vm)),
                &mode,
            )
            .await;
            let want = 5 * (vm + 1);
            let st = pair.a.wait_for("main + 4 multifd channels", |c| {
                c["connections_completed"].as_u64().unwrap() >= want
            });
            let c = &st["counters"];
            assert_eq!(
                c["multifd_channels"].as_u64().unwrap(),
                4 * (vm + 1),
                "QEMU {}: {c}",
                build.name
            );
            assert_eq!(
                c["qemu_streams"].as_u64().unwrap(),
                vm + 1,
                "QEMU {}: {c}",
                build.name
            );
            assert_eq!(
                c["parser_fallbacks"],
                0,
                "QEMU {}: {}",
                build.name,
                pair.a.log()
            );
        }
        let st = pair.a.stats();
        let c = &st["counters"];
        assert!(
            c["protocol_blocks"].as_u64().unwrap() >= pages,
            "QEMU {}: {pages} pages, {c}",
            build.name
        );
        let (lan, wan) = (
            c["lan_bytes_in"].as_u64().unwrap(),
            c["wan_bytes_out"].as_u64().unwrap(),
        );
        eprintln!(
            "QEMU {} multifd cluster: LAN {lan} B, WAN {wan} B",
            build.name
        );
        assert!(
            wan * 2 < lan,
            "QEMU {}: multifd cluster WAN {wan} of LAN {lan}",
            build.name
        );
    }
}

/// multifd with QEMU's own compression (zstd, then zlib): every packet's payload is
/// opaque to the pair, skipped by the length its header gives, so the parser must stay
/// in step with the packets (no fallback) and the guest memory arrive byte-exact, with
/// a guest that writes memory so that sync packets come between compressed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_with_qemu_compression_is_relayed_exactly() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-mf-comp-{}", build.name));
        let kernel = dir.path().join("dirty.bin");
        std::fs::write(&kernel, dirtying_kernel(0x0100_0000)).unwrap();
        let (pair, fwd, dst) = start_pair(dir.path(), 68 + i as u8, 2);
        let mut opaque_before = 0;
        for (k, method) in ["zstd", "zlib"].into_iter().enumerate() {
            let mode = Mode {
                caps: vec!["multifd"],
                params: json!({"multifd-channels": 2, "multifd-compression": method}),
            };
            migrate_vm(
                (None, None),
                build,
                dir.path(),
                &format!("mfc-{method}"),
                (fwd[k], dst[k]),
                RAM_MIB,
                Some(Box::new(cluster_ram(k as u64))),
                Some(&kernel),
                &mode,
            )
            .await;
            let want = 3 * (k as u64 + 1);
            let st = pair.a.wait_for("main + 2 multifd channels", |c| {
                c["connections_completed"].as_u64().unwrap() >= want
            });
            let c = &st["counters"];
            assert_eq!(
                c["multifd_channels"].as_u64().unwrap(),
                2 * (k as u64 + 1),
                "QEMU {} {method}: {c}",
                build.name
            );
            assert_eq!(
                c["parser_fallbacks"],
                0,
                "QEMU {} {method}: {}",
                build.name,
                pair.a.log()
            );
            // The compressed payloads were recognised as such (skipped as opaque
            // packets), not content-chunked after a loss of step.
            let opaque = c["parsed_opaque_bytes"].as_u64().unwrap();
            assert!(
                opaque - opaque_before > 1 << 20,
                "QEMU {} {method}: {} opaque bytes: {c}",
                build.name,
                opaque - opaque_before
            );
            opaque_before = opaque;
        }
    }
}

/// Postcopy switched on mid-migration while the guest writes memory: the return path
/// (destination → source, same connection) is relayed promptly, pages sent in
/// postcopy are parsed too, and the destination ends byte-exact. The destination stays
/// paused (`-S`), so its RAM is exactly what the migration delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_switched_mid_migration_with_a_writing_guest() {
    for (i, build) in builds().iter().enumerate() {
        for preempt in [false, true] {
            if preempt && build.name == "7.2" {
                continue; // postcopy-preempt on 7.2 opens its channel at setup; covered on 10.0
            }
            let dir = Scratch::new(&format!("qemu-postcopy-{}-{preempt}", build.name));
            let kernel = dir.path().join("dirty.bin");
            std::fs::write(&kernel, dirtying_kernel(0x0200_0000)).unwrap();
            let (pair, fwd, dst) = start_pair(dir.path(), 48 + 2 * i as u8 + preempt as u8, 1);
            let mut src = Vm::start(VmSpec {
                build,
                dir: dir.path(),
                name: "pc-src".into(),
                ram_mib: RAM_MIB,
                ram_content: Some(Box::new(cluster_ram(3))),
                incoming: false,
                kernel: Some(kernel.clone()),
                disk: None,
            })
            .await;
            let mut dstvm = Vm::start(VmSpec {
                build,
                dir: dir.path(),
                name: "pc-dst".into(),
                ram_mib: RAM_MIB,
                ram_content: None,
                incoming: true,
                kernel: Some(kernel.clone()),
                disk: None,
            })
            .await;
            let mut caps = vec![json!({"capability": "postcopy-ram", "state": true})];
            if preempt {
                caps.push(json!({"capability": "postcopy-preempt", "state": true}));
            }
            for vm in [&mut src, &mut dstvm] {
                vm.qmp
                    .cmd("migrate-set-capabilities", json!({ "capabilities": caps }))
                    .await;
            }
            // Slow enough that precopy is still running when postcopy is switched on.
            src.start_migration_into(&mut dstvm, fwd[0], dst[0], 64u64 << 20)
                .await;
            // Switch once precopy is under way (a fixed pause was the habit; the
            // dirtying guest keeps precopy from converging, so this cannot be late).
            src.qmp.wait_transferred(16 << 20).await;
            src.qmp.cmd("migrate-start-postcopy", json!({})).await;
            src.qmp
                .cmd(
                    "migrate-set-parameters",
                    json!({"max-bandwidth": 8u64 << 30}),
                )
                .await;
            let info = src.qmp.wait_migration(Duration::from_secs(300)).await;
            // The destination finishes loading after the source reports completion.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let st = dstvm.qmp.cmd("query-migrate", json!({})).await;
                if st["status"] == "completed" {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "destination not done: {st}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                info["ram"]["postcopy-requests"].is_u64(),
                "QEMU {}: not a postcopy migration? {info}",
                build.name
            );
            dstvm.qmp.wait_incoming_done(Duration::from_secs(120)).await;
            assert_same_file(&src.ram, &dstvm.ram);
            let n = if preempt { 2 } else { 1 };
            let st = pair.a.wait_for("postcopy connections done", |c| {
                c["connections_completed"].as_u64().unwrap() >= n
            });
            let c = &st["counters"];
            assert_eq!(
                c["connections_failed"],
                0,
                "QEMU {}: {}",
                build.name,
                pair.a.log()
            );
            assert_eq!(c["qemu_streams"], 1, "{c}");
            assert_eq!(c["parser_fallbacks"], 0, "{}", pair.a.log());
            if preempt {
                // Whether requested pages travel on the preempt channel depends on
                // timing (a page already on its way on the main channel is not sent
                // again); when the preempt channel carried anything, it must have been
                // recognised and parsed.
                let recent = st["recent_connections"].as_array().unwrap();
                let other: Vec<_> = recent.iter().filter(|r| r["kind"] != "qemu-main").collect();
                assert_eq!(other.len(), 1, "QEMU {}: {recent:?}", build.name);
                if other[0]["lan_in"].as_u64().unwrap() > 0 {
                    assert_eq!(
                        c["preempt_channels"], 1,
                        "QEMU {}: preempt channel not recognised: {c}",
                        build.name
                    );
                }
            }
            eprintln!(
                "QEMU {} postcopy (preempt {preempt}): preempt channels parsed {}, {info}",
                build.name, c["preempt_channels"]
            );
        }
    }
}

/// xbzrle (delta-encoded dirty pages) is relayed exactly; its deltas stay opaque.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xbzrle_with_a_writing_guest() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-xbzrle-{}", build.name));
        let kernel = dir.path().join("dirty.bin");
        // A small hot region, so later rounds are mostly deltas.
        std::fs::write(&kernel, dirtying_kernel(0x0080_0000)).unwrap();
        let (pair, fwd, dst) = start_pair(dir.path(), 52 + i as u8, 1);
        let mut src = Vm::start(VmSpec {
            build,
            dir: dir.path(),
            name: "x-src".into(),
            ram_mib: RAM_MIB,
            ram_content: Some(Box::new(cluster_ram(4))),
            incoming: false,
            kernel: Some(kernel.clone()),
            disk: None,
        })
        .await;
        let mut dstvm = Vm::start(VmSpec {
            build,
            dir: dir.path(),
            name: "x-dst".into(),
            ram_mib: RAM_MIB,
            ram_content: None,
            incoming: true,
            kernel: Some(kernel.clone()),
            disk: None,
        })
        .await;
        let caps = json!({"capabilities": [{"capability": "xbzrle", "state": true}]});
        src.qmp.cmd("migrate-set-capabilities", caps.clone()).await;
        dstvm.qmp.cmd("migrate-set-capabilities", caps).await;
        dstvm
            .qmp
            .cmd(
                "migrate-incoming",
                json!({"uri": format!("tcp:{}", dst[0])}),
            )
            .await;
        src.qmp
            .cmd(
                "migrate-set-parameters",
                // The first pass takes ~2 s; after it, the hot pages cannot fit in the
                // downtime budget, so rounds repeat and hit the xbzrle cache.
                json!({"max-bandwidth": 64u64 << 20, "downtime-limit": 1, "xbzrle-cache-size": 64u64 << 20}),
            )
            .await;
        src.qmp
            .cmd("migrate", json!({"uri": format!("tcp:{}", fwd[0])}))
            .await;
        // Let rounds go by until xbzrle has encoded pages (the downtime budget of 1 ms
        // keeps the migration from converging meanwhile), then allow convergence. A
        // fixed 2.5 s was once too short in CI: the first pass took longer on a busy
        // machine, and the migration converged before any page was a cache hit.
        src.qmp
            .wait_migrate_until("an xbzrle-encoded page", Duration::from_secs(120), |v| {
                v["xbzrle-cache"]["pages"].as_u64().unwrap_or(0) > 0
            })
            .await;
        src.qmp
            .cmd("migrate-set-parameters", json!({"downtime-limit": 5000}))
            .await;
        let info = src.qmp.wait_migration(Duration::from_secs(300)).await;
        let xbzrle_pages = info["xbzrle-cache"]["pages"].as_u64().unwrap_or(0);
        assert!(
            xbzrle_pages > 0,
            "QEMU {}: xbzrle never encoded a page: {info}",
            build.name
        );
        dstvm.qmp.wait_incoming_done(Duration::from_secs(120)).await;
        assert_same_file(&src.ram, &dstvm.ram);
        let st = pair.a.wait_for("done", |c| {
            c["connections_completed"].as_u64().unwrap() >= 1
        });
        assert_eq!(st["counters"]["parser_fallbacks"], 0, "{}", pair.a.log());
        eprintln!("QEMU {}: xbzrle pages {xbzrle_pages}", build.name);
    }
}

/// QEMU's own TLS: the stream is opaque to the edge (nothing to parse), but it is
/// relayed exactly and the migration completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tls_is_relayed_exactly() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-tls-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 54 + i as u8, 1);
        // QEMU's x509 credentials directory, made with openssl: QEMU (GnuTLS) wants
        // RSA-style key usage (keyEncipherment) that the edge's ECDSA certs do not need.
        let pki = dir.path().join("qemu-pki");
        qemu_pki(&pki);
        let mut src = Vm::start(VmSpec {
            build,
            dir: dir.path(),
            name: "t-src".into(),
            ram_mib: RAM_MIB,
            ram_content: Some(Box::new(cluster_ram(6))),
            incoming: false,
            kernel: None,
            disk: None,
        })
        .await;
        let mut dstvm = Vm::start(VmSpec {
            build,
            dir: dir.path(),
            name: "t-dst".into(),
            ram_mib: RAM_MIB,
            ram_content: None,
            incoming: true,
            kernel: None,
            disk: None,
        })
        .await;
        for (vm, endpoint) in [(&mut src, "client"), (&mut dstvm, "server")] {
            vm.qmp
                .cmd(
                    "object-add",
                    json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": pki.display().to_string(), "endpoint": endpoint, "verify-peer": true}),
                )
                .await;
            vm.qmp
                .cmd(
                    "migrate-set-parameters",
                    json!({"tls-creds": "tls0", "tls-hostname": "qemu-dst"}),
                )
                .await;
        }
        src.migrate_into(&mut dstvm, fwd[0], dst[0]).await;
        let st = pair.a.wait_for("done", |c| {
            c["connections_completed"].as_u64().unwrap() >= 1
        });
        let c = &st["counters"];
        assert_eq!(c["qemu_streams"], 0, "a TLS stream cannot be parsed: {c}");
        assert_eq!(c["connections_failed"], 0, "{c}");
    }
}

/// Writes ca-cert.pem, server-cert/key.pem (CN qemu-dst) and client-cert/key.pem with
/// openssl, in the layout QEMU's tls-creds-x509 expects.
fn qemu_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:qemu-dst\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "30",
        "-subj",
        "/CN=test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    for (name, cn) in [("server", "qemu-dst"), ("client", "qemu-src")] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{name}-cert.pem"),
            "-days",
            "30",
            "-extfile",
            "leaf.ext",
        ]);
    }
}

fn write_disk(path: &Path, stream_index: u64, mib: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    // Same page pool as the guests' RAM: disks and memory share OS-like content.
    let mut stream = testkit::Workload::cluster(2026, 48 << 20).stream(stream_index, mib << 20);
    while let Some(p) = stream.next_piece(1 << 20) {
        f.write_all(&p).unwrap();
    }
    f.flush().unwrap();
}

/// Mirrors `src_disk` of a source VM to an NBD export of `dst_disk` on a destination
/// VM, through the pair (`via` forwards to the destination's NBD server at `nbd`).
async fn nbd_mirror(
    build: &QemuBuild,
    dir: &Path,
    name: &str,
    src_disk: &Path,
    dst_disk: &Path,
    via: SocketAddr,
    nbd: SocketAddr,
) {
    let mut dstvm = Vm::start(VmSpec {
        build,
        dir,
        name: format!("{name}-nbd-dst"),
        ram_mib: 16,
        ram_content: None,
        incoming: false,
        kernel: None,
        disk: Some(dst_disk.to_path_buf()),
    })
    .await;
    let mut src = Vm::start(VmSpec {
        build,
        dir,
        name: format!("{name}-nbd-src"),
        ram_mib: 16,
        ram_content: None,
        incoming: false,
        kernel: None,
        disk: Some(src_disk.to_path_buf()),
    })
    .await;
    dstvm
        .qmp
        .cmd(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": nbd.ip().to_string(), "port": nbd.port().to_string()}}}),
        )
        .await;
    dstvm
        .qmp
        .cmd("nbd-server-add", json!({"device": "d0", "writable": true}))
        .await;
    src.qmp
        .cmd(
            "drive-mirror",
            json!({"job-id": "m0", "device": "d0", "target": format!("nbd://{via}/d0"), "format": "raw", "mode": "existing", "sync": "full"}),
        )
        .await;
    src.finish_mirror("m0", Duration::from_secs(300)).await;
    dstvm.qmp.cmd("nbd-server-stop", json!({})).await;
    drop(src);
    drop(dstvm);
    assert_same_file(src_disk, dst_disk);
}

/// NBD drive-mirror through the pair: the copy is byte-exact, WRITE payloads are
/// recognised as disk blocks, and disk blocks and memory pages share one store: a VM
/// whose disk crossed first has RAM pages that are references to disk blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_mirror_then_ram_share_one_store() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-nbd-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 56 + i as u8, 2);
        let (src_disk, dst_disk) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
        write_disk(&src_disk, 100, 96);
        std::fs::File::create(&dst_disk)
            .unwrap()
            .set_len(96 << 20)
            .unwrap();
        nbd_mirror(build, dir.path(), "d", &src_disk, &dst_disk, fwd[0], dst[0]).await;
        let st = pair.a.wait_for("mirror connection done", |c| {
            c["connections_completed"].as_u64().unwrap() >= 1
        });
        let disk = &st["recent_connections"][0];
        assert_eq!(disk["kind"], "nbd-client", "QEMU {}: {disk}", build.name);
        assert_eq!(disk["result"], "ok");
        assert!(
            disk["blocks"].as_u64().unwrap() >= 20_000,
            "QEMU {}: disk blocks: {disk}",
            build.name
        );
        assert_eq!(st["counters"]["parser_fallbacks"], 0);
        // Now the RAM: most of its pool pages already crossed as disk blocks.
        migrate_one(
            build,
            dir.path(),
            "ram",
            fwd[1],
            dst[1],
            Some(Box::new(cluster_ram(0))),
            None,
        )
        .await;
        let st = pair.a.wait_for("RAM migration done", |c| {
            c["connections_completed"].as_u64().unwrap() >= 2
        });
        let ram = &st["recent_connections"][1];
        assert_eq!(ram["kind"], "qemu-main", "{ram}");
        let (refs, pages) = (
            ram["refs"].as_u64().unwrap(),
            ram["pages"].as_u64().unwrap(),
        );
        eprintln!(
            "QEMU {}: disk {disk}\nRAM after disk: {pages} pages, {refs} sent as references",
            build.name
        );
        assert!(
            refs * 2 > pages,
            "QEMU {}: RAM pages equal to disk blocks should be references: {ram}",
            build.name
        );
    }
}

/// Records every connection a migration source opens (main + multifd channels) into
/// files, in accept order: a capture of a multifd migration. Precopy needs nothing back.
async fn capture_multifd(
    build: &QemuBuild,
    dir: &Path,
    vm: u64,
    sink: SocketAddr,
    channels: u32,
) -> Vec<std::path::PathBuf> {
    let listener = tokio::net::TcpListener::bind(sink).await.unwrap();
    let prefix = dir.join(format!("mf-cap{vm}"));
    let n = channels as usize + 1;
    let writer = tokio::spawn(async move {
        let mut files = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..n {
            let (mut s, _) = listener.accept().await.unwrap();
            let path = std::path::PathBuf::from(format!("{}-{i}.bin", prefix.display()));
            files.push(path.clone());
            tasks.push(tokio::spawn(async move {
                let mut f = tokio::fs::File::create(&path).await.unwrap();
                tokio::io::copy(&mut s, &mut f).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        files
    });
    let mut src = Vm::start(VmSpec {
        build,
        dir,
        name: format!("mfcap{vm}"),
        ram_mib: RAM_MIB,
        ram_content: Some(Box::new(cluster_ram(vm))),
        incoming: false,
        kernel: None,
        disk: None,
    })
    .await;
    src.qmp
        .cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        )
        .await;
    src.qmp
        .cmd(
            "migrate-set-parameters",
            json!({"multifd-channels": channels, "max-bandwidth": 8u64 << 30}),
        )
        .await;
    src.qmp
        .cmd("migrate", json!({"uri": format!("tcp:{sink}")}))
        .await;
    src.qmp.wait_migration(Duration::from_secs(300)).await;
    drop(src);
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .unwrap()
        .unwrap()
}

/// multifd cluster: WAN bytes within 5% of the ideal `shrinker inspect` computes from
/// captures of the same multifd migrations (every channel), and every page found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_cluster_wan_bytes_near_ideal() {
    let mode = Mode {
        caps: vec!["multifd"],
        params: json!({"multifd-channels": 4}),
    };
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-mf-ideal-{}", build.name));
        // 60/61 belong to `near_duplicate_pages_cross_as_deltas`, which may run at the
        // same time (tests in one binary run in parallel).
        let net = 62 + i as u8;
        let (pair, fwd, dst) = start_pair_with(dir.path(), net, 4, &[s("--compress"), s("always")]);
        let mut files = Vec::new();
        for vm in 0..4u64 {
            files.extend(
                capture_multifd(build, dir.path(), vm, addr(net, 16000 + vm as u16), 4).await,
            );
        }
        let mut pages = 0;
        for vm in 0..4u64 {
            let v = vm as usize;
            pages += migrate_with_mode(
                (None, None),
                build,
                dir.path(),
                &format!("mfi{vm}"),
                (fwd[v], dst[v]),
                RAM_MIB,
                Box::new(cluster_ram(vm)),
                &mode,
            )
            .await;
        }
        let st = pair.a.wait_for("20 connections", |c| {
            c["connections_completed"].as_u64().unwrap() >= 20
        });
        let c = &st["counters"];
        assert_eq!(c["parser_fallbacks"], 0, "{c}");
        assert!(
            c["protocol_blocks"].as_u64().unwrap() >= pages,
            "QEMU {}: {pages} pages, {c}",
            build.name
        );
        let wan = c["wan_bytes_out"].as_u64().unwrap();
        let report = inspect_report(&files);
        let ideal = report["total"]["ideal_bytes"].as_u64().unwrap();
        let kinds = inspected_kinds(&report);
        assert_eq!(
            kinds.iter().filter(|k| **k == "qemu-multifd").count(),
            16,
            "{kinds:?}"
        );
        eprintln!(
            "QEMU {} multifd cluster: pair WAN {wan} B (TLS included), ideal {ideal} B, ratio {:.4}",
            build.name,
            wan as f64 / ideal as f64
        );
        // With 4 channels in parallel a page can be a CHUNK on one channel and a
        // reference on another that overtakes it. Such references go as REF_RECENT and
        // the destination edge waits for the sibling's copy instead of asking for a
        // FILL (without that wait: 1.04-1.14 here, all of the excess in FILLs).
        let fills = pair.a.counter("fills_sent");
        let deferred = pair.b.counter("refs_deferred");
        let arrived = pair.b.counter("refs_deferred_arrived");
        eprintln!(
            "QEMU {}: refs_recent_sent {}, refs_deferred {deferred}, arrived {arrived}, fills sent {fills}",
            build.name,
            pair.a.counter("refs_recent_sent"),
        );
        assert!(
            (wan as f64) <= 1.05 * ideal as f64,
            "QEMU {}: WAN {wan} > 1.05 x ideal {ideal} (fills {fills}, deferred {deferred}, arrived {arrived})",
            build.name
        );
    }
}

/// Starts a guest that writes memory and then only reads it (`write_then_read_kernel`)
/// and a *running* incoming destination, enables postcopy (and preempt) on both,
/// migrates through `fwd` at a slow background rate once the guest's write phase is
/// over (from then on a running destination cannot change memory), switches to
/// postcopy once precopy is under way and returns when the destination has asked for
/// a page. Shared by the postcopy tests with a running destination.
#[allow(clippy::too_many_arguments)]
async fn postcopy_with_a_running_destination(
    build: &QemuBuild,
    dir: &Path,
    name: &str,
    ram: u64,
    preempt: bool,
    rate: u64,
    fwd: SocketAddr,
    dst: SocketAddr,
) -> (Vm, Vm) {
    let kernel = dir.join(format!("{name}-wr.bin"));
    std::fs::write(&kernel, write_then_read_kernel(0x0600_0000, 20)).unwrap();
    let mut src = Vm::start(VmSpec {
        build,
        dir,
        name: format!("{name}-src"),
        ram_mib: RAM_MIB,
        ram_content: Some(Box::new(cluster_ram(ram))),
        incoming: false,
        kernel: Some(kernel.clone()),
        disk: None,
    })
    .await;
    let mut dstvm = Vm::start(VmSpec {
        build,
        dir,
        name: format!("{name}-dst-run"),
        ram_mib: RAM_MIB,
        ram_content: None,
        incoming: true,
        kernel: Some(kernel),
        disk: None,
    })
    .await;
    let mut caps = vec![json!({"capability": "postcopy-ram", "state": true})];
    if preempt {
        caps.push(json!({"capability": "postcopy-preempt", "state": true}));
    }
    for vm in [&mut src, &mut dstvm] {
        vm.qmp
            .cmd("migrate-set-capabilities", json!({ "capabilities": caps }))
            .await;
    }
    dstvm
        .qmp
        .cmd("migrate-incoming", json!({"uri": format!("tcp:{dst}")}))
        .await;
    // Postcopy has its own limit, unlimited unless set: without it the rest of RAM
    // crossed within a fraction of a second of the switch, and an edge killed after the
    // first page request could find the source already done (7.2 then never pauses).
    src.qmp
        .cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": rate, "max-postcopy-bandwidth": rate}),
        )
        .await;
    // The write phase: 20 passes over 88 MiB.
    wait_for_dword(
        &src.ram,
        WRITES_DONE_AT,
        WRITES_DONE,
        Duration::from_secs(120),
    )
    .await;
    src.qmp
        .cmd("migrate", json!({"uri": format!("tcp:{fwd}")}))
        .await;
    src.qmp.wait_transferred(4 << 20).await;
    src.qmp.cmd("migrate-start-postcopy", json!({})).await;
    src.qmp
        .wait_migrate_until("a postcopy page request", Duration::from_secs(120), |v| {
            v["status"] == "postcopy-active"
                && v["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0
        })
        .await;
    (src, dstvm)
}

/// Postcopy with a *running* destination: its vCPU faults on pages not yet migrated,
/// the page requests travel the return path, and the pages come back on the main
/// channel (7.2) or the preempt channel (10.0, postcopy-preempt), which the edge
/// recognises and parses. The guest only reads after a short write phase, so both
/// RAM files must end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_page_requests_from_a_running_destination() {
    for (i, build) in builds().iter().enumerate() {
        let preempt = build.name != "7.2";
        let dir = Scratch::new(&format!("qemu-pcreq-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 64 + i as u8, 1);
        // A slow background push keeps the running destination asking for pages.
        let (mut src, mut dstvm) = postcopy_with_a_running_destination(
            build,
            dir.path(),
            "req",
            7,
            preempt,
            16 << 20,
            fwd[0],
            dst[0],
        )
        .await;
        src.qmp
            .cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": 8u64 << 30, "max-postcopy-bandwidth": 8u64 << 30}),
            )
            .await;
        let info = src.qmp.wait_migration(Duration::from_secs(300)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let st = dstvm.qmp.cmd("query-migrate", json!({})).await;
            if st["status"] == "completed" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "destination not done: {st}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let requests = info["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
        assert!(
            requests > 0,
            "QEMU {}: the running destination requested no page: {info}",
            build.name
        );
        dstvm.qmp.wait_incoming_done(Duration::from_secs(120)).await;
        assert_same_file(&src.ram, &dstvm.ram);
        let n = 1 + u64::from(preempt);
        let st = pair.a.wait_for("connections done", |c| {
            c["connections_completed"].as_u64().unwrap() >= n
        });
        let c = &st["counters"];
        assert_eq!(c["connections_failed"], 0, "{}", pair.a.log());
        assert_eq!(c["parser_fallbacks"], 0, "{}", pair.a.log());
        if preempt {
            // Whether requested pages travel on the preempt channel depends on timing
            // (a page already on its way on the main channel is not sent again); when
            // the preempt channel carried anything, it must have been recognised.
            let recent = st["recent_connections"].as_array().unwrap();
            let other: Vec<_> = recent.iter().filter(|r| r["kind"] != "qemu-main").collect();
            assert_eq!(other.len(), 1, "QEMU {}: {recent:?}", build.name);
            if other[0]["lan_in"].as_u64().unwrap() > 0 {
                assert_eq!(
                    other[0]["kind"], "qemu-preempt",
                    "QEMU {}: {}",
                    build.name, other[0]
                );
                assert_eq!(c["preempt_channels"], 1, "{c}");
            }
        }
        eprintln!(
            "QEMU {}: {requests} page requests, counters {c}",
            build.name
        );
    }
}

/// A relay that also records the client-to-server bytes of the one connection it
/// carries (an NBD client's stream, for `shrinker inspect`).
async fn recording_relay(
    listen: SocketAddr,
    to: SocketAddr,
    record: std::path::PathBuf,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(to).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up = tokio::spawn(async move {
            let mut f = tokio::fs::File::create(&record).await.unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = cr.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                f.write_all(&buf[..n]).await.unwrap();
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = sw.shutdown().await;
            f.flush().await.unwrap();
        });
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
        let _ = up.await;
    })
}

/// A cluster of 4 VMs, each with a disk (NBD drive-mirror) and RAM (precopy), all
/// through one pair: disks share most of their blocks, RAM caches some of them. The
/// WAN bytes stay within 5% of the ideal computed by `shrinker inspect` from captures
/// of the same disk and memory streams, and RAM pages equal to disk blocks that
/// crossed earlier are references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_and_ram_cluster_wan_bytes_near_ideal() {
    const DISK_MIB: u64 = 64;
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-dr-{}", build.name));
        let net = 66 + i as u8;
        let (pair, fwd, dst) = start_pair_with(dir.path(), net, 8, &[s("--compress"), s("always")]);
        let mut captures = Vec::new();
        // Captures: each disk through a recording relay to a throw-away NBD export,
        // then each VM's memory stream.
        for vm in 0..4u64 {
            let src_disk = dir.path().join(format!("src{vm}.raw"));
            write_disk(&src_disk, 200 + vm, DISK_MIB);
            let scratch_disk = dir.path().join(format!("cap{vm}.raw"));
            std::fs::File::create(&scratch_disk)
                .unwrap()
                .set_len(DISK_MIB << 20)
                .unwrap();
            let rec = dir.path().join(format!("disk{vm}.nbd"));
            let (relay, nbd) = (addr(net, 18000 + vm as u16), addr(net, 18100 + vm as u16));
            let recorder = recording_relay(relay, nbd, rec.clone()).await;
            nbd_mirror(
                build,
                dir.path(),
                &format!("cap{vm}"),
                &src_disk,
                &scratch_disk,
                relay,
                nbd,
            )
            .await;
            tokio::time::timeout(Duration::from_secs(30), recorder)
                .await
                .unwrap()
                .unwrap();
            captures.push(rec);
            let ram = dir.path().join(format!("ram{vm}.mig"));
            capture(
                build,
                dir.path(),
                &format!("rcap{vm}"),
                Box::new(cluster_ram(vm)),
                &ram,
            )
            .await;
            captures.push(ram);
        }
        // The same migrations through the pair: disk, then memory, VM after VM.
        for vm in 0..4u64 {
            let v = vm as usize;
            let src_disk = dir.path().join(format!("src{vm}.raw"));
            let dst_disk = dir.path().join(format!("dst{vm}.raw"));
            std::fs::File::create(&dst_disk)
                .unwrap()
                .set_len(DISK_MIB << 20)
                .unwrap();
            nbd_mirror(
                build,
                dir.path(),
                &format!("d{vm}"),
                &src_disk,
                &dst_disk,
                fwd[2 * v],
                dst[2 * v],
            )
            .await;
            migrate_one(
                build,
                dir.path(),
                &format!("r{vm}"),
                fwd[2 * v + 1],
                dst[2 * v + 1],
                Some(Box::new(cluster_ram(vm))),
                None,
            )
            .await;
        }
        let st = pair.a.wait_for("8 connections", |c| {
            c["connections_completed"].as_u64().unwrap() >= 8
        });
        let c = &st["counters"];
        assert_eq!(c["parser_fallbacks"], 0, "{c}");
        assert_eq!(c["nbd_streams"], 4, "{c}");
        let wan = c["wan_bytes_out"].as_u64().unwrap();
        let recent = st["recent_connections"].as_array().unwrap();
        let ram_refs: u64 = recent
            .iter()
            .filter(|r| r["kind"] == "qemu-main")
            .map(|r| r["refs"].as_u64().unwrap())
            .sum();
        let ram_pages: u64 = recent
            .iter()
            .filter(|r| r["kind"] == "qemu-main")
            .map(|r| r["pages"].as_u64().unwrap())
            .sum();
        let first_ram = recent.iter().find(|r| r["kind"] == "qemu-main").unwrap();
        let report = inspect_report(&captures);
        let ideal = report["total"]["ideal_bytes"].as_u64().unwrap();
        let kinds = inspected_kinds(&report);
        assert_eq!(
            kinds.iter().filter(|k| **k == "nbd-client").count(),
            4,
            "{kinds:?}"
        );
        eprintln!(
            "QEMU {}: disk+RAM cluster: pair WAN {wan} B (TLS included), ideal {ideal} B, ratio {:.4}; RAM pages {ram_pages}, as references {ram_refs}; first VM's RAM after its disk: {} of {} pages are references",
            build.name,
            wan as f64 / ideal as f64,
            first_ram["refs"],
            first_ram["pages"]
        );
        // The first VM's RAM follows only its own disk: its pool pages are references to
        // disk blocks.
        assert!(
            first_ram["refs"].as_u64().unwrap() * 2 > first_ram["pages"].as_u64().unwrap(),
            "{first_ram}"
        );
        assert!(
            (wan as f64) <= 1.05 * ideal as f64,
            "QEMU {}: WAN {wan} > 1.05 x ideal {ideal}",
            build.name
        );
        // The disks alone: their WAN bytes against the ideal of the disk captures alone
        // (the pair's figure can only be lower: disks may also reference RAM pages).
        let disk_wan: u64 = recent
            .iter()
            .filter(|r| r["kind"] == "nbd-client")
            .map(|r| r["wan_out"].as_u64().unwrap())
            .sum();
        let disks: Vec<_> = captures
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "nbd"))
            .collect();
        let disk_ideal = inspect_report(&disks)["total"]["ideal_bytes"]
            .as_u64()
            .unwrap();
        eprintln!(
            "QEMU {}: disks alone: pair WAN {disk_wan} B, ideal {disk_ideal} B, ratio {:.4}",
            build.name,
            disk_wan as f64 / disk_ideal as f64
        );
        assert!(
            (disk_wan as f64) <= 1.05 * disk_ideal as f64,
            "QEMU {}: disk WAN {disk_wan} > 1.05 x {disk_ideal}",
            build.name
        );
    }
}

/// Capability and parameter combinations an operator may set that no other test
/// covers, each migrated with a guest writing memory (several precopy rounds): the
/// destination must be byte-exact and the parser must have followed the stream to
/// its end (no fallback). `only`: the one QEMU version that has the mode (QEMU 10.0
/// refuses multifd with postcopy-ram, so that pair is not here; 7.2's compression
/// threads were removed in 9.1). `opaque`: QEMU compresses the pages itself, so the
/// pair relays them (in step, as encoded pages) without finding them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommon_modes_stay_exact_and_parsed() {
    struct Case {
        label: &'static str,
        only: Option<&'static str>,
        opaque: bool,
        caps: Vec<&'static str>,
        params: serde_json::Value,
        multifd: u64,
    }
    let cases = [
        Case {
            label: "postcopy-ram enabled, never switched",
            only: None,
            opaque: false,
            caps: vec!["postcopy-ram"],
            params: json!({}),
            multifd: 0,
        },
        Case {
            label: "return-path, validate-uuid, events, auto-converge",
            only: None,
            opaque: false,
            caps: vec!["return-path", "validate-uuid", "events", "auto-converge"],
            params: json!({}),
            multifd: 0,
        },
        Case {
            label: "zero pages sent whole (zero-page-detection none)",
            only: Some("10.0"),
            opaque: false,
            caps: vec![],
            params: json!({"zero-page-detection": "none"}),
            multifd: 0,
        },
        Case {
            label: "multifd, zero pages sent whole",
            only: Some("10.0"),
            opaque: false,
            caps: vec!["multifd"],
            params: json!({"multifd-channels": 2, "zero-page-detection": "none"}),
            multifd: 2,
        },
        Case {
            label: "multifd, zero pages found by the main thread (legacy)",
            only: Some("10.0"),
            opaque: false,
            caps: vec!["multifd"],
            params: json!({"multifd-channels": 2, "zero-page-detection": "legacy"}),
            multifd: 2,
        },
        Case {
            label: "multifd, one channel, with the return path",
            only: None,
            opaque: false,
            caps: vec!["multifd", "return-path"],
            params: json!({"multifd-channels": 1}),
            multifd: 1,
        },
        Case {
            label: "late-block-activate, release-ram",
            only: None,
            opaque: false,
            caps: vec!["late-block-activate", "release-ram"],
            params: json!({}),
            multifd: 0,
        },
        Case {
            label: "QEMU's compression threads (zlib pages)",
            only: Some("7.2"),
            opaque: true,
            caps: vec!["compress"],
            params: json!({"compress-level": 1, "compress-threads": 2, "decompress-threads": 2}),
            multifd: 0,
        },
    ];
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-modes-{}", build.name));
        let kernel = dir.path().join("dirty.bin");
        std::fs::write(&kernel, dirtying_kernel(0x0100_0000)).unwrap();
        let (pair, fwd, dst) = start_pair(dir.path(), 70 + i as u8, cases.len() as u16);
        let mut done = 0;
        let (mut lan_before, mut wan_before) = (0, 0);
        for (k, case) in cases.iter().enumerate() {
            if case.only.is_some_and(|v| v != build.name) {
                continue;
            }
            let mode = Mode {
                caps: case.caps.clone(),
                params: case.params.clone(),
            };
            migrate_vm(
                (None, None),
                build,
                dir.path(),
                &format!("mode{k}"),
                (fwd[k], dst[k]),
                RAM_MIB,
                Some(Box::new(cluster_ram(k as u64))),
                Some(&kernel),
                &mode,
            )
            .await;
            done += 1 + case.multifd;
            let st = pair.a.wait_for(case.label, |c| {
                c["connections_completed"].as_u64().unwrap() >= done
            });
            let c = &st["counters"];
            let (lan, wan) = (
                c["lan_bytes_in"].as_u64().unwrap(),
                c["wan_bytes_out"].as_u64().unwrap(),
            );
            eprintln!(
                "QEMU {} {}: LAN {} B, WAN {} B",
                build.name,
                case.label,
                lan - lan_before,
                wan - wan_before
            );
            // Pages found means pages deduplicated: each VM shares a third of its
            // memory with the others and sends its dirtied pages again (measured
            // 0.33-0.56 of the LAN bytes; opaque relaying would be ~1.0).
            // QEMU's own zlib pages cross as they are (framing and TLS add little).
            let (num, den) = if case.opaque { (21, 20) } else { (3, 4) };
            assert!(
                (wan - wan_before) * den < (lan - lan_before) * num,
                "QEMU {} {}: WAN {} B for LAN {} B",
                build.name,
                case.label,
                wan - wan_before,
                lan - lan_before
            );
            (lan_before, wan_before) = (lan, wan);
            assert_eq!(
                c["parser_fallbacks"],
                0,
                "QEMU {} {}: {}",
                build.name,
                case.label,
                pair.a.log()
            );
        }
    }
}

/// Dirty bitmaps travel inside the migration stream (`dirty-bitmaps` capability, as
/// when a disk is mirrored separately and only its change tracking moves with the
/// VM), in precopy and, with `postcopy-ram` and a switch mid-migration, in postcopy
/// (where the bitmap's section iterates beside the RAM pushed after the switch): the
/// bitmap's own section is relayed exactly (the destination gets a bitmap with the
/// same dirty count), RAM arrives byte-exact, and the parser follows the stream past
/// that section (no fallback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmaps_travel_with_the_migration() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-bitmap-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 72 + i as u8, 1);
        for (k, postcopy) in [false, true].into_iter().enumerate() {
            let (src_disk, dst_disk) = (
                dir.path().join(format!("src{k}.raw")),
                dir.path().join(format!("dst{k}.raw")),
            );
            for d in [&src_disk, &dst_disk] {
                std::fs::File::create(d).unwrap().set_len(64 << 20).unwrap();
            }
            let spec = |name: String, incoming: bool, disk: &Path| VmSpec {
                build,
                dir: dir.path(),
                name,
                ram_mib: RAM_MIB,
                ram_content: (!incoming).then(|| Box::new(cluster_ram(9)) as RamFill<'_>),
                incoming,
                kernel: None,
                disk: Some(disk.to_path_buf()),
            };
            let mut src = Vm::start(spec(format!("bm{k}-src"), false, &src_disk)).await;
            let mut dstvm = Vm::start(spec(format!("bm{k}-dst"), true, &dst_disk)).await;
            src.qmp
                .cmd(
                    "block-dirty-bitmap-add",
                    json!({"node": "d0", "name": "bm0", "granularity": 65536}),
                )
                .await;
            // Writes through the block layer mark the bitmap: 4 MiB at 0, 1 MiB at 40
            // MiB and sixteen scattered 4 KiB writes (64 + 16 + 16 granules of 64 KiB).
            let mut writes = vec![(0u64, 4u64 << 20), (40 << 20, 1 << 20)];
            writes.extend((0..16u64).map(|k| ((8 << 20) + k * (1 << 20), 4096)));
            for (at, len) in writes {
                src.qmp
                    .cmd(
                        "human-monitor-command",
                        json!({"command-line": format!("qemu-io d0 \"write -P 0x5a {at} {len}\"")}),
                    )
                    .await;
            }
            let bitmap = |v: &serde_json::Value| -> Option<u64> {
                v.as_array()?.iter().find(|d| d["device"] == "d0")?["inserted"]["dirty-bitmaps"]
                    .as_array()?
                    .iter()
                    .find(|b| b["name"] == "bm0")?["count"]
                    .as_u64()
            };
            let blocks = src.qmp.cmd("query-block", json!({})).await;
            let count = bitmap(&blocks);
            assert_eq!(count, Some(96 << 16), "QEMU {}: {blocks}", build.name);
            let mut caps = vec![json!({"capability": "dirty-bitmaps", "state": true})];
            if postcopy {
                caps.push(json!({"capability": "postcopy-ram", "state": true}));
            }
            for vm in [&mut src, &mut dstvm] {
                vm.qmp
                    .cmd("migrate-set-capabilities", json!({ "capabilities": caps }))
                    .await;
            }
            if postcopy {
                // Slow enough to switch while precopy is under way.
                src.start_migration_into(&mut dstvm, fwd[0], dst[0], 16u64 << 20)
                    .await;
                src.qmp.wait_transferred(8 << 20).await;
                src.qmp.cmd("migrate-start-postcopy", json!({})).await;
                // Still capped: the switch lands before the pages run out.
                src.qmp
                    .wait_migrate_until("postcopy", Duration::from_secs(120), |v| {
                        v["status"] == "postcopy-active"
                    })
                    .await;
                src.qmp
                    .cmd(
                        "migrate-set-parameters",
                        json!({"max-bandwidth": 8u64 << 30}),
                    )
                    .await;
                src.qmp.wait_migration(Duration::from_secs(300)).await;
                dstvm.qmp.wait_incoming_done(Duration::from_secs(120)).await;
                assert_same_file(&src.ram, &dstvm.ram);
            } else {
                src.migrate_into(&mut dstvm, fwd[0], dst[0]).await;
            }
            // The bitmap's content is loaded after the RAM (it is postcopy-capable
            // state); poll until the destination shows it.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let got = bitmap(&dstvm.qmp.cmd("query-block", json!({})).await);
                if got == count {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "QEMU {} (postcopy {postcopy}): destination bitmap {got:?}, source {count:?}",
                    build.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let st = pair.a.wait_for("bitmap migration done", |c| {
                c["connections_completed"].as_u64().unwrap() > k as u64
            });
            let c = &st["counters"];
            assert_eq!(
                c["parser_fallbacks"],
                0,
                "QEMU {} (postcopy {postcopy}): {}",
                build.name,
                pair.a.log()
            );
            assert_eq!(c["connections_failed"], 0, "QEMU {}: {c}", build.name);
            let conn = &st["recent_connections"][k];
            assert!(
                conn["pages"].as_u64().unwrap() >= nonzero_pages(&src.ram),
                "QEMU {} (postcopy {postcopy}): {conn}",
                build.name
            );
        }
    }
}

/// A VM as deployments run them, not the bare test VM: q35 with 4 vCPUs, QEMU's
/// default devices, a virtio NIC, USB, a balloon, a serial port, an RNG, a virtio disk, and a
/// pc-dimm whose memory is a second RAM block with content of its own (pages that
/// repeat the main block's). Both RAM blocks arrive byte-exact, the parser follows
/// the stream through every device section and both blocks (no fallback; every
/// non-zero page of both found), and the dimm's repeats cross as references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_a_full_device_set_migrates_exact_and_parsed() {
    const DIMM_MIB: u64 = 64;
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-devices-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 80 + i as u8, 1);
        let (src_disk, dst_disk) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
        for d in [&src_disk, &dst_disk] {
            std::fs::File::create(d).unwrap().set_len(16 << 20).unwrap();
        }
        let hw = Hardware {
            machine: "q35",
            smp: 4,
            default_devices: true,
            dimm: Some((DIMM_MIB, 11)),
            devices: Hardware::args(
                "-netdev user,id=n0 -device virtio-net-pci,netdev=n0 -device qemu-xhci \
                 -device usb-tablet -device virtio-balloon -device virtio-serial \
                 -device virtio-rng-pci",
            ),
        };
        let spec = |name: &str, incoming: bool, disk: &Path| VmSpec {
            build,
            dir: dir.path(),
            name: name.into(),
            ram_mib: RAM_MIB,
            ram_content: (!incoming).then(|| Box::new(cluster_ram(10)) as RamFill<'_>),
            incoming,
            kernel: None,
            disk: Some(disk.to_path_buf()),
        };
        let mut src = Vm::start_with(None, spec("dev-src", false, &src_disk), &hw).await;
        let mut dstvm = Vm::start_with(None, spec("dev-dst", true, &dst_disk), &hw).await;
        src.migrate_into(&mut dstvm, fwd[0], dst[0]).await;
        let (src_dimm, dst_dimm) = (src.dimm.clone().unwrap(), dstvm.dimm.clone().unwrap());
        assert_same_file(&src_dimm, &dst_dimm);
        let pages = nonzero_pages(&src.ram) + nonzero_pages(&src_dimm);
        let st = pair.a.wait_for("migration connection done", |c| {
            c["connections_completed"].as_u64().unwrap() >= 1
        });
        let c = &st["counters"];
        assert_eq!(c["qemu_streams"], 1, "QEMU {}: {st}", build.name);
        assert_eq!(
            c["parser_fallbacks"],
            0,
            "QEMU {}: {}",
            build.name,
            pair.a.log()
        );
        assert!(
            c["protocol_blocks"].as_u64().unwrap() >= pages,
            "QEMU {}: {pages} non-zero guest pages in both blocks, {c}",
            build.name
        );
        // The dimm's 64 MiB repeat pages of the 128 MiB main block: references.
        let (lan, wan) = (
            c["lan_bytes_in"].as_u64().unwrap(),
            c["wan_bytes_out"].as_u64().unwrap(),
        );
        eprintln!(
            "QEMU {}: full device set, {pages} pages: LAN {lan} B, WAN {wan} B, refs {}",
            build.name, c["refs_sent"]
        );
        assert!(
            c["refs_sent"].as_u64().unwrap() * 4 > pages,
            "QEMU {}: {c}",
            build.name
        );
        assert!(wan * 10 < lan * 7, "QEMU {}: {c}", build.name);
    }
}

/// A disk *pulled* over NBD through the pair (the far side reads a remote export, as
/// `qemu-img convert nbd://…`, a backup job or nbdcopy do): QEMU's NBD server on the
/// source side, a mirror job on the destination whose source is an NBD node that
/// connects through the pair. The copy is byte-exact; the server's READ replies
/// (structured on 7.2, extended headers on 10.0) are parsed, so their data crosses as
/// 4 KiB disk blocks, and a second pull of a disk with the same content is almost all
/// references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_pull_read_replies_are_disk_blocks() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-nbd-pull-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 74 + i as u8, 2);
        let mut wan_before = 0;
        for k in 0..2usize {
            let (src_disk, dst_disk) = (
                dir.path().join(format!("src{k}.raw")),
                dir.path().join(format!("dst{k}.raw")),
            );
            write_disk(&src_disk, 200, 48);
            std::fs::File::create(&dst_disk)
                .unwrap()
                .set_len(48 << 20)
                .unwrap();
            let mut server = Vm::start(VmSpec {
                build,
                dir: dir.path(),
                name: format!("pull{k}-nbd-src"),
                ram_mib: 16,
                ram_content: None,
                incoming: false,
                kernel: None,
                disk: Some(src_disk.clone()),
            })
            .await;
            let mut client = Vm::start(VmSpec {
                build,
                dir: dir.path(),
                name: format!("pull{k}-client"),
                ram_mib: 16,
                ram_content: None,
                incoming: false,
                kernel: None,
                disk: None,
            })
            .await;
            let nbd = dst[k];
            server
                .qmp
                .cmd(
                    "nbd-server-start",
                    json!({"addr": {"type": "inet", "data": {"host": nbd.ip().to_string(), "port": nbd.port().to_string()}}}),
                )
                .await;
            server
                .qmp
                .cmd("nbd-server-add", json!({"device": "d0"}))
                .await;
            client
                .qmp
                .cmd(
                    "blockdev-add",
                    json!({"driver": "nbd", "node-name": "remote", "export": "d0", "read-only": true,
                           "server": {"type": "inet", "host": fwd[k].ip().to_string(), "port": fwd[k].port().to_string()}}),
                )
                .await;
            client
                .qmp
                .cmd(
                    "drive-mirror",
                    json!({"job-id": "pull", "device": "remote", "target": dst_disk.display().to_string(),
                           "format": "raw", "mode": "existing", "sync": "full"}),
                )
                .await;
            client.finish_mirror("pull", Duration::from_secs(300)).await;
            client
                .qmp
                .cmd("blockdev-del", json!({"node-name": "remote"}))
                .await;
            // The server's side of the connection is encoded by edge B. Wait for it
            // to end while both QEMUs live: killing the server first could reset the
            // connection before its close had passed through the pair (CI saw the
            // connection not completed then).
            let st = pair
                .b
                .wait_for_within("pull connection done", Duration::from_secs(90), |c| {
                    c["connections_completed"].as_u64().unwrap() > k as u64
                });
            drop(client);
            drop(server);
            assert_same_file(&src_disk, &dst_disk);
            let c = &st["counters"];
            assert_eq!(
                c["nbd_server_streams"],
                k as u64 + 1,
                "QEMU {}: {c}",
                build.name
            );
            assert_eq!(
                c["parser_fallbacks"],
                0,
                "QEMU {}: {}",
                build.name,
                pair.b.log()
            );
            // 10.0 at both ends negotiates extended headers; 7.2 structured replies.
            let pulls: Vec<_> = st["recent_connections"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["kind"] == "nbd-server")
                .collect();
            assert_eq!(pulls.len(), k + 1, "QEMU {}: {st}", build.name);
            let conn = pulls[k];
            let extended = conn["parser_counters"]["extended_replies"]
                .as_u64()
                .unwrap();
            let data_chunks = conn["parser_counters"]["data_chunks"].as_u64().unwrap();
            assert!(data_chunks > 0, "QEMU {}: {conn}", build.name);
            if build.name == "7.2" {
                assert_eq!(extended, 0, "QEMU 7.2: {conn}");
            } else {
                assert!(extended >= data_chunks, "QEMU {}: {conn}", build.name);
            }
            let blocks = c["protocol_blocks"].as_u64().unwrap();
            assert!(
                blocks >= 6_000 * (k as u64 + 1),
                "QEMU {}: {blocks} disk blocks after pull {k}: {c}",
                build.name
            );
            let wan = c["wan_bytes_out"].as_u64().unwrap();
            eprintln!(
                "QEMU {} pull {k}: WAN {} B, {c}",
                build.name,
                wan - wan_before
            );
            if k == 1 {
                // The same content again: references, not data.
                assert!(
                    (wan - wan_before) * 20 < wan_before,
                    "QEMU {}: second pull cost {} B, first {wan_before} B",
                    build.name,
                    wan - wan_before
                );
            }
            wan_before = wan;
        }
    }
}

/// Either edge killed mid-migration (a crash, SIGKILL): the migration fails loudly at
/// the source (QEMU reports it failed and keeps its VM; nothing half-delivered passes
/// for a whole migration), the surviving edge counts the connection failed, and once
/// the edge is back the same source VM migrates again through the pair, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_mid_migration_fails_it_and_a_retry_is_exact() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-killed-{}", build.name));
        let net = 76 + i as u8;
        certs(dir.path(), &["a", "b"]);
        let (tunnel, fwd, dst) = (addr(net, 17000), addr(net, 14000), addr(net, 15000));
        let b_args = [s("--tunnel-listen"), tunnel.to_string()];
        let a_args = [s("--forward"), format!("{fwd}={tunnel}={dst}")];
        let mut b = EdgeProc::start(dir.path(), "b", &b_args, tunnel);
        let mut a = EdgeProc::start(dir.path(), "a", &a_args, fwd);
        let mut src = Vm::start(VmSpec {
            build,
            dir: dir.path(),
            name: "killed-src".into(),
            ram_mib: RAM_MIB,
            ram_content: Some(Box::new(cluster_ram(11))),
            incoming: false,
            kernel: None,
            disk: None,
        })
        .await;
        for (attempt, victim) in ["b", "a", "none"].into_iter().enumerate() {
            let mut dstvm = Vm::start(VmSpec {
                build,
                dir: dir.path(),
                name: format!("killed-dst{attempt}"),
                ram_mib: RAM_MIB,
                ram_content: None,
                incoming: true,
                kernel: None,
                disk: None,
            })
            .await;
            // Slow enough that the kill lands mid-stream; full speed for the retry.
            let rate: u64 = if victim == "none" { 8 << 30 } else { 16 << 20 };
            src.start_migration_into(&mut dstvm, fwd, dst, rate).await;
            if victim == "none" {
                src.qmp.wait_migration(Duration::from_secs(300)).await;
                dstvm.qmp.wait_incoming_done(Duration::from_secs(120)).await;
                assert_same_file(&src.ram, &dstvm.ram);
                break;
            }
            src.qmp.wait_transferred(8 << 20).await;
            let survivor_failed_before = if victim == "b" {
                let before = a.counter("connections_failed");
                b.kill();
                before
            } else {
                let before = b.counter("connections_failed");
                a.kill();
                before
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let v = src.qmp.cmd("query-migrate", json!({})).await;
                if v["status"] == "failed" {
                    break;
                }
                assert!(
                    v["status"] != "completed",
                    "QEMU {}: a migration through a killed edge {victim} completed: {v}",
                    build.name
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "QEMU {}: migration not failed after edge {victim} was killed: {v}",
                    build.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let st = src.qmp.cmd("query-status", json!({})).await;
            assert_ne!(st["status"], "postmigrate", "QEMU {}: {st}", build.name);
            let survivor = if victim == "b" { &a } else { &b };
            survivor.wait_for("the cut connection counted failed", |c| {
                c["connections_failed"].as_u64().unwrap() > survivor_failed_before
            });
            drop(dstvm);
            if victim == "b" {
                b = EdgeProc::start(dir.path(), "b", &b_args, tunnel);
            } else {
                a = EdgeProc::start(dir.path(), "a", &a_args, fwd);
            }
        }
        let st = a.wait_for("the retry done", |c| {
            c["connections_completed"].as_u64().unwrap() >= 1
        });
        assert_eq!(st["counters"]["parser_fallbacks"], 0, "{}", a.log());
    }
}

/// A VM moved to a newer QEMU, as a site upgrade does: a 7.2 source migrates to a 10.0
/// destination on 7.2's versioned machine types (`pc-i440fx-7.2` bare, and
/// `pc-q35-7.2` with the full device set of the test above): byte-exact, and the
/// source's stream parsed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_from_qemu_7_2_to_10_0() {
    let all = builds();
    let (Some(old), Some(new)) = (
        all.iter().find(|b| b.name == "7.2"),
        all.iter().find(|b| b.name == "10.0"),
    ) else {
        eprintln!("skipped: needs both QEMU 7.2 and 10.0 (SHRINKER_QEMU_ONLY is set)");
        return;
    };
    let dir = Scratch::new("qemu-upgrade");
    let (pair, fwd, dst) = start_pair(dir.path(), 86, 2);
    for (k, (machine, full)) in [("pc-i440fx-7.2", false), ("pc-q35-7.2", true)]
        .into_iter()
        .enumerate()
    {
        let hw = Hardware {
            machine,
            smp: 2,
            default_devices: full,
            dimm: full.then_some((32, 13)),
            devices: if full {
                Hardware::args(
                    "-netdev user,id=n0 -device virtio-net-pci,netdev=n0 -device virtio-balloon",
                )
            } else {
                Vec::new()
            },
        };
        let spec = |build, name: String, incoming: bool| VmSpec {
            build,
            dir: dir.path(),
            name,
            ram_mib: RAM_MIB,
            ram_content: (!incoming).then(|| Box::new(cluster_ram(30 + k as u64)) as RamFill<'_>),
            incoming,
            kernel: None,
            disk: None,
        };
        let mut src = Vm::start_with(None, spec(old, format!("up{k}-src"), false), &hw).await;
        let mut dstvm = Vm::start_with(None, spec(new, format!("up{k}-dst"), true), &hw).await;
        src.migrate_into(&mut dstvm, fwd[k], dst[k]).await;
        let mut pages = nonzero_pages(&src.ram);
        if let (Some(a), Some(b)) = (&src.dimm, &dstvm.dimm) {
            assert_same_file(a, b);
            pages += nonzero_pages(a);
        }
        let st = pair.a.wait_for("upgrade migration done", |c| {
            c["connections_completed"].as_u64().unwrap() > k as u64
        });
        let c = &st["counters"];
        assert_eq!(c["qemu_streams"], k as u64 + 1, "{machine}: {st}");
        assert_eq!(c["parser_fallbacks"], 0, "{machine}: {}", pair.a.log());
        let conn = &st["recent_connections"][k];
        assert!(
            conn["pages"].as_u64().unwrap() >= pages,
            "{machine}: {pages} non-zero pages: {conn}"
        );
    }
}

/// Both sites move VMs to each other at once through one pair: each edge listens for
/// its peer's tunnels and forwards its own side's migrations, so each is sender and
/// receiver at the same time (its own store filled by what arrives, its model of the
/// peer by what it sends). Two rounds of one migration each way, concurrently: all
/// four byte-exact and parsed, and the second round in each direction is mostly
/// references (each edge's model of the other held while it also received).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_both_ways_at_once_through_one_pair() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-both-ways-{}", build.name));
        let net = 84 + i as u8;
        certs(dir.path(), &["a", "b"]);
        let (tunnel_a, tunnel_b) = (addr(net, 17000), addr(net, 17001));
        let (fwd_a, dst_b) = (addr(net, 14000), addr(net, 15000));
        let (fwd_b, dst_a) = (addr(net, 14001), addr(net, 15001));
        let edge = |name: &str, listen: SocketAddr, fwd: SocketAddr, peer, dst: SocketAddr| {
            let args = [
                s("--tunnel-listen"),
                listen.to_string(),
                s("--forward"),
                format!("{fwd}={peer}={dst}"),
            ];
            EdgeProc::start(dir.path(), name, &args, listen)
        };
        let a = edge("a", tunnel_a, fwd_a, tunnel_b, dst_b);
        let b = edge("b", tunnel_b, fwd_b, tunnel_a, dst_a);
        let mut before = (0, 0);
        for round in 0..2u64 {
            let (east_name, west_name) = (format!("east{round}"), format!("west{round}"));
            let east = migrate_one(
                build,
                dir.path(),
                &east_name,
                fwd_a,
                dst_b,
                Some(Box::new(cluster_ram(20))),
                None,
            );
            let west = migrate_one(
                build,
                dir.path(),
                &west_name,
                fwd_b,
                dst_a,
                Some(Box::new(cluster_ram(21))),
                None,
            );
            let (east_pages, west_pages) = tokio::join!(east, west);
            let mut refs = (0, 0);
            for (edge, name, pages, r) in [
                (&a, "a", east_pages, &mut refs.0),
                (&b, "b", west_pages, &mut refs.1),
            ] {
                let st = edge.wait_for_within(
                    &format!("round {round}'s migration done at edge {name}"),
                    Duration::from_secs(60),
                    |c| {
                        c["active_connections"] == 0
                            && c["connections_completed"].as_u64().unwrap() >= 2 * (round + 1)
                    },
                );
                let c = &st["counters"];
                assert_eq!(
                    c["qemu_streams"],
                    round + 1,
                    "QEMU {}: {name}: {c}",
                    build.name
                );
                assert_eq!(
                    c["parser_fallbacks"],
                    0,
                    "QEMU {}: {name}: {}",
                    build.name,
                    edge.log()
                );
                assert_eq!(
                    c["connections_failed"], 0,
                    "QEMU {}: {name}: {c}",
                    build.name
                );
                assert!(
                    c["protocol_blocks"].as_u64().unwrap() >= pages * (round + 1),
                    "QEMU {}: {name}: {pages} pages per migration, {c}",
                    build.name
                );
                *r = c["refs_sent"].as_u64().unwrap();
                if round == 1 {
                    let again = *r - if name == "a" { before.0 } else { before.1 };
                    eprintln!(
                        "QEMU {}: edge {name}: second round {again} refs of {pages} pages",
                        build.name
                    );
                    assert!(
                        again * 10 >= pages * 9,
                        "QEMU {}: edge {name}: second round {again} refs of {pages} pages: {c}",
                        build.name
                    );
                }
            }
            before = refs;
        }
    }
}

/// An operator cancels a migration mid-stream (`migrate_cancel`) and retries it to a
/// fresh destination: the cancelled connection ends at both edges (nothing left open
/// or waiting), the source keeps its VM, and the retry is byte-exact, with the pages
/// that crossed before the cancel sent as references (they reached the far store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_ends_and_its_retry_reuses_what_crossed() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-cancel-{}", build.name));
        let (pair, fwd, dst) = start_pair(dir.path(), 82 + i as u8, 1);
        let spec = |name: &str, incoming: bool| VmSpec {
            build,
            dir: dir.path(),
            name: name.into(),
            ram_mib: RAM_MIB,
            ram_content: (!incoming).then(|| Box::new(unique_ram(12)) as RamFill<'_>),
            incoming,
            kernel: None,
            disk: None,
        };
        let mut src = Vm::start(spec("cancel-src", false)).await;
        let mut first = Vm::start(spec("cancel-dst0", true)).await;
        src.start_migration_into(&mut first, fwd[0], dst[0], 16u64 << 20)
            .await;
        let under_way = src.qmp.wait_transferred(24 << 20).await;
        src.qmp.cmd("migrate_cancel", json!({})).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = src.qmp.cmd("query-migrate", json!({})).await;
            if v["status"] == "cancelled" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline && v["status"] != "completed",
                "QEMU {}: not cancelled: {v}",
                build.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let st = src.qmp.cmd("query-status", json!({})).await;
        assert_ne!(st["status"], "postmigrate", "QEMU {}: {st}", build.name);
        for (edge, name) in [(&pair.a, "a"), (&pair.b, "b")] {
            edge.wait_for_within(
                &format!("the cancelled connection to end at edge {name}"),
                Duration::from_secs(60),
                |c| {
                    c["active_connections"] == 0
                        && c["connections_completed"].as_u64().unwrap()
                            + c["connections_failed"].as_u64().unwrap()
                            >= 1
                },
            );
        }
        drop(first);
        let refs_before = pair.a.counter("refs_sent");
        let mut second = Vm::start(spec("cancel-dst1", true)).await;
        src.migrate_into(&mut second, fwd[0], dst[0]).await;
        let st = pair
            .a
            .wait_for_within("the retry done", Duration::from_secs(60), |c| {
                c["active_connections"] == 0 && c["connections_completed"].as_u64().unwrap() >= 1
            });
        let c = &st["counters"];
        assert_eq!(
            c["parser_fallbacks"],
            0,
            "QEMU {}: {}",
            build.name,
            pair.a.log()
        );
        // Every page is unique, so the retry's references are pages that crossed
        // before the cancel: at least half of them (the rest were still in flight).
        let crossed_pages = under_way["ram"]["transferred"].as_u64().unwrap() / 4096;
        let retry_refs = c["refs_sent"].as_u64().unwrap() - refs_before;
        eprintln!(
            "QEMU {}: cancelled after {crossed_pages} pages; retry sent {retry_refs} refs: {c}",
            build.name
        );
        assert!(
            retry_refs * 2 >= crossed_pages,
            "QEMU {}: {retry_refs} refs in the retry, {crossed_pages} pages crossed before: {c}",
            build.name
        );
    }
}

/// Postcopy recovery through the pair: an edge killed while a *running* destination
/// is in postcopy (the case postcopy recovery exists for: the destination cannot go
/// back, the source cannot resume the guest). Both QEMUs pause (`postcopy-paused`);
/// once the edge is back, `migrate-recover` on the destination and `migrate` with
/// `resume` on the source finish the migration through the pair (the resumed channel
/// has no stream header, yet the edge recognises it and finds its pages), and RAM
/// ends byte-exact. 7.2 loses edge B, 10.0 edge A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_recovers_through_the_pair_after_an_edge_is_killed() {
    for (i, build) in builds().iter().enumerate() {
        let dir = Scratch::new(&format!("qemu-pc-recover-{}", build.name));
        let net = 78 + i as u8;
        certs(dir.path(), &["a", "b"]);
        let (tunnel, fwd, dst) = (addr(net, 17000), addr(net, 14000), addr(net, 15000));
        let b_args = [s("--tunnel-listen"), tunnel.to_string()];
        let a_args = [s("--forward"), format!("{fwd}={tunnel}={dst}")];
        let mut b = EdgeProc::start(dir.path(), "b", &b_args, tunnel);
        let mut a = EdgeProc::start(dir.path(), "a", &a_args, fwd);
        // 10.0 also with the preempt channel, which recovery reconnects too. A slow
        // background push, so postcopy lasts until the kill.
        let preempt = build.name != "7.2";
        let (mut src, mut dstvm) = postcopy_with_a_running_destination(
            build,
            dir.path(),
            "rec",
            13,
            preempt,
            8 << 20,
            fwd,
            dst,
        )
        .await;
        let victim = if i == 0 { "b" } else { "a" };
        if victim == "b" {
            b.kill();
        } else {
            a.kill();
        }
        for (who, vm) in [("source", &mut src), ("destination", &mut dstvm)] {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let v = vm.qmp.cmd("query-migrate", json!({})).await;
                if v["status"] == "postcopy-paused" {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "QEMU {}: the {who} did not pause after edge {victim} was killed: {v}",
                    build.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if victim == "b" {
            b = EdgeProc::start(dir.path(), "b", &b_args, tunnel);
        } else {
            a = EdgeProc::start(dir.path(), "a", &a_args, fwd);
        }
        dstvm
            .qmp
            .cmd("migrate-recover", json!({"uri": format!("tcp:{dst}")}))
            .await;
        src.qmp
            .cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": 8u64 << 30, "max-postcopy-bandwidth": 8u64 << 30}),
            )
            .await;
        src.qmp
            .cmd(
                "migrate",
                json!({"uri": format!("tcp:{fwd}"), "resume": true}),
            )
            .await;
        src.qmp.wait_migration(Duration::from_secs(300)).await;
        dstvm.qmp.wait_incoming_done(Duration::from_secs(120)).await;
        assert_same_file(&src.ram, &dstvm.ram);
        let st = a.wait_for("the resumed channels done", |c| {
            c["connections_completed"].as_u64().unwrap() > u64::from(preempt)
        });
        let done: Vec<&serde_json::Value> = st["recent_connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["result"] == "ok")
            .collect();
        // The resumed main channel has no header, yet its RAM pages are found.
        let main: Vec<_> = done.iter().filter(|c| c["kind"] == "qemu-main").collect();
        assert_eq!(main.len(), 1, "QEMU {}: {st}", build.name);
        let resumed = (*main[0]).clone();
        if preempt {
            // Recovery reconnects the preempt channel too. Whether requested pages
            // travel on it depends on timing (see the other postcopy tests); when it
            // carried anything, it must have been recognised.
            let other: Vec<_> = done.iter().filter(|c| c["kind"] != "qemu-main").collect();
            assert_eq!(other.len(), 1, "QEMU {}: {st}", build.name);
            if other[0]["lan_in"].as_u64().unwrap() > 0 {
                assert_eq!(
                    other[0]["kind"], "qemu-preempt",
                    "QEMU {}: {}",
                    build.name, other[0]
                );
            }
        }
        eprintln!("QEMU {}: resumed channel {resumed}", build.name);
        assert_eq!(
            resumed["kind"], "qemu-main",
            "QEMU {}: {resumed}",
            build.name
        );
        assert!(
            resumed["parser_gave_up"].is_null(),
            "QEMU {}: {resumed}",
            build.name
        );
        assert!(
            resumed["pages"].as_u64().unwrap() > 10_000,
            "QEMU {}: {resumed}",
            build.name
        );
        drop(b);
    }
}

/// `shrinker inspect --json --compress always` over `files`: its report (the test fails
/// when the command does).
fn inspect_report<P: AsRef<std::ffi::OsStr>>(files: &[P]) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args(["inspect", "--json", "--compress", "always"])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The kind of stream `inspect` recognised in each file of `report`.
fn inspected_kinds(report: &serde_json::Value) -> Vec<&str> {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect()
}
