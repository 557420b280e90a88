//! Two real edge processes on loopback: byte-exact relay under concurrency, dedup in
//! both directions, misses, bad certificates, garbage, half-close, resets, crashes.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn s(v: &str) -> String {
    v.to_string()
}

fn forward(
    listen: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    target: std::net::SocketAddr,
) -> Vec<String> {
    vec![s("--forward"), format!("{listen}={peer}={target}")]
}

fn reply_for(id: u64) -> Vec<u8> {
    payload(1000 + id, 256 * 1024 + id * 7919)
}

fn request_for(id: u64) -> Vec<u8> {
    with_id(id, &payload(id, 768 * 1024 + id * 4099))
}

/// Awaits each client task's `(id, reply)` and checks the reply against `want(id)`.
async fn expect_replies(
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<u8>)>>,
    want: impl Fn(u64) -> Vec<u8>,
) {
    for t in tasks {
        let (id, back) = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("in time")
            .unwrap();
        let want = want(id);
        assert_eq!(back.len(), want.len(), "conn {id}: reply length");
        assert!(back == want, "conn {id}: reply bytes differ");
    }
}

/// Receives the target's report of every request in `ids` (in any order) and checks
/// each against `want(id)`: the length and BLAKE3 of what the target read.
async fn expect_requests(
    received: &mut tokio::sync::mpsc::UnboundedReceiver<(u64, u64, blake3::Hash)>,
    ids: std::ops::Range<u64>,
    want: impl Fn(u64) -> Vec<u8>,
) {
    let mut got = HashMap::new();
    for _ in ids.clone() {
        let (id, n, h) = tokio::time::timeout(Duration::from_secs(30), received.recv())
            .await
            .unwrap()
            .unwrap();
        got.insert(id, (n, h));
    }
    for id in ids {
        let want = want(id);
        assert_eq!(
            got.get(&id).copied(),
            Some((want.len() as u64, blake3::hash(&want))),
            "conn {id}: request differs at the target"
        );
    }
}

/// Edge B accepting tunnels on port 17000 of loopback net `net`, edge A forwarding its
/// port 14000 through B to a `serve_exchange(reply)` target on port 15000. `_dir`
/// holds the certificates, logs and stats files: bind it first when destructuring, so
/// it goes last, after the edges are killed.
struct ExchangePair {
    a: EdgeProc,
    b: EdgeProc,
    fwd: std::net::SocketAddr,
    tunnel: std::net::SocketAddr,
    received: tokio::sync::mpsc::UnboundedReceiver<(u64, u64, blake3::Hash)>,
    _dir: Scratch,
}

/// Starts an [`ExchangePair`]; `a_extra` and `b_extra` are more options for each edge.
async fn exchange_pair(
    name: &str,
    net: u8,
    reply: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
    a_extra: &[String],
    b_extra: &[String],
) -> ExchangePair {
    let dir = Scratch::new(name);
    certs(dir.path(), &["a", "b"]);
    let (tunnel, fwd, target) = (addr(net, 17000), addr(net, 14000), addr(net, 15000));
    let received = serve_exchange(TcpListener::bind(target).await.unwrap(), reply).await;
    let b_args = [&[s("--tunnel-listen"), tunnel.to_string()], b_extra].concat();
    let b = EdgeProc::start(dir.path(), "b", &b_args, tunnel);
    let a_args = [forward(fwd, tunnel, target), a_extra.to_vec()].concat();
    let a = EdgeProc::start(dir.path(), "a", &a_args, fwd);
    ExchangePair {
        a,
        b,
        fwd,
        tunnel,
        received,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_connections_both_directions_byte_exact() {
    let ExchangePair {
        _dir,
        a,
        b,
        fwd,
        mut received,
        ..
    } = exchange_pair("concurrent", 11, reply_for, &[], &[]).await;

    let mut tasks = Vec::new();
    for id in 0..64u64 {
        tasks.push(tokio::spawn(async move {
            let back = exchange(fwd, request_for(id)).await.expect("exchange");
            (id, back)
        }));
    }
    expect_replies(tasks, reply_for).await;
    expect_requests(&mut received, 0..64, request_for).await;
    let sa = a.wait_for("64 completed connections", |c| {
        c["connections_completed"] == 64
    });
    let sb = b.wait_for("64 completed tunnels", |c| c["connections_completed"] == 64);
    let (ca, cb) = (&sa["counters"], &sb["counters"]);
    // Overlapping content: later connections reference what earlier ones sent, and
    // the replies (B -> A) are deduplicated too.
    assert!(
        ca["refs_sent"].as_u64().unwrap() > 100,
        "A sent few refs: {ca}"
    );
    assert!(
        cb["refs_sent"].as_u64().unwrap() > 100,
        "B sent few refs: {cb}"
    );
    assert!(
        ca["wan_bytes_out"].as_u64().unwrap() < ca["lan_bytes_in"].as_u64().unwrap(),
        "{ca}"
    );
    assert_eq!(ca["connections_failed"], 0);
    assert_eq!(cb["tunnels_rejected"], 0);
}

/// Two source edges share one small receiving store: the second evicts what the first
/// sent, so the first edge's references miss and are filled by a round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_receiving_cache_forces_misses_and_stays_exact() {
    let dir = Scratch::new("misses");
    certs(dir.path(), &["a1", "a2", "b"]);
    let (tunnel, f1, f2, target) = (
        addr(12, 17000),
        addr(12, 14001),
        addr(12, 14002),
        addr(12, 15000),
    );
    let listener = TcpListener::bind(target).await.unwrap();
    let mut received = serve_exchange(listener, |_| Vec::new()).await;
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[
            s("--tunnel-listen"),
            tunnel.to_string(),
            s("--cache-mem"),
            s("4MiB"),
        ],
        tunnel,
    );
    let a1 = EdgeProc::start(dir.path(), "a1", &forward(f1, tunnel, target), f1);
    let _a2 = EdgeProc::start(dir.path(), "a2", &forward(f2, tunnel, target), f2);
    let content = payload(5, 2 << 20);
    let other = testkit::Workload::cluster(99, 64 << 20)
        .stream(1, 16 << 20)
        .collect_all();
    let plan = [
        (f1, 1u64, &content),
        (f2, 2, &other),
        (f1, 3, &content),
        (f2, 4, &other),
        (f1, 5, &content),
    ];
    for (fwd, id, body) in plan {
        let data = with_id(id, body);
        let back = exchange(fwd, data.clone()).await.expect("exchange");
        assert!(back.is_empty());
        let (rid, n, h) = tokio::time::timeout(Duration::from_secs(60), received.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (rid, n, h),
            (id, data.len() as u64, blake3::hash(&data)),
            "stream {id} differs"
        );
    }
    let sb = b.wait_for("misses at B", |c| c["misses_sent"].as_u64().unwrap() > 0);
    let sa1 = a1.wait_for("fills from A1", |c| c["fills_sent"].as_u64().unwrap() > 0);
    assert!(
        sb["store"]["bytes"].as_u64().unwrap() <= 4 << 20,
        "store over budget: {sb}"
    );
    assert_eq!(sa1["counters"]["connections_failed"], 0, "{sa1}");
    assert_eq!(sb["counters"]["connections_failed"], 0, "{sb}");
    assert!(sa1["counters"]["refs_sent"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_without_a_valid_certificate_is_rejected() {
    let good = Scratch::new("cert-good");
    let evil = Scratch::new("cert-evil");
    certs(good.path(), &["a", "b"]);
    certs(evil.path(), &["a", "b"]); // same names, another CA
    let (tunnel, fwd, target, evil_tunnel, fwd2) = (
        addr(13, 17000),
        addr(13, 14000),
        addr(13, 15000),
        addr(13, 17001),
        addr(13, 14001),
    );
    let listener = TcpListener::bind(target).await.unwrap();
    let mut received = serve_exchange(listener, |_| b"hello".to_vec()).await;
    let b = EdgeProc::start(
        good.path(),
        "b",
        &[s("--tunnel-listen"), tunnel.to_string()],
        tunnel,
    );
    // A client edge with a certificate from another CA.
    let a_evil = EdgeProc::start(evil.path(), "a", &forward(fwd, tunnel, target), fwd);
    let r = exchange(fwd, with_id(1, b"secret")).await;
    assert!(
        r.is_err() || r.as_ref().unwrap().is_empty(),
        "data crossed: {r:?}"
    );
    b.wait_for("rejection", |c| {
        c["tunnels_rejected"].as_u64().unwrap() >= 1
    });
    assert!(
        b.log().contains("rejected tunnel connection"),
        "{}",
        b.log()
    );
    assert!(
        a_evil.log().contains("TLS") || a_evil.log().contains("handshake"),
        "{}",
        a_evil.log()
    );
    // A legitimate client edge refuses a server edge whose certificate is from another CA.
    let b_evil = EdgeProc::start(
        evil.path(),
        "b",
        &[s("--tunnel-listen"), evil_tunnel.to_string()],
        evil_tunnel,
    );
    let a_good = EdgeProc::start(good.path(), "a", &forward(fwd2, evil_tunnel, target), fwd2);
    let r = exchange(fwd2, with_id(2, b"secret")).await;
    assert!(
        r.is_err() || r.as_ref().unwrap().is_empty(),
        "data crossed: {r:?}"
    );
    a_good.wait_for("failed connection", |c| {
        c["connections_failed"].as_u64().unwrap() >= 1
    });
    assert!(
        a_good.log().contains("TLS handshake with peer edge"),
        "{}",
        a_good.log()
    );
    drop(b_evil);
    // Nothing reached the target.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), received.recv())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_tunnel_port_closes_only_that_connection() {
    let ExchangePair {
        _dir,
        a: _a,
        b,
        fwd,
        tunnel,
        received: _received,
    } = exchange_pair("garbage", 14, reply_for, &[], &[]).await;
    // A proxied connection in flight while garbage arrives.
    let good = tokio::spawn(exchange(fwd, request_for(3)));
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
        &payload(9, 4096)[..],
    ] {
        let mut raw = TcpStream::connect(tunnel).await.unwrap();
        let _ = raw.write_all(junk).await;
        let mut buf = vec![0u8; 4096];
        // The edge must close this connection promptly (EOF or reset), not hang.
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match raw.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "edge kept a garbage connection open");
    }
    let back = tokio::time::timeout(Duration::from_secs(60), good)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(back == reply_for(3), "the good connection was disturbed");
    b.wait_for("3 rejections", |c| {
        c["tunnels_rejected"].as_u64().unwrap() >= 3
    });
    let log = b.log();
    assert!(
        log.contains("rejected tunnel connection from 127.0."),
        "{log}"
    );
    assert!(log.contains("TLS handshake failed"), "{log}");
}

/// A receiving edge with a plaintext tunnel listener (lab mode) on `net`, the target
/// listener it would connect to, and the hello a connecting edge would send for it:
/// tests that speak the tunnel protocol by hand.
async fn plaintext_receiver(
    dir: &Scratch,
    net: u8,
    extra: &[String],
) -> (EdgeProc, TcpListener, std::net::SocketAddr, bytes::BytesMut) {
    let (tunnel, target) = (addr(net, 17000), addr(net, 15000));
    let listener = TcpListener::bind(target).await.unwrap();
    let args = [
        &[
            s("--tunnel-listen"),
            tunnel.to_string(),
            s("--insecure-plaintext"),
        ],
        extra,
    ]
    .concat();
    let b = EdgeProc::start(dir.path(), "b", &args, tunnel);
    (b, listener, tunnel, raw_hello(target, 1, 0))
}

/// The Hello of connection `open_seq` of a hand-made peer edge "raw" (epoch 1), to
/// be connected after connection `after_seq`.
fn raw_hello(target: std::net::SocketAddr, open_seq: u64, after_seq: u64) -> bytes::BytesMut {
    let mut hello = bytes::BytesMut::new();
    wire::handshake::Hello {
        edge: "raw".into(),
        epoch: 1,
        cache_bytes: 0,
        window: 1 << 20,
        target: target.to_string(),
        open_seq,
        after_seq,
    }
    .encode(&mut hello);
    hello
}

/// With plaintext tunnels (lab mode), garbage after a valid handshake is a protocol
/// error for that connection only, and the target sees a reset, not a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_reset_the_target_connection() {
    let dir = Scratch::new("frames");
    let (b, listener, tunnel, hello) = plaintext_receiver(&dir, 15, &[]).await;
    let mut raw = TcpStream::connect(tunnel).await.unwrap();
    raw.write_all(&hello).await.unwrap();
    let (mut at_target, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    // A valid literal, then a frame type that does not exist.
    raw.write_all(&[0x01, 0x03, b'a', b'b', b'c', 0xEE, 0, 0])
        .await
        .unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), at_target.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(&got[..], b"abc", "bytes before the bad frame are delivered");
    assert!(r.is_err(), "the target must see a reset, not a clean end");
    b.wait_for("failed connection", |c| {
        c["connections_failed"].as_u64().unwrap() >= 1
    });
    assert!(b.log().contains("unknown frame type 0xee"), "{}", b.log());
}

/// A DONE (the peer's last frame) before the connection is complete (here: before
/// END) is a broken stream, not an end: the target gets what came before it, then a
/// reset, and the connection counts as failed, within the wait for DONE (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_done_before_the_end_resets_the_target_connection() {
    let dir = Scratch::new("early-done");
    let (b, listener, tunnel, hello) = plaintext_receiver(&dir, 69, &[]).await;
    let mut raw = TcpStream::connect(tunnel).await.unwrap();
    raw.write_all(&hello).await.unwrap();
    let (mut at_target, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    // A valid literal, then DONE with no END before it.
    let mut frames = bytes::BytesMut::new();
    wire::frame::Frame::Literal(bytes::Bytes::from_static(b"abc")).encode(&mut frames);
    wire::frame::Frame::Done.encode(&mut frames);
    raw.write_all(&frames).await.unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), at_target.read_to_end(&mut got))
        .await
        .expect("the target connection must end");
    assert_eq!(&got[..], b"abc", "bytes before DONE are delivered");
    assert!(r.is_err(), "the target must see a reset, not a clean end");
    b.wait_for("failed connection", |c| {
        c["connections_failed"].as_u64().unwrap() >= 1
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_protocol_version_is_refused_at_the_handshake() {
    // An edge of an older (or newer) release: its hello carries another version. The
    // tunnel must end before the target is ever connected, with a log line naming
    // both versions and what to do.
    let dir = Scratch::new("version");
    let (b, listener, tunnel, hello) = plaintext_receiver(&dir, 20, &[]).await;
    let ours = wire::handshake::VERSION;
    for other in [1, ours + 1] {
        assert_ne!(other, ours);
        let mut old = hello.clone();
        old[4..6].copy_from_slice(&other.to_be_bytes());
        let mut raw = TcpStream::connect(tunnel).await.unwrap();
        raw.write_all(&old).await.unwrap();
        // The edge closes the tunnel connection without a reply.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut got))
            .await
            .expect("the edge must close the tunnel connection");
        assert!(got.is_empty(), "no reply to a hello of v{other}: {got:?}");
        let text = format!(
            "peer speaks tunnel protocol v{other}; this edge speaks v{ours}: upgrade the older edge"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.log().contains(&text) {
            assert!(
                Instant::now() < deadline,
                "no log line naming the versions: {}",
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), listener.accept())
            .await
            .is_err(),
        "the target was connected for a refused peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_predecessor_never_arrives_waits_a_bounded_time() {
    // A Hello naming a connection before it that never comes (its tunnel connection
    // died on the way): the edge holds it back half a connect timeout, then connects
    // it anyway (counted), in time for the peer, which waits a whole one for the reply.
    let dir = Scratch::new("order-lost");
    let (b, listener, tunnel, _) =
        plaintext_receiver(&dir, 28, &[s("--connect-timeout"), s("2")]).await;
    let target = listener.local_addr().unwrap();
    let hello = raw_hello(target, 42, 41);
    let started = Instant::now();
    let mut raw = TcpStream::connect(tunnel).await.unwrap();
    raw.write_all(&hello).await.unwrap();
    let (_at_target, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("connected after the bounded wait")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "did not wait for the connection before it ({waited:?})"
    );
    let mut rbuf = bytes::BytesMut::new();
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(r) = wire::handshake::HelloReply::decode(&mut rbuf).unwrap() {
                return r;
            }
            assert!(raw.read_buf(&mut rbuf).await.unwrap() > 0, "closed");
        }
    })
    .await
    .expect("a reply within the peer's connect timeout");
    assert_eq!(reply.result, Ok(()));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "reply too late for the peer"
    );
    b.wait_for("the expired wait counted", |c| {
        c["open_order_expired"].as_u64().unwrap() == 1
    });
    // A connection naming one that did arrive goes at once.
    let next = raw_hello(target, 43, 42);
    let started = Instant::now();
    let mut raw2 = TcpStream::connect(tunnel).await.unwrap();
    raw2.write_all(&next).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "waited for one already connected"
    );
    assert_eq!(b.counter("open_order_expired"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_and_reset_propagate() {
    let dir = Scratch::new("halfclose");
    certs(dir.path(), &["a", "b"]);
    let (tunnel, fwd, target) = (addr(16, 17000), addr(16, 14000), addr(16, 15000));
    let listener = TcpListener::bind(target).await.unwrap();
    let _b = EdgeProc::start(
        dir.path(),
        "b",
        &[s("--tunnel-listen"), tunnel.to_string()],
        tunnel,
    );
    let a = EdgeProc::start(dir.path(), "a", &forward(fwd, tunnel, target), fwd);
    let server = tokio::spawn(async move {
        // 1: request/response: read to EOF, then answer, then close.
        let (mut c, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        c.read_to_end(&mut req).await.unwrap();
        let answer: Vec<u8> = req.iter().rev().copied().collect();
        c.write_all(&answer).await.unwrap();
        c.shutdown().await.unwrap();
        // 2: read a little, then reset.
        let (c, _) = listener.accept().await.unwrap();
        let mut c = c;
        let mut buf = [0u8; 1000];
        c.read_exact(&mut buf).await.unwrap();
        common_reset(c);
    });
    let req = payload(42, 300_000);
    let mut c = TcpStream::connect(fwd).await.unwrap();
    c.write_all(&req).await.unwrap();
    c.shutdown().await.unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).await.unwrap();
    let want: Vec<u8> = req.iter().rev().copied().collect();
    assert!(answer == want, "half-closed request/response differs");

    let mut c = TcpStream::connect(fwd).await.unwrap();
    let big = payload(43, 8 << 20);
    // The reset surfaces on whichever call meets it first: the kernel reports a
    // connection reset once (then reads see EOF), so check both.
    let wrote = c.write_all(&big).await;
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut sink))
        .await
        .unwrap();
    assert!(
        wrote.is_err() || read.is_err(),
        "a reset at the target must reach the client as a reset, got write {wrote:?}, read {read:?}"
    );
    server.await.unwrap();
    a.wait_for("a reset connection", |c| {
        c["connections_failed"].as_u64().unwrap() >= 1
    });
}

fn common_reset(c: TcpStream) {
    #[allow(deprecated)]
    c.set_linger(Some(Duration::ZERO)).unwrap();
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_killed_mid_stream_fails_loudly_then_a_restarted_peer_works() {
    killed_peer_case("killed", 17, &[]).await;
}

/// The same with compression always on: connections carry compression streams, and
/// the restarted peer's new connections start new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_killed_with_compression_streams_then_a_restarted_peer_works() {
    let a = killed_peer_case("killed-streams", 21, &[s("--compress"), s("always")]).await;
    assert!(
        a["counters"]["batches_streamed"].as_u64().unwrap() > 0,
        "no compression stream was used: {a}"
    );
}

/// A peer edge SIGKILLed mid-stream: the client sees a reset, the failure is logged,
/// and a restarted peer (empty store, new epoch) gets no stale references. Returns
/// the source edge's final stats.
async fn killed_peer_case(name: &str, net: u8, extra: &[String]) -> serde_json::Value {
    let dir = Scratch::new(name);
    certs(dir.path(), &["a", "b"]);
    let (tunnel, fwd, target) = (addr(net, 17000), addr(net, 14000), addr(net, 15000));
    let listener = TcpListener::bind(target).await.unwrap();
    let mut received = serve_exchange(listener, |_| Vec::new()).await;
    let b_args = [&[s("--tunnel-listen"), tunnel.to_string()], extra].concat();
    let mut b = EdgeProc::start(dir.path(), "b", &b_args, tunnel);
    let a = EdgeProc::start(
        dir.path(),
        "a",
        &[forward(fwd, tunnel, target), extra.to_vec()].concat(),
        fwd,
    );
    let body = payload(7, 4 << 20);
    // Warm B's store with `body`, so A believes B holds it.
    let back = exchange(fwd, with_id(1, &body)).await.unwrap();
    assert!(back.is_empty());
    received.recv().await.unwrap();
    // A slow stream, then kill B in the middle of it.
    let mut c = TcpStream::connect(fwd).await.unwrap();
    c.write_all(&with_id(2, &payload(8, 1 << 20)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.kill();
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        // Keep writing until the edge resets us; a clean EOF would be a silent failure.
        for _ in 0..1000 {
            if c.write_all(&[0u8; 65536]).await.is_err() {
                return Err(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.read_to_end(&mut rest).await.map(|_| ()).map_err(|_| ())
    })
    .await
    .expect("the client was not told");
    assert!(
        outcome.is_err(),
        "the client must see a reset when the peer edge dies"
    );
    a.wait_for("failure counted", |c| {
        c["connections_failed"].as_u64().unwrap() >= 1
    });
    assert!(
        a.log().contains("WARN"),
        "a mid-stream loss must be logged as a warning: {}",
        a.log()
    );
    // B comes back with an empty store and a new epoch: A must not send stale tokens.
    let b2 = EdgeProc::start(dir.path(), "b", &b_args, tunnel);
    let data = with_id(3, &body);
    let back = exchange(fwd, data.clone()).await.unwrap();
    assert!(back.is_empty());
    loop {
        let (id, n, h) = tokio::time::timeout(Duration::from_secs(30), received.recv())
            .await
            .unwrap()
            .unwrap();
        if id == 3 {
            assert_eq!((n, h), (data.len() as u64, blake3::hash(&data)));
            break;
        }
    }
    let s2 = b2.wait_for("completed", |c| {
        c["connections_completed"].as_u64().unwrap() >= 1
    });
    assert_eq!(
        s2["counters"]["misses_sent"], 0,
        "stale references were sent to a restarted peer: {s2}"
    );
    let sa = a.wait_for("two completed connections", |c| {
        c["connections_completed"].as_u64().unwrap() >= 2
    });
    // A saw B's epoch change: a restart, not a second edge with the same name.
    assert_eq!(sa["counters"]["peer_name_conflicts"], 0, "{sa}");
    sa
}

/// Two source edges announcing the same name (a configuration copied to a second
/// site) into one receiving edge: every stream stays exact, and the receiver says
/// what is wrong (a warning naming the fix, and a counter), since each one's
/// connections reset its model of the other's store; a restart (new epoch) is not
/// mistaken for it (`killed_peer_case`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_announcing_one_name_are_reported() {
    let dir = Scratch::new("same-name");
    certs(dir.path(), &["west", "b"]);
    let (tunnel, f1, f2, target) = (
        addr(27, 17000),
        addr(27, 14001),
        addr(27, 14002),
        addr(27, 15000),
    );
    let listener = TcpListener::bind(target).await.unwrap();
    let mut received = serve_exchange(listener, reply_for).await;
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[s("--tunnel-listen"), tunnel.to_string()],
        tunnel,
    );
    let _w1 = EdgeProc::start_labelled(
        None,
        dir.path(),
        "west1",
        "west",
        &forward(f1, tunnel, target),
        f1,
    );
    let _w2 = EdgeProc::start_labelled(
        None,
        dir.path(),
        "west2",
        "west",
        &forward(f2, tunnel, target),
        f2,
    );
    for (id, fwd) in [(1u64, f1), (2, f2), (3, f1), (4, f2)] {
        let back = exchange(fwd, request_for(id)).await.expect("exchange");
        assert!(back == reply_for(id), "reply {id} differs");
        expect_requests(&mut received, id..id + 1, request_for).await;
    }
    // The third connection brought back the epoch the second had replaced.
    let sb = b.wait_for("the name conflict counted", |c| {
        c["peer_name_conflicts"].as_u64().unwrap() >= 1
    });
    assert_eq!(sb["counters"]["connections_failed"], 0, "{sb}");
    assert!(
        b.log()
            .contains("two live peer edges call themselves \"west\""),
        "{}",
        b.log()
    );
}

#[test]
fn config_errors_are_clear() {
    let dir = Scratch::new("config");
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "tunnel_listen = \"127.0.0.1:7700\"\ncache_mem = \"1GiB\"\ninsecure_plaintext = true\ncahce_mem = 5\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["edge", "--config"])
        .arg(&typo)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cahce_mem") && err.contains("typo.toml"),
        "{err}"
    );

    let out = std::process::Command::new(BIN)
        .args([
            "edge",
            "--tunnel-listen",
            "127.0.0.1:7700",
            "--tls-ca",
            "/nonexistent/ca.crt",
            "--tls-cert",
            "/nonexistent/a.crt",
            "--tls-key",
            "/nonexistent/a.key",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent/") && err.contains("shrinker certs"),
        "{err}"
    );
    // Reported before the edge spends time touching its heap (`--prefault-mem`).
    assert!(!err.contains("of heap"), "{err}");

    let out = std::process::Command::new(BIN)
        .args(["edge", "--tunnel-listen", "127.0.0.1:7700"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--insecure-plaintext"),
        "{err}"
    );

    let out = std::process::Command::new(BIN)
        .args(["edge", "--forward", "nonsense", "--insecure-plaintext"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("LISTEN=PEER=TARGET"));
}

/// Edge "b" alone, accepting plaintext tunnels on `tunnel`.
fn plaintext_tunnel_edge(dir: &Scratch, tunnel: std::net::SocketAddr) -> EdgeProc {
    EdgeProc::start(
        dir.path(),
        "b",
        &[
            s("--tunnel-listen"),
            tunnel.to_string(),
            s("--insecure-plaintext"),
        ],
        tunnel,
    )
}

/// The edge re-executes itself with glibc's malloc tunables (`proxy::allocator`):
/// its environment, as the kernel holds it for the running image, has them (without
/// it, the test's environment has no `GLIBC_TUNABLES`).
#[test]
fn an_edge_runs_with_its_malloc_tunables() {
    let dir = Scratch::new("tunables");
    let tunnel = addr(18, 17020);
    let b = plaintext_tunnel_edge(&dir, tunnel);
    let environ = std::fs::read(format!("/proc/{}/environ", b.child.id())).unwrap();
    // glibc cuts the string it parsed at the first `:` (2.36), so the first tunable.
    let first = proxy::allocator::EDGE_TUNABLES.split(':').next().unwrap();
    let want = format!("GLIBC_TUNABLES={first}");
    assert!(
        environ
            .split(|&c| c == 0)
            .any(|v| v.starts_with(want.as_bytes())),
        "{}",
        String::from_utf8_lossy(&environ)
    );
    let log = b.stop();
    assert!(log.contains("edge stopped"), "{log}");
}

#[test]
fn sigterm_stops_gracefully_and_writes_final_stats() {
    let dir = Scratch::new("sigterm");
    let tunnel = addr(18, 17000);
    let b = plaintext_tunnel_edge(&dir, tunnel);
    let stats = b.stats.clone();
    let log = b.stop();
    assert!(log.contains("edge stopped"), "{log}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stats).unwrap()).unwrap();
    assert_eq!(v["edge"], "b");
}

/// Log-like text, different per `id` (numbers), compressible and hardly deduplicable.
fn text_for(id: u64) -> Vec<u8> {
    let mut out = String::new();
    let mut n = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    while out.len() < 600 * 1024 {
        n ^= n << 13;
        n ^= n >> 7;
        n ^= n << 17;
        out.push_str(&format!(
            "conn {id} seq {} level={} user-{} fetched /srv/data/{:x} in {} us\n",
            out.len(),
            ["info", "warn", "debug"][(n % 3) as usize],
            n % 97,
            n >> 40,
            n % 10_000
        ));
    }
    out.into_bytes()
}

/// `--compress always` with a stream budget for only some of the connections: those
/// granted a stream send ZSTREAM pieces, the others ZBATCH frames, in both directions,
/// over real TLS sockets; every byte arrives, and the budget is returned as
/// connections end (a second wave gets streams again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compression_streams_for_some_connections_stay_exact() {
    // Room for 3 streams of 8 MiB history (each counted as 10 MiB) per edge.
    let budget = [s("--compress"), s("always"), s("--stream-mem"), s("31MiB")];
    let reply = |id| text_for(id + 1_000_000);
    let ExchangePair {
        _dir,
        a,
        b,
        fwd,
        mut received,
        ..
    } = exchange_pair("streams", 19, reply, &budget, &budget).await;
    let mut streamed_before = 0;
    for wave in 0..2u64 {
        // Every connection sends half its data, then waits until all 12 are relayed
        // (so they hold or lack a stream at the same time), then sends the rest.
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(12));
        let mut tasks = Vec::new();
        for id in wave * 100..wave * 100 + 12 {
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let data = with_id(id, &text_for(id));
                let (mut r, mut w) = TcpStream::connect(fwd).await.unwrap().into_split();
                let half = data.len() / 2;
                w.write_all(&data[..half]).await.unwrap();
                // Reply bytes prove the edges relay this connection end to end (kernel
                // buffers would take the half even before the edge accepted).
                let mut back = vec![0u8; 4096];
                r.read_exact(&mut back).await.unwrap();
                barrier.wait().await;
                let sender = tokio::spawn(async move {
                    w.write_all(&data[half..]).await.unwrap();
                    w.shutdown().await.unwrap();
                });
                r.read_to_end(&mut back).await.unwrap();
                sender.await.unwrap();
                (id, back)
            }));
        }
        expect_replies(tasks, |id| text_for(id + 1_000_000)).await;
        expect_requests(&mut received, wave * 100..wave * 100 + 12, |id| {
            with_id(id, &text_for(id))
        })
        .await;
        let done = 12 * (wave + 1);
        let sa = a.wait_for("a wave of completed connections", |c| {
            c["connections_completed"] == done
        });
        let sb = b.wait_for("a wave of completed tunnels", |c| {
            c["connections_completed"] == done
        });
        for (edge, stats) in [("A", &sa), ("B", &sb)] {
            let c = &stats["counters"];
            let (streamed, compressed) = (
                c["batches_streamed"].as_u64().unwrap(),
                c["batches_compressed"].as_u64().unwrap(),
            );
            assert!(streamed > 0, "{edge}: no stream after wave {wave}: {c}");
            // A's 12 uplinks are all open at the barrier, so 9 of them compress batch
            // by batch. B's uplinks (the replies) finish before the barrier and return
            // their streams as they do, so B may stream every batch.
            assert!(
                edge == "B" || streamed < compressed,
                "{edge}: every batch streamed although the budget holds 3 streams: {c}"
            );
            if edge == "A" {
                assert!(
                    streamed > streamed_before,
                    "A: wave {wave} got no stream back from the budget: {c}"
                );
                streamed_before = streamed;
            }
            assert_eq!(c["connections_failed"], 0, "{edge}: {c}");
        }
    }
}

/// The peer edge opens its connections to the target in the order this edge accepted
/// them (QEMU 7.2 tells a migration's main channel from its multifd channels only by
/// that order), although TCP and TLS to the peer are set up in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_sees_connections_in_accept_order() {
    let dir = Scratch::new("order");
    certs(dir.path(), &["a", "b"]);
    let (tunnel, fwd, target) = (addr(19, 17100), addr(19, 14100), addr(19, 15100));
    let listener = TcpListener::bind(target).await.unwrap();
    const N: u64 = 16;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for accepted in 0.. {
            let (mut s, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut id = [0u8; 8];
                s.read_exact(&mut id).await.unwrap();
                let _ = tx.send((accepted, u64::from_le_bytes(id)));
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[s("--tunnel-listen"), tunnel.to_string()],
        tunnel,
    );
    let _a = EdgeProc::start(dir.path(), "a", &forward(fwd, tunnel, target), fwd);
    for round in 0..3u64 {
        // Connect one after another (so the edge accepts in this order), each sending
        // its number at once; nobody waits for the tunnel before the next connects.
        let mut clients = Vec::new();
        for k in 0..N {
            let mut c = TcpStream::connect(fwd).await.unwrap();
            c.write_all(&(round * 100 + k).to_le_bytes()).await.unwrap();
            clients.push(c);
        }
        let mut seen = Vec::new();
        for _ in 0..N {
            let got = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("target got every connection")
                .unwrap();
            seen.push(got);
        }
        seen.sort();
        let ids: Vec<u64> = seen.iter().map(|(_, id)| id - round * 100).collect();
        assert_eq!(seen[0].0, round * N, "round {round}: accepts counted from");
        assert_eq!(
            ids,
            (0..N).collect::<Vec<_>>(),
            "round {round}: accept order"
        );
        drop(clients);
        b.wait_for("a round of finished tunnels", |c| {
            c["connections_completed"].as_u64().unwrap() + c["connections_failed"].as_u64().unwrap()
                >= N * (round + 1)
        });
    }
}

/// A new local connection starts on the warm tunnel connection the edge keeps to its
/// peer (TCP and TLS already done; after the first, the one the previous connection
/// carried and handed back), bytes stay exact, and the peer neither counts nor logs
/// the warm connections as rejected, not even the ones left unused at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_tunnel_connections_carry_new_connections() {
    let ExchangePair {
        _dir,
        a,
        b,
        fwd,
        mut received,
        ..
    } = exchange_pair("warm", 22, reply_for, &[], &[]).await;
    for id in 1..=3u64 {
        // One at a time, further apart than a burst (`spare::BURST_GAP`), so the keeper
        // keeps one fresh connection: the first finds the one made at start; each next
        // one, the connection the one before carried, handed back, beside the fresh
        // one made when that was taken.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let idle = if id == 1 { 1 } else { 2 };
        a.wait_for("a warm connection", |c| {
            c["spares_idle"].as_u64().unwrap() >= idle
        });
        let back = exchange(fwd, request_for(id)).await.unwrap();
        assert!(back == reply_for(id), "conn {id}: reply bytes differ");
        expect_requests(&mut received, id..id + 1, request_for).await;
    }
    let sa = a.wait_for("three connections on warm ones", |c| {
        c["connections_completed"].as_u64().unwrap() >= 3
    });
    assert_eq!(sa["counters"]["spares_used"], 3, "{sa}");
    assert_eq!(sa["counters"]["spares_stale"], 0, "{sa}");
    // The first waited for the peer's reply; the others knew the peer from it and sent
    // their data without waiting.
    assert_eq!(sa["counters"]["opens_early"], 2, "{sa}");
    // ... on the tunnel connection the first one carried (handed back after it).
    assert_eq!(sa["counters"]["tunnels_reused"], 2, "{sa}");
    let a_log = a.stop();
    assert!(!a_log.contains("WARN"), "{a_log}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.counter("tunnels_rejected"), 0, "{}", b.log());
    assert_eq!(b.counter("tunnels_accepted"), 3);
    assert!(!b.log().contains("WARN"), "{}", b.log());
}

/// An edge told to stop does not wait out its grace period for tunnel connections that
/// only sit idle (the peer's warm one, and the one a finished connection handed back):
/// it closes them and exits at once, and the peer's keeper drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_edge_does_not_wait_for_idle_tunnel_connections() {
    let ExchangePair {
        _dir,
        a,
        b,
        fwd,
        mut received,
        ..
    } = exchange_pair("idle-stop", 68, reply_for, &[], &[]).await;
    let back = exchange(fwd, request_for(1)).await.unwrap();
    assert!(back == reply_for(1), "reply bytes differ");
    expect_requests(&mut received, 1..2, request_for).await;
    // The used one handed back, and the fresh one made when it was taken.
    a.wait_for("two idle tunnel connections", |c| {
        c["spares_idle"].as_u64().unwrap() >= 2
    });
    let t0 = Instant::now();
    let log = b.stop();
    let took = t0.elapsed();
    assert!(!log.contains("still open"), "{log}");
    // The grace period for open connections is 30 s.
    assert!(
        took < Duration::from_secs(10),
        "stopping took {took:?}:\n{log}"
    );
    a.wait_for("the idle connections dropped", |c| {
        c["spares_idle"].as_u64().unwrap() == 0
    });
}

/// The channels of a multifd migration open at once: after one such burst the keeper
/// holds a warm connection for each, and the next burst finds them all warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_finds_as_many_warm_ones_the_next_time() {
    let ExchangePair {
        _dir,
        a,
        b: _b,
        fwd,
        mut received,
        ..
    } = exchange_pair("warm-burst", 53, reply_for, &[], &[]).await;
    a.wait_for("a warm connection", |c| {
        c["spares_made"].as_u64().unwrap() >= 1
    });
    let mut used = Vec::new();
    for ids in [1..5u64, 5..9] {
        let tasks: Vec<_> = ids
            .clone()
            .map(|id| {
                tokio::spawn(async move { (id, exchange(fwd, request_for(id)).await.unwrap()) })
            })
            .collect();
        expect_replies(tasks, reply_for).await;
        expect_requests(&mut received, ids.clone(), request_for).await;
        // Four warm connections held, one for each of the burst's (handed back by the
        // burst's connections, or made).
        let sa = a.wait_for("four warm connections", |c| {
            c["connections_completed"].as_u64().unwrap() >= ids.end - 1
                && c["spares_idle"].as_u64().unwrap() >= 4
        });
        used.push(sa["counters"]["spares_used"].as_u64().unwrap());
        assert_eq!(sa["counters"]["connections_failed"], 0, "{sa}");
    }
    // The second burst found a warm connection for each of its four.
    assert_eq!(
        used[1] - used[0],
        4,
        "warm connections used per burst: {used:?}"
    );
}

/// A warm connection that died without its keeper noticing (a middlebox dropped the
/// peer's side; the peer restarted behind it): the connection that takes it finds it
/// dead at the handshake, connects afresh and still delivers every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_warm_connection_is_replaced_without_losing_bytes() {
    let CutPair {
        _dir,
        _b,
        a,
        cut,
        fwd,
        mut received,
    } = cut_pair("warm-dead", 23, Duration::ZERO).await;
    a.wait_for("a warm connection", |c| {
        c["spares_made"].as_u64().unwrap() >= 1
    });
    cut.send_replace(true);
    let back = exchange(fwd, request_for(5)).await.unwrap();
    assert!(back == reply_for(5), "reply bytes differ");
    expect_requests(&mut received, 5..6, request_for).await;
    let sa = a.wait_for("the connection completed", |c| {
        c["connections_completed"].as_u64().unwrap() >= 1
    });
    assert_eq!(sa["counters"]["spares_used"], 1, "{sa}");
    assert_eq!(sa["counters"]["spares_stale"], 1, "{sa}");
    assert_eq!(sa["counters"]["connections_failed"], 0, "{sa}");
}

/// The same once the peer is known: the connection sends its data before the peer's
/// handshake reply, on a warm connection that turns out dead only 500 ms after its
/// first byte, when the local side's request has long been read and sent into it.
/// The connection kept what it read until the reply, so it starts over on a fresh
/// connection and every byte still arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_connection_lost_before_the_reply_loses_no_byte() {
    let CutPair {
        _dir,
        _b,
        a,
        cut,
        fwd,
        mut received,
    } = cut_pair("warm-lost", 47, Duration::from_millis(500)).await;
    // The first connection learns the peer (and waits for its reply). It may or may
    // not find the start-up warm connection ready; either way one is left idle after.
    let back = exchange(fwd, request_for(4)).await.unwrap();
    assert!(back == reply_for(4), "first reply bytes differ");
    expect_requests(&mut received, 4..5, request_for).await;
    a.wait_for("an idle warm connection", |c| {
        let (made, taken) = (c["spares_made"].as_u64(), c["spares_used"].as_u64());
        made.unwrap() > taken.unwrap()
    });
    cut.send_replace(true);
    let back = exchange(fwd, request_for(5)).await.unwrap();
    assert!(back == reply_for(5), "reply bytes differ");
    expect_requests(&mut received, 5..6, request_for).await;
    let sa = a.wait_for("both connections completed", |c| {
        c["connections_completed"].as_u64().unwrap() >= 2
    });
    assert_eq!(sa["counters"]["opens_early"], 1, "{sa}");
    assert_eq!(sa["counters"]["spares_stale"], 1, "{sa}");
    assert_eq!(sa["counters"]["connections_failed"], 0, "{sa}");
    let log = a.log();
    assert!(
        log.contains("starting over on a fresh one with the") && !log.contains("with the 0 bytes"),
        "the lost connection should have replayed what it read:\n{log}"
    );
    // Nothing else reached the target.
    let extra = tokio::time::timeout(Duration::from_millis(300), received.recv()).await;
    assert!(extra.is_err(), "a request arrived twice: {extra:?}");
}

/// Edge A forwarding through a [`cutting_relay`] (`linger`) to edge B, which
/// serves [`serve_exchange`] with [`reply_for`].
struct CutPair {
    _dir: Scratch,
    _b: EdgeProc,
    a: EdgeProc,
    cut: tokio::sync::watch::Sender<bool>,
    fwd: std::net::SocketAddr,
    received: tokio::sync::mpsc::UnboundedReceiver<(u64, u64, blake3::Hash)>,
}

async fn cut_pair(name: &str, net: u8, linger: Duration) -> CutPair {
    let dir = Scratch::new(name);
    certs(dir.path(), &["a", "b"]);
    let (tunnel, cutter, fwd, target) = (
        addr(net, 17000),
        addr(net, 17500),
        addr(net, 14000),
        addr(net, 15000),
    );
    let received = serve_exchange(TcpListener::bind(target).await.unwrap(), reply_for).await;
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[s("--tunnel-listen"), tunnel.to_string()],
        tunnel,
    );
    let cut = cutting_relay(TcpListener::bind(cutter).await.unwrap(), tunnel, linger);
    let a = EdgeProc::start(dir.path(), "a", &forward(fwd, cutter, target), fwd);
    CutPair {
        _dir: dir,
        _b: b,
        a,
        cut,
        fwd,
        received,
    }
}

/// A TCP relay to `to`. Once `true` is sent on the returned channel, every connection
/// it carries loses its far side at once, while the near side stays open, silent,
/// until it sends something, then is reset (after taking and dropping what is sent
/// for `linger`): a connection that looks alive to an idle holder and dies on first
/// use. Connections accepted afterwards relay normally.
fn cutting_relay(
    listener: TcpListener,
    to: std::net::SocketAddr,
    linger: Duration,
) -> tokio::sync::watch::Sender<bool> {
    let (cut, watch) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut near, _)) = listener.accept().await {
            let mut watch = watch.clone();
            let cut_before = *watch.borrow_and_update();
            tokio::spawn(async move {
                let mut far = TcpStream::connect(to).await.unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut near, &mut far) => {}
                    _ = async { watch.wait_for(|c| *c && !cut_before).await.map(|_| ()) } => {
                        drop(far);
                        let mut b = [0u8; 1];
                        let _ = near.read(&mut b).await;
                        let mut sink = vec![0u8; 64 * 1024];
                        let _ = tokio::time::timeout(linger, async {
                            while matches!(near.read(&mut sink).await, Ok(n) if n > 0) {}
                        })
                        .await;
                        let _ = near.set_zero_linger();
                    }
                }
            });
        }
    });
    cut
}

/// A target on `listener` that reads each connection's 8-byte id and hands the
/// connection to `serve(id, connection)`, one task each.
fn serve_by_id<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(u64, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move {
                let mut idb = [0u8; 8];
                c.read_exact(&mut idb).await.unwrap();
                serve(u64::from_le_bytes(idb), c).await;
            });
        }
    });
}

/// Reads connection `id` to its end and half-closes it: what `serve_exchange`
/// reports (bytes received with the id, and their hash).
async fn read_to_end_hashed(id: u64, c: &mut TcpStream) -> (u64, u64, blake3::Hash) {
    let mut h = blake3::Hasher::new();
    h.update(&id.to_le_bytes());
    let (mut buf, mut n) = (vec![0u8; 64 * 1024], 8u64);
    while let Ok(k) = c.read(&mut buf).await {
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let _ = c.shutdown().await;
    (id, n, h.finalize())
}

/// `len` bytes that no other seed gives: every chunk new to any store.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// A connection fails while a sibling's references wait for chunks it was carrying
/// (REF_RECENT the receiving store lacks), and a third connection keeps the store
/// busy with new chunks. The waiting references must give up at once and be filled,
/// not wait out the 10 s a busy store otherwise buys them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_sibling_ends_the_wait_for_its_chunks() {
    let dir = Scratch::new("defer-fail");
    certs(dir.path(), &["a", "b"]);
    let (tunnel, fwd, target) = (addr(24, 17000), addr(24, 14000), addr(24, 15000));
    // The target: connection 2 is never read, and reset on `reset_2`; the others are
    // read to the end and reported like `serve_exchange`.
    let listener = TcpListener::bind(target).await.unwrap();
    let (report, mut received) = tokio::sync::mpsc::unbounded_channel();
    let reset_2 = std::sync::Arc::new(tokio::sync::Notify::new());
    let reset = reset_2.clone();
    serve_by_id(listener, move |id, mut c| {
        let (report, reset) = (report.clone(), reset.clone());
        async move {
            if id == 2 {
                reset.notified().await;
                let _ = c.set_zero_linger();
                return;
            }
            let _ = report.send(read_to_end_hashed(id, &mut c).await);
        }
    });
    // Without read-ahead, B stops reading connection 2's tunnel once its target
    // stops reading (with it, B would store the whole body and nothing would wait).
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[
            s("--tunnel-listen"),
            tunnel.to_string(),
            s("--read-ahead-mem"),
            s("0"),
        ],
        tunnel,
    );
    let a = EdgeProc::start(dir.path(), "a", &forward(fwd, tunnel, target), fwd);
    let body = random_bytes(1, 48 << 20);
    // Connection 2 sends `body`: its chunks leave A, and stall in the tunnel and in
    // A's queue once B cannot hand them to the target.
    let mut c2 = TcpStream::connect(fwd).await.unwrap();
    let sent_2 = with_id(2, &body);
    let c2_task = tokio::spawn(async move {
        let _ = c2.write_all(&sent_2).await;
        let mut rest = Vec::new();
        let _ = c2.read_to_end(&mut rest).await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Connection 3 keeps the store taking new chunks (~8 MB/s) until told to stop.
    let stop_3 = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = stop_3.clone();
    let c3_task = tokio::spawn(async move {
        let mut c3 = TcpStream::connect(fwd).await.unwrap();
        c3.write_all(&3u64.to_le_bytes()).await.unwrap();
        let mut seed = 100;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && seed < 100 + 400 {
            c3.write_all(&random_bytes(seed, 256 << 10)).await.unwrap();
            seed += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        c3.shutdown().await.unwrap();
    });
    // Connection 1 sends `body` too: A refers to the chunks connection 2 carried.
    let sent_1 = with_id(1, &body);
    let c1_task = tokio::spawn(exchange(fwd, sent_1.clone()));
    // By now connection 1's references to the stalled chunks wait at B (its
    // counters show them only once they resolve).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reset_at = Instant::now();
    reset_2.notify_one();
    let back = tokio::time::timeout(Duration::from_secs(60), c1_task)
        .await
        .expect("connection 1 in time")
        .unwrap()
        .unwrap();
    let waited = reset_at.elapsed();
    stop_3.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(back.is_empty());
    // 10 s is what the busy store would have bought the references; the fill itself
    // takes a round trip on loopback.
    assert!(
        waited < Duration::from_secs(5),
        "connection 1 finished {waited:?} after connection 2 failed: {}",
        b.log()
    );
    let (id, n, h) = tokio::time::timeout(Duration::from_secs(30), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (id, n, h),
        (1, sent_1.len() as u64, blake3::hash(&sent_1)),
        "connection 1 differs at the target"
    );
    b.wait_for("references that waited, then were filled", |c| {
        c["refs_deferred"].as_u64().unwrap() > 0 && c["misses_sent"].as_u64().unwrap() > 0
    });
    // A took back what connection 2 claimed B would store: later connections send
    // those chunks again instead of referring to them.
    a.wait_for("connection 2's unacknowledged chunks forgotten", |c| {
        c["peer_chunks_forgotten"].as_u64().unwrap() > 0
    });
    c3_task.await.unwrap();
    let _ = c2_task.await;
    drop(a);
}

/// A target that does not read one connection until a sibling's data has arrived,
/// while the sibling's data refers to chunks that connection carries far behind what
/// the target would take: QEMU's multifd channels at a sync point. The receiving edge
/// must read on past the stalled socket, storing those chunks, instead of leaving the
/// sibling's references to wait out their deferral (500 ms without progress) and
/// then cost a MISS/FILL round trip each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_local_socket_does_not_hold_back_chunks_a_sibling_waits_for() {
    let dir = Scratch::new("read-ahead");
    certs(dir.path(), &["a", "b"]);
    let (tunnel, fwd, target) = (addr(29, 17000), addr(29, 14000), addr(29, 15000));
    // The target reads connection 1 only after connection 2 has ended; it reports
    // each connection like `serve_exchange`.
    let listener = TcpListener::bind(target).await.unwrap();
    let (report, mut received) = tokio::sync::mpsc::unbounded_channel();
    let ended_2 = std::sync::Arc::new(tokio::sync::Notify::new());
    serve_by_id(listener, move |id, mut c| {
        let (report, ended_2) = (report.clone(), ended_2.clone());
        async move {
            if id == 1 {
                ended_2.notified().await;
            }
            let got = read_to_end_hashed(id, &mut c).await;
            if id == 2 {
                ended_2.notify_one();
            }
            let _ = report.send(got);
        }
    });
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[s("--tunnel-listen"), tunnel.to_string()],
        tunnel,
    );
    let a = EdgeProc::start(dir.path(), "a", &forward(fwd, tunnel, target), fwd);
    // Connection 0 leaves 40 MiB of chunks at B. Connection 1 sends them again (a few
    // hundred kilobytes of references for ten times what the socket buffers between B
    // and the target hold), then 1 MiB nobody has sent.
    let known = random_bytes(30, 40 << 20);
    let fresh = random_bytes(31, 1 << 20);
    let sent_0 = with_id(0, &known);
    assert!(exchange(fwd, sent_0.clone()).await.unwrap().is_empty());
    let count = |c: &serde_json::Value, k: &str| c[k].as_u64().unwrap();
    let mut body_1 = known.clone();
    body_1.extend_from_slice(&fresh);
    let sent_1 = with_id(1, &body_1);
    let c1_task = tokio::spawn(exchange(fwd, sent_1.clone()));
    // A encodes all of connection 1 (its references are few bytes on the WAN) ...
    let through_1 = (sent_0.len() + sent_1.len()) as u64;
    a.wait_for("connection 1 read by A", |c| {
        count(c, "lan_bytes_in") >= through_1
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a_1 = a.wait_for("A's counters", |_| true)["counters"].clone();
    // ... and B reads all of it, though its target has not taken a byte of it.
    let wan_1 = count(&a_1, "wan_bytes_out");
    b.wait_for("all A sent read by B", |c| {
        count(c, "wan_bytes_in") >= wan_1
    });
    // Connection 2's copy of the fresh bytes: references to those chunks.
    let sent_2 = with_id(2, &fresh);
    let started_2 = Instant::now();
    assert!(exchange(fwd, sent_2.clone()).await.unwrap().is_empty());
    let took_2 = started_2.elapsed();
    assert!(tokio::time::timeout(Duration::from_secs(60), c1_task)
        .await
        .expect("connection 1 in time")
        .unwrap()
        .unwrap()
        .is_empty());
    let mut got = HashMap::new();
    for _ in 0..3 {
        let (id, n, h) = tokio::time::timeout(Duration::from_secs(30), received.recv())
            .await
            .unwrap()
            .unwrap();
        got.insert(id, (n, h));
    }
    for (id, sent) in [(0, &sent_0), (1, &sent_1), (2, &sent_2)] {
        assert_eq!(
            got[&id],
            (sent.len() as u64, blake3::hash(sent)),
            "connection {id} differs at the target"
        );
    }
    let a_end = a.wait_for("the three connections done", |c| {
        count(c, "connections_completed") == 3
    })["counters"]
        .clone();
    // As references: a few kilobytes on the WAN, where the random megabyte as chunks
    // would be more than a megabyte.
    let wan_2 = count(&a_end, "wan_bytes_out") - wan_1;
    assert!(
        wan_2 < 256 << 10,
        "connection 2 took {wan_2} WAN bytes: not sent as references to connection 1's chunks"
    );
    let counters = b.wait_for("the three connections done", |c| {
        count(c, "connections_completed") == 3
    })["counters"]
        .clone();
    assert_eq!(
        counters["misses_sent"].as_u64().unwrap(),
        0,
        "connection 2's references waited for chunks B did not read (took {took_2:?}): {}",
        b.log()
    );
    drop(a);
}

/// The receiving edge reads ahead of a slow target, but acknowledges bytes only once
/// the target's socket took them: when a target that ended its reply at once reads a
/// little and then resets, the sending edge must fail the connection, not complete
/// it on acknowledgements of bytes the target never got.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_read_ahead_are_acknowledged_only_once_written() {
    let dir = Scratch::new("ack-written");
    certs(dir.path(), &["a", "b"]);
    let (tunnel, fwd, target) = (addr(29, 17100), addr(29, 14100), addr(29, 15100));
    // The reply direction ends at once, then a megabyte is read slowly (the edge reads
    // ahead meanwhile), then the connection is reset.
    serve_by_id(
        TcpListener::bind(target).await.unwrap(),
        |_, mut c| async move {
            let _ = c.shutdown().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut buf = vec![0u8; 1 << 20];
            let _ = c.read_exact(&mut buf).await;
            let _ = c.set_zero_linger();
        },
    );
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[s("--tunnel-listen"), tunnel.to_string()],
        tunnel,
    );
    let a = EdgeProc::start(dir.path(), "a", &forward(fwd, tunnel, target), fwd);
    let sent = with_id(1, &random_bytes(40, 32 << 20));
    // The client may see a clean end of the reply and of its own sending (A read it
    // all) before the reset comes: what counts is how A ends the connection.
    let _ = tokio::time::timeout(Duration::from_secs(60), exchange(fwd, sent))
        .await
        .expect("the client's connection ends");
    let ended = a.wait_for("the connection ended at A", |c| {
        c["connections_failed"].as_u64().unwrap() + c["connections_completed"].as_u64().unwrap()
            == 1
    })["counters"]
        .clone();
    assert_eq!(
        ended["connections_failed"].as_u64().unwrap(),
        1,
        "A completed the connection though B's target reset after 1 MiB: {}",
        b.log()
    );
    drop(a);
}

/// `--allow-target` at the accepting edge: a forward to an allowed destination works;
/// one to a port outside the rule is refused before anything is relayed (the client
/// sees a reset, the accepting edge says why), and the target never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_outside_allow_target_are_refused() {
    let dir = Scratch::new("allow");
    certs(dir.path(), &["a", "b"]);
    let net = 25;
    let tunnel = addr(net, 17000);
    let (ok_fwd, ok_target) = (addr(net, 14000), addr(net, 15000));
    let (no_fwd, no_target) = (addr(net, 14001), addr(net, 15001));
    let ok_listener = TcpListener::bind(ok_target).await.unwrap();
    let no_listener = TcpListener::bind(no_target).await.unwrap();
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[
            s("--tunnel-listen"),
            tunnel.to_string(),
            s("--allow-target"),
            format!("127.0.{net}.0/24:15000"),
        ],
        tunnel,
    );
    let a_args = [
        forward(ok_fwd, tunnel, ok_target),
        forward(no_fwd, tunnel, no_target),
    ]
    .concat();
    let a = EdgeProc::start(dir.path(), "a", &a_args, ok_fwd);
    let server = tokio::spawn(async move {
        let (mut c, _) = ok_listener.accept().await.unwrap();
        let mut req = Vec::new();
        c.read_to_end(&mut req).await.unwrap();
        c.write_all(&req).await.unwrap();
    });
    let req = payload(7, 200_000);
    let mut c = TcpStream::connect(ok_fwd).await.unwrap();
    c.write_all(&req).await.unwrap();
    c.shutdown().await.unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    assert!(back == req, "allowed target: bytes differ");
    server.await.unwrap();

    // On a warm tunnel connection the refusal can be quick enough that the reset
    // reaches the client before its connect() returns: a reset either way.
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        let mut c = TcpStream::connect(no_fwd).await?;
        let mut sink = Vec::new();
        c.read_to_end(&mut sink).await?;
        Ok::<_, std::io::Error>(sink)
    })
    .await
    .unwrap();
    assert!(
        outcome.is_err(),
        "a refused target must reach the client as a reset: {outcome:?}"
    );
    b.wait_for("the refused tunnel", |c| {
        c["tunnels_rejected"].as_u64().unwrap() >= 1
    });
    assert!(
        b.log().contains("is not an allowed target here"),
        "edge B should say why:\n{}",
        b.log()
    );
    let unseen = tokio::time::timeout(Duration::from_millis(300), no_listener.accept()).await;
    assert!(unseen.is_err(), "the refused target was connected to");
    // The refused connection knew the peer from the first one and sent without
    // waiting for the reply: the refusal still reached its client, and A says why.
    let sa = a.wait_for("the refused connection", |c| {
        c["connections_failed"].as_u64().unwrap() >= 1
    });
    assert_eq!(sa["counters"]["opens_early"], 1, "{sa}");
    assert!(
        a.log().contains("cannot reach target"),
        "edge A should say why:\n{}",
        a.log()
    );
}

/// Sends one HTTP/1.1 request line to `addr` and returns the whole response.
async fn http(addr: std::net::SocketAddr, request: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// `--metrics-listen`: Prometheus text at /metrics with the same counters as the JSON
/// snapshot, and nothing else served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_are_served() {
    let metrics = addr(26, 19000);
    let ExchangePair {
        _dir,
        a,
        b: _b,
        fwd,
        mut received,
        ..
    } = exchange_pair(
        "metrics",
        26,
        reply_for,
        &[s("--metrics-listen"), metrics.to_string()],
        &[],
    )
    .await;
    let back = exchange(fwd, request_for(1)).await.unwrap();
    assert!(back == reply_for(1), "reply bytes differ");
    expect_requests(&mut received, 1..2, request_for).await;
    let st = a.wait_for("the connection", |c| {
        c["connections_completed"].as_u64().unwrap() >= 1
    });
    let lan_in = st["counters"]["lan_bytes_in"].as_u64().unwrap();
    assert!(lan_in > 0);
    let reply = http(metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(
        reply.contains("# TYPE shrinker_lan_bytes_in_total counter\n"),
        "{reply}"
    );
    assert!(
        reply.contains(&format!(
            "shrinker_lan_bytes_in_total{{edge=\"a\"}} {lan_in}\n"
        )),
        "{reply}"
    );
    assert!(
        reply.contains("shrinker_connections_completed_total{edge=\"a\"} 1\n"),
        "{reply}"
    );
    assert!(
        reply.contains("shrinker_peer_modelled_entries{edge=\"a\",peer=\"b\"} "),
        "{reply}"
    );
    let other = http(metrics, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    let post = http(metrics, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
}

/// With no send-ahead memory beyond each connection's own 256 KiB, connections that
/// refer to each other's chunks (32 at once, the same 4 MiB each, so most of them
/// wait at B for chunks a sibling carries) still all complete byte-exact: a
/// connection out of memory waits only for its own tunnel writes, never for a
/// sibling. And the bound is in force: connections did wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_sharing_chunks_complete_within_their_send_ahead_base() {
    let body = payload(40, 4 << 20);
    let request = move |id: u64| with_id(id, &body);
    let ExchangePair {
        _dir,
        a,
        b,
        fwd,
        mut received,
        ..
    } = exchange_pair(
        "send-ahead",
        31,
        |_| Vec::new(),
        &[s("--send-ahead-mem"), s("0")],
        &[],
    )
    .await;
    let mut tasks = Vec::new();
    for id in 0..32u64 {
        let data = request(id);
        tasks.push(tokio::spawn(async move {
            (id, exchange(fwd, data).await.expect("exchange"))
        }));
    }
    expect_replies(tasks, |_| Vec::new()).await;
    expect_requests(&mut received, 0..32, &request).await;
    let sa = a.wait_for("32 completed connections", |c| {
        c["connections_completed"] == 32
    });
    let ca = &sa["counters"];
    assert_eq!(ca["connections_failed"], 0, "{ca}");
    assert!(
        ca["send_ahead_waits"].as_u64().unwrap() > 0,
        "no connection waited for send-ahead memory: {ca}"
    );
    assert!(
        ca["refs_sent"].as_u64().unwrap() > 1000,
        "the connections did not refer to each other's chunks: {ca}"
    );
    assert_eq!(b.counter("connections_failed"), 0, "{}", b.log());
}

/// A connection whose content the peer already holds, in runs, encodes megabytes of
/// its stream into a few hundred bytes of FOLLOW / NEXT frames. With a window smaller
/// than what one batch stands for, the uplink used to wait for an ACK of bytes still
/// in its unsent batch (the stall this test catches: the second connection never
/// finished); now it sends what it holds before it waits, and cuts batches at 16 MiB
/// of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_smaller_than_a_batch_of_references_does_not_stall() {
    let ExchangePair {
        _dir,
        a,
        b,
        fwd,
        mut received,
        ..
    } = exchange_pair(
        "runs-window",
        33,
        |_| Vec::new(),
        &[s("--window"), s("1MiB")],
        &[],
    )
    .await;
    // Pages (4 KiB blocks of an unknown stream are cut by content, so whole random
    // buffers repeat as the same runs of chunks).
    let body = random_bytes(33, 24 << 20);
    for id in 0..2u64 {
        let data = with_id(id, &body);
        let back = tokio::time::timeout(Duration::from_secs(60), exchange(fwd, data))
            .await
            .expect("the connection finished in time")
            .expect("exchange");
        assert!(back.is_empty());
    }
    let request = |id| with_id(id, &body);
    expect_requests(&mut received, 0..2, request).await;
    let sa = a.wait_for("2 completed connections", |c| {
        c["connections_completed"] == 2
    });
    let ca = &sa["counters"];
    assert_eq!(ca["connections_failed"], 0, "{ca}");
    let (refs, runs) = (
        ca["refs_sent"].as_u64().unwrap(),
        ca["group_refs_sent"].as_u64().unwrap(),
    );
    assert!(refs > 4000, "the second copy went as references: {ca}");
    // A reference to a chunk that left moments ago (REF_RECENT) cannot be in a run:
    // runs follow only groups the peer acknowledged, and under load the first
    // connection's ACKs may come after the second began (CI: 464 of 4,596).
    let recent = ca["refs_recent_sent"].as_u64().unwrap();
    assert!(
        runs * 10 > (refs - recent) * 9,
        "most references that could went in runs: {ca}"
    );
    let sb = b.wait_for("runs resolved", |c| c["group_refs_resolved"] == runs);
    assert_eq!(sb["counters"]["misses_sent"], 0, "{}", b.log());
}

/// Resident memory of a live process, MiB.
fn resident_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib >> 10
}

#[test]
fn a_heap_touched_before_serving_stays_mapped() {
    let dir = Scratch::new("prefault");
    let start = |label: &str, prefault: &str| {
        let args = [
            "--tunnel-listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--prefault-mem",
            prefault,
        ]
        .map(s);
        EdgeProc::start_labelled(None, dir.path(), label, label, &args, addr(1, 0))
    };
    let touched = start("touched", "96MiB");
    assert!(
        touched.log().contains("touched 96 MiB of heap"),
        "{}",
        touched.log()
    );
    // Freed to malloc and still resident: glibc's trim threshold, raised by the
    // edge's re-execution, kept it.
    let rss = resident_mib(touched.child.id());
    assert!(rss >= 96, "{rss} MiB resident after touching 96 MiB");
    let plain = start("plain", "0");
    assert!(plain.log().contains("heap not touched"), "{}", plain.log());
    let rss = resident_mib(plain.child.id());
    assert!(rss < 48, "{rss} MiB resident with nothing touched");
}

/// A TCP relay to `to`. Once `true` is sent on the returned channel, every connection
/// it carries stops carrying bytes either way while both sides stay open and what
/// they send is read and dropped, ends included: a WAN path that silently drops
/// everything (a firewall that lost its state), with no reset for anyone to see.
fn blackhole_relay(
    listener: TcpListener,
    to: std::net::SocketAddr,
) -> tokio::sync::watch::Sender<bool> {
    let (hole, watch) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut near, _)) = listener.accept().await {
            let mut watch = watch.clone();
            tokio::spawn(async move {
                let mut far = TcpStream::connect(to).await.unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut near, &mut far) => return,
                    _ = watch.wait_for(|h| *h) => {}
                }
                // Nothing passes, not even one side's end: each side is read until
                // it ends by itself.
                let drain = |mut side: TcpStream| async move {
                    let mut sink = vec![0u8; 64 * 1024];
                    while matches!(side.read(&mut sink).await, Ok(n) if n > 0) {}
                };
                tokio::join!(drain(near), drain(far));
            });
        }
    });
    hole
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_path_fails_the_connection_and_heartbeats_keep_an_idle_one() {
    let dir = Scratch::new("silent-path");
    certs(dir.path(), &["a", "b"]);
    let net = 67;
    let (tunnel, hole, fwd, target) = (
        addr(net, 17000),
        addr(net, 17500),
        addr(net, 14000),
        addr(net, 15000),
    );
    // The target echoes; how each of its connections ended is reported.
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let echo = TcpListener::bind(target).await.unwrap();
    tokio::spawn(async move {
        while let Ok((c, _)) = echo.accept().await {
            let ended_tx = ended_tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = c.into_split();
                let _ = ended_tx.send(tokio::io::copy(&mut r, &mut w).await.map(|_| ()));
            });
        }
    });
    let timeout = [s("--wan-timeout"), s("2")];
    let b = EdgeProc::start(
        dir.path(),
        "b",
        &[&[s("--tunnel-listen"), tunnel.to_string()][..], &timeout].concat(),
        tunnel,
    );
    let blackhole = blackhole_relay(TcpListener::bind(hole).await.unwrap(), tunnel);
    let a = EdgeProc::start(
        dir.path(),
        "a",
        &[forward(fwd, hole, target), timeout.to_vec()].concat(),
        fwd,
    );
    let mut client = TcpStream::connect(fwd).await.unwrap();
    echoed(&mut client, b"before the pause").await;
    // Idle for three timeouts: the edges' heartbeats keep the connection alive.
    tokio::time::sleep(Duration::from_secs(6)).await;
    echoed(&mut client, b"after six idle seconds").await;
    assert_eq!(a.counter("connections_failed"), 0, "{}", a.log());
    // The path goes silent: both edges give the connection up within the timeout
    // and reset their local sides, instead of waiting for TCP's ~15 minutes.
    blackhole.send(true).unwrap();
    let since = Instant::now();
    client.write_all(b"into the void").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut rest))
        .await
        .expect("the client's connection ended within 20 s");
    assert!(read.is_err(), "a reset, not a clean end: {read:?} {rest:?}");
    let took = since.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "failed before the timeout: {took:?}"
    );
    let target_end = tokio::time::timeout(Duration::from_secs(20), ended.recv())
        .await
        .expect("the target's connection ended within 20 s")
        .unwrap();
    assert!(
        target_end.is_err(),
        "the target sees a reset too: {target_end:?}"
    );
    for (edge, name) in [(&a, "a"), (&b, "b")] {
        edge.wait_for("the failed connection", |c| c["connections_failed"] == 1);
        assert!(
            edge.log().contains("sent nothing for 2s"),
            "edge {name}: {}",
            edge.log()
        );
    }
}

/// Sends `msg` and expects it echoed back within 10 s.
async fn echoed(client: &mut TcpStream, msg: &[u8]) {
    client.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
        .await
        .expect("the echo came back in time")
        .expect("the echo came back");
    assert_eq!(got, msg);
}

/// A memory cgroup of this test's own, limited to `limit` bytes, under the cgroup this
/// process is in (v2 or v1); removed on drop. `None` where none can be made (not
/// root): the caller decides whether that may pass.
struct MemoryCgroup {
    dir: std::path::PathBuf,
}

impl MemoryCgroup {
    fn new(name: &str, limit: u64) -> Option<MemoryCgroup> {
        let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        for (base, v2) in proxy::allocator::cgroup_dirs(&groups) {
            let limit_file = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            let dir = std::path::Path::new(&base).join(format!("{name}-{}", std::process::id()));
            if std::fs::create_dir(&dir).is_ok() {
                if std::fs::write(dir.join(limit_file), limit.to_string()).is_ok() {
                    return Some(MemoryCgroup { dir });
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        None
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_memory_limit_below_the_prefault_does_not_kill_the_edge() {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    let Some(group) = MemoryCgroup::new("shrinker-prefault", 160 << 20) else {
        assert!(
            !root,
            "as root this test makes a memory cgroup, and could not"
        );
        eprintln!("SKIPPED: making a memory cgroup needs root");
        return;
    };
    let dir = Scratch::new("prefault-capped");
    let log = dir.path().join("capped.log");
    // The edge joins the group before it starts: a container limited to 160 MiB.
    /// Killed on drop, so a failed assertion leaves no edge behind (nor the group busy).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {BIN} edge --name capped --tunnel-listen 127.0.0.1:0 --insecure-plaintext --prefault-mem 1GiB",
            group.dir.display()
        ))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Killed)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("edge started") {
            break text;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the edge died at start-up ({status}): {text}");
        }
        assert!(Instant::now() < deadline, "not started: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Half the room the limit leaves, in whole 8 MiB pieces: at most 80 MiB.
    let mib: u64 = text
        .split("touched ")
        .nth(1)
        .and_then(|t| t.split(" MiB").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prefault reported: {text}"));
    assert!(
        (8..=80).contains(&mib),
        "touched {mib} MiB under a 160 MiB limit"
    );
    // Killed here, before the group it is in is removed.
    drop(child);
}
