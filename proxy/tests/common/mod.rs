//! Test harness: real `shrinker edge` processes on loopback, plus in-test targets.
//!
//! Each test uses its own loopback address 127.0.N.1 (N unique per test) and fixed
//! ports below the ephemeral range, so tests run in parallel without port races and
//! outbound connects can never take a listening port.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_shrinker");

/// A per-test scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("shrinker-test-{}-{}", name, std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// Files above this size (disk images, guest RAM, stream captures) are removed even
/// when a test fails: the logs and stats beside them are what a failure is read from,
/// and a failing run must not fill the disk the tests after it need.
const KEPT_ON_FAILURE_MAX: u64 = 1 << 20;

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for entry in entries.flatten() {
            let big = entry
                .metadata()
                .map(|m| m.is_file() && m.len() > KEPT_ON_FAILURE_MAX)
                .unwrap_or(false);
            if big {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        eprintln!(
            "test failed: its logs are kept in {} (files over 1 MiB removed)",
            self.0.display()
        );
    }
}

/// Runs `shrinker certs`.
pub fn certs(dir: &Path, names: &[&str]) {
    let out = Command::new(BIN)
        .arg("certs")
        .arg("--out")
        .arg(dir)
        .args(names)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running edge process, killed on drop; its log is kept in a file.
pub struct EdgeProc {
    pub child: Child,
    pub log: PathBuf,
    pub stats: PathBuf,
}

impl EdgeProc {
    /// Starts `shrinker edge` with TLS files `dir/{ca,name}.crt` and extra args, and waits
    /// until `ready` accepts connections.
    pub fn start(dir: &Path, name: &str, args: &[String], ready: SocketAddr) -> EdgeProc {
        EdgeProc::start_in(None, dir, name, args, ready)
    }

    /// [`EdgeProc::start`] inside network namespace `netns`.
    pub fn start_in(
        netns: Option<&str>,
        dir: &Path,
        name: &str,
        args: &[String],
        ready: SocketAddr,
    ) -> EdgeProc {
        EdgeProc::start_labelled(netns, dir, name, name, args, ready)
    }

    /// [`EdgeProc::start_in`] for an edge announcing `name` whose log and stats files
    /// are named after `label` (two edges may announce one name).
    pub fn start_labelled(
        netns: Option<&str>,
        dir: &Path,
        label: &str,
        name: &str,
        args: &[String],
        ready: SocketAddr,
    ) -> EdgeProc {
        let log = dir.join(format!("{label}.log"));
        let stats = dir.join(format!("{label}.stats.json"));
        let mut cmd = match netns {
            // `ip netns exec` execs the program: the child is the edge itself.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("edge")
            .arg("--name")
            .arg(name)
            .arg("--stats-json")
            .arg(&stats)
            .arg("--stats-interval")
            .arg("0.1")
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if !args
            .iter()
            .any(|a| a == "--insecure-plaintext" || a == "--tls-ca")
        {
            cmd.arg("--tls-ca")
                .arg(dir.join("ca.crt"))
                .arg("--tls-cert")
                .arg(dir.join(format!("{name}.crt")))
                .arg("--tls-key")
                .arg(dir.join(format!("{name}.key")));
        }
        let mut child = cmd.spawn().unwrap();
        // Ready once it logs that it started (its listeners are bound by then). A probe
        // connection would show up in the edge's counters.
        let _ = ready;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains("edge started")) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "edge {name} exited early ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "edge {name} not ready on {ready}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        EdgeProc { child, log, stats }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The latest stats snapshot.
    pub fn stats(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.stats) {
                if let Ok(v) = serde_json::from_str(&text) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no stats snapshot at {}",
                self.stats.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.stats()["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Waits until `pred(counters)` holds (stats are rewritten every 100 ms).
    pub fn wait_for(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for_within(what, Duration::from_secs(20), pred)
    }

    /// `wait_for` with a chosen timeout (for waits on QEMU, slow under a loaded CI).
    pub fn wait_for_within(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats();
            if pred(&s["counters"]) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait for a graceful exit.
    pub fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "edge did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.log()
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EdgeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn addr(net: u8, port: u16) -> SocketAddr {
    format!("127.0.{net}.1:{port}").parse().unwrap()
}

/// Deterministic test data with repeated content across connections.
pub fn payload(seed: u64, len: u64) -> Vec<u8> {
    testkit::Workload::cluster(77, 8 << 20)
        .stream(seed, len)
        .collect_all()
}

/// A target that, for each connection, reads an 8-byte id, then concurrently writes
/// `reply(id)` (then half-closes) while hashing everything it receives; it reports
/// `(id, bytes received, blake3 of them)` on the returned channel.
pub async fn serve_exchange(
    listener: TcpListener,
    reply: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<(u64, u64, blake3::Hash)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reply = std::sync::Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (tx, reply) = (tx.clone(), reply.clone());
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut idb = [0u8; 8];
                if r.read_exact(&mut idb).await.is_err() {
                    return;
                }
                let id = u64::from_le_bytes(idb);
                let writer = tokio::spawn(async move {
                    let data = reply(id);
                    let _ = w.write_all(&data).await;
                    let _ = w.shutdown().await;
                });
                let mut h = blake3::Hasher::new();
                h.update(&idb);
                let mut buf = vec![0u8; 64 * 1024];
                let mut n = 8u64;
                while let Ok(k) = r.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    h.update(&buf[..k]);
                    n += k as u64;
                }
                let _ = writer.await;
                let _ = tx.send((id, n, h.finalize()));
            });
        }
    });
    rx
}

/// `id` as 8 bytes followed by `body`.
pub fn with_id(id: u64, body: &[u8]) -> Vec<u8> {
    let mut v = id.to_le_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// Connects, sends `data` while reading everything back; returns what came back.
pub async fn exchange(to: SocketAddr, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(to).await?;
    let (mut r, mut w) = s.into_split();
    let sender = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    sender.await.unwrap()?;
    Ok(back)
}
#[allow(dead_code)]
pub mod qemu;
