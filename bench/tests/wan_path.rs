//! The packet-level WAN path (`testkit::wan_path`) is what it claims: TCP between its
//! two hosts sees the round-trip time (a handshake takes two one-way delays), is held
//! to the bottleneck rate, delivers every byte in order, and recovers from losses.
//! Only lower bounds on time are asserted (a busy machine makes things slower, never
//! faster). Needs root, like the TPROXY tests; SHRINKER_SKIP_NETNS=1 skips it knowingly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use testkit::wan_path::{in_namespace, needs_root, LinkSpec, WanPath};

/// Sends `len` bytes of a pattern from the west host to a listener on the east host;
/// returns (connect time, transfer time) after checking every byte.
fn transfer(path: &WanPath, port: u16, len: usize) -> (Duration, Duration) {
    let east: SocketAddr = (path.east, port).into();
    let listener = in_namespace(&path.east_ns, move || TcpListener::bind(east).unwrap()).unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::with_capacity(len);
        s.read_to_end(&mut got).unwrap();
        got
    });
    let t0 = Instant::now();
    let mut s = in_namespace(&path.west_ns, move || TcpStream::connect(east).unwrap()).unwrap();
    let connected = t0.elapsed();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let t1 = Instant::now();
    s.write_all(&data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let got = receiver.join().unwrap();
    let moved = t1.elapsed();
    assert!(got == data, "bytes differ: {} of {len} arrived", got.len());
    (connected, moved)
}

#[test]
fn tcp_across_the_path_sees_its_delay_and_rate_and_stays_exact() {
    if !needs_root("the WAN path test (network namespaces, TUN devices)") {
        return;
    }
    let link = LinkSpec {
        delay: Duration::from_millis(15),
        rate_bps: 80_000_000,
        queue: Duration::from_millis(30),
        loss: 0.0,
        mtu: 1500,
    };
    let path = WanPath::create(&format!("wp{}", std::process::id() % 10_000), 91, &link).unwrap();
    let len = 8 << 20;
    let (connect, moved) = transfer(&path, 5001, len);
    eprintln!("connect {connect:?}, {len} B in {moved:?}");
    // A handshake is one round trip: two one-way delays.
    assert!(
        connect >= Duration::from_millis(30),
        "connect took {connect:?}"
    );
    // 8 MiB at 80 Mbit/s is 0.84 s on the wire alone.
    assert!(moved >= Duration::from_millis(830), "{len} B in {moved:?}");
    let c = &path.eastbound;
    assert!(c.bytes.load(std::sync::atomic::Ordering::Relaxed) >= len as u64);
}

#[test]
fn losses_are_recovered_and_counted() {
    if !needs_root("the WAN path test (network namespaces, TUN devices)") {
        return;
    }
    let link = LinkSpec {
        delay: Duration::from_millis(5),
        rate_bps: 0,
        queue: Duration::from_millis(30),
        loss: 0.02,
        mtu: 1500,
    };
    let path = WanPath::create(&format!("wl{}", std::process::id() % 10_000), 92, &link).unwrap();
    let (_, moved) = transfer(&path, 5002, 4 << 20);
    let lost = path
        .eastbound
        .random_drops
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("4 MiB with 2% loss in {moved:?}, {lost} packets lost eastbound");
    assert!(lost > 0, "2% of ~3000 packets should lose some");
}
