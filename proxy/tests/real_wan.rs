//! Migrations across a packet-level WAN path (`testkit::wan_path`): the source site
//! (source QEMU, edge A) and the destination site (edge B, destination QEMU) are two
//! network namespaces joined by a link with a real round-trip time, a bottleneck rate
//! with a router queue that drops what overflows, and random loss. Unlike the
//! loopback tests (and the benchmarks' connection-level shaper), the edges' own TCP
//! runs across the delay: slow start, window growth, retransmissions after losses,
//! the heartbeats and silence checks on a real round trip. Every migration must still
//! be byte-exact, with nothing failed. Needs root (namespaces, TUN devices), as the
//! TPROXY tests do; SHRINKER_SKIP_NETNS=1 skips it knowingly.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::qemu::{builds, dirtying_kernel, migrate_vm, migrate_with_mode, workload_ram, Mode};
use common::*;
use serde_json::json;
use testkit::wan_path::{needs_root, LinkSpec, WanPath};

const RAM_MIB: u64 = 128;

fn s(v: &str) -> String {
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_across_a_lossy_path_with_a_real_round_trip_stay_exact() {
    if !needs_root("the real-WAN test (network namespaces, TUN devices)") {
        return;
    }
    let link = LinkSpec {
        // 20 ms round trip, 300 Mbit/s, a 20 ms router queue, 0.3% random loss.
        delay: Duration::from_millis(10),
        rate_bps: 300_000_000,
        queue: Duration::from_millis(20),
        loss: 0.003,
        mtu: 1500,
    };
    let path = WanPath::create(&format!("rw{}", std::process::id() % 10_000), 93, &link)
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = Scratch::new("real-wan");
    certs(dir.path(), &["a", "b"]);
    let tunnel: SocketAddr = (path.east, 7700).into();
    // Each site's own loopback: QEMU reaches its edge there, as a sidecar would.
    let (fwd, target): (SocketAddr, SocketAddr) = (
        "127.0.0.1:14000".parse().unwrap(),
        "127.0.0.1:15000".parse().unwrap(),
    );
    let b = EdgeProc::start_in(
        Some(&path.east_ns),
        dir.path(),
        "b",
        &[s("--tunnel-listen"), tunnel.to_string()],
        tunnel,
    );
    let a = EdgeProc::start_in(
        Some(&path.west_ns),
        dir.path(),
        "a",
        &[s("--forward"), format!("{fwd}={tunnel}={target}")],
        fwd,
    );
    let hosts = (Some(path.west_ns.as_str()), Some(path.east_ns.as_str()));
    let mut completed = 0;
    for (i, build) in builds().iter().enumerate() {
        let vm = 2 * i as u64;
        // A guest writing memory: several precopy rounds over the lossy path.
        let kernel = dir.path().join("dirty.bin");
        std::fs::write(&kernel, dirtying_kernel(0x0200_0000)).unwrap();
        let t0 = Instant::now();
        migrate_vm(
            hosts,
            build,
            dir.path(),
            &format!("rw{}", vm),
            (fwd, target),
            RAM_MIB,
            Some(Box::new(workload_ram(
                testkit::Workload::cluster(2026, 48 << 20),
                vm,
                RAM_MIB,
            ))),
            Some(&kernel),
            &Mode::default(),
        )
        .await;
        eprintln!(
            "QEMU {}: writing guest across the path in {:?}",
            build.name,
            t0.elapsed()
        );
        completed += 1;
        // A second VM of the cluster with multifd: its shared pages cross as references.
        let t0 = Instant::now();
        migrate_with_mode(
            hosts,
            build,
            dir.path(),
            &format!("rw{}", vm + 1),
            (fwd, target),
            RAM_MIB,
            Box::new(workload_ram(
                testkit::Workload::cluster(2026, 48 << 20),
                vm + 1,
                RAM_MIB,
            )),
            &Mode {
                caps: vec!["multifd"],
                params: json!({"multifd-channels": 2}),
            },
        )
        .await;
        eprintln!(
            "QEMU {}: multifd x2 across the path in {:?}",
            build.name,
            t0.elapsed()
        );
        completed += 3;
        a.wait_for("the migrations' connections through edge A", |c| {
            c["connections_completed"].as_u64().unwrap() >= completed
        });
    }
    let (sa, sb) = (a.stats(), b.stats());
    for (edge, st) in [("a", &sa), ("b", &sb)] {
        assert_eq!(st["counters"]["connections_failed"], 0, "edge {edge}: {st}");
        assert_eq!(st["counters"]["parser_fallbacks"], 0, "edge {edge}: {st}");
    }
    let c = &sa["counters"];
    let (lan, wan) = (
        c["lan_bytes_in"].as_u64().unwrap(),
        c["wan_bytes_out"].as_u64().unwrap(),
    );
    let (east, west) = (&path.eastbound, &path.westbound);
    eprintln!(
        "edge A: LAN {lan} B, WAN {wan} B; path eastbound {} packets, {} lost at random, {} \
         dropped by the queue; westbound {} packets, {} lost",
        east.packets.load(Relaxed),
        east.random_drops.load(Relaxed),
        east.queue_drops.load(Relaxed),
        west.packets.load(Relaxed),
        west.random_drops.load(Relaxed),
    );
    // 750 KB in flight fills this path: the default send buffer never held it back.
    assert!(
        !a.log().contains("held back by this host's TCP send buffer"),
        "{}",
        a.log()
    );
    // Later migrations started on tunnel connections earlier ones carried (v6).
    assert!(
        c["tunnels_reused"].as_u64().unwrap() >= 2,
        "later migrations should reuse tunnel connections: {c}"
    );
    // The path really lost packets, and TCP recovered every one.
    assert!(east.random_drops.load(Relaxed) > 0, "no packet was lost");
    assert!(
        wan * 2 < lan,
        "the second VM's shared pages should cross as references: WAN {wan} of LAN {lan}"
    );
}

/// A long fat path (100 ms round trip, no rate limit) and a small send buffer on the
/// hosts: one tunnel connection can carry no more than `net.ipv4.tcp_wmem`'s maximum
/// per round trip, and the sending edge says so, once, with what to raise; its
/// counters and the connection's summary show the time it was held back. Bytes stay
/// exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_buffer_too_small_for_the_path_is_reported() {
    if !needs_root("the real-WAN test (network namespaces, TUN devices)") {
        return;
    }
    let link = LinkSpec {
        delay: Duration::from_millis(50),
        rate_bps: 0,
        queue: Duration::from_millis(50),
        loss: 0.0,
        mtu: 1500,
    };
    let path = WanPath::create(&format!("rb{}", std::process::id() % 10_000), 95, &link)
        .unwrap_or_else(|e| panic!("{e}"));
    // A send buffer of 1 MiB at most (a quarter of Linux's default, so that even a
    // busy machine's edges fill it): ~10 MB/s per connection at this round trip.
    path.host_sysctl("net.ipv4.tcp_wmem=4096 16384 1048576")
        .unwrap();
    let dir = Scratch::new("real-wan-sndbuf");
    let tunnel: SocketAddr = (path.east, 7700).into();
    let (fwd, target): (SocketAddr, SocketAddr) = (
        "127.0.0.1:14000".parse().unwrap(),
        "127.0.0.1:15000".parse().unwrap(),
    );
    let plain = [s("--insecure-plaintext"), s("--compress"), s("off")];
    let mut b_args = vec![s("--tunnel-listen"), tunnel.to_string()];
    b_args.extend(plain.clone());
    let _b = EdgeProc::start_in(Some(&path.east_ns), dir.path(), "b", &b_args, tunnel);
    let mut a_args = vec![s("--forward"), format!("{fwd}={tunnel}={target}")];
    a_args.extend(plain);
    let a = EdgeProc::start_in(Some(&path.west_ns), dir.path(), "a", &a_args, fwd);
    // Pages seen nowhere else: every byte crosses.
    let len = 24usize << 20;
    let mut rng = testkit::Rng::new(95);
    let data: Vec<u8> = (0..len / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let sink = testkit::wan_path::in_namespace(&path.east_ns, move || {
        std::net::TcpListener::bind(target).unwrap()
    })
    .unwrap();
    let received = std::thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        let mut got = Vec::with_capacity(len);
        std::io::Read::read_to_end(&mut s, &mut got).unwrap();
        got
    });
    let sent = data.clone();
    let west = path.west_ns.clone();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let mut c = testkit::wan_path::in_namespace(&west, move || {
            std::net::TcpStream::connect(fwd).unwrap()
        })
        .unwrap();
        std::io::Write::write_all(&mut c, &sent).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        // Until the edge closes its side: the stream was delivered.
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c, &mut rest);
    });
    let got = tokio::task::spawn_blocking(move || received.join().unwrap())
        .await
        .unwrap();
    eprintln!("{len} B across 100 ms round trip in {:?}", t0.elapsed());
    assert!(got == data, "bytes differ: {} of {len} arrived", got.len());
    let st = a.wait_for("the connection completed", |c| {
        c["connections_completed"].as_u64().unwrap() >= 1
    });
    let held = st["counters"]["tunnel_sndbuf_limited_ms"].as_u64().unwrap();
    let conn = &st["recent_connections"][0];
    eprintln!("held back {held} ms; {conn}");
    assert!(held >= 250, "{st}");
    assert!(conn["rtt_ms"].as_f64().unwrap() >= 100.0, "{conn}");
    let log = a.log();
    assert_eq!(
        log.matches("held back by this host's TCP send buffer")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("net.ipv4.tcp_wmem allows at most 1048576 B"),
        "{log}"
    );
}
