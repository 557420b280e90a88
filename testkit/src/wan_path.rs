//! A WAN path at the packet level, between two network namespaces: every IP packet
//! from one side to the other crosses a bottleneck link (a rate, with a router's
//! queue in front of it that drops what overflows) and a one-way propagation delay,
//! in a third namespace in the middle.
//!
//! The benchmarks' userspace shaper relays TCP *connections*: each hop is its own
//! loopback TCP connection, so the hosts' TCP never sees the path's round-trip time.
//! Slow start, the congestion window, the kernel's socket-buffer limits (a window
//! can carry at most `tcp_wmem`/`tcp_rmem` max per round trip), losses and their
//! recovery are all invisible to it. Here the hosts' own TCP runs end to end across
//! the delay, as it does between two datacenters. (`tc netem` would do this in the
//! kernel, but this kernel has no netem.)
//!
//! ```text
//!   west ns                 middle ns                         east ns
//!   {p}w0 10.N.1.1 ── {p}w1 ─┐   rule iif {p}w1 → {p}te ─┐
//!                            │   (TUN: read, queue, delay,│
//!                            │    write back) → main table├─ {p}e1 ── {p}e0 10.N.2.1
//!                            └── {p}tw ← rule iif {p}e1 ──┘
//! ```
//!
//! Packets arriving from the west veth are routed into the TUN device `{p}te` by a
//! policy rule; this process reads each one, holds it until the link would have
//! delivered it, and writes it back into the same device, where the middle
//! namespace's main table forwards it east. The other direction uses `{p}tw`. Each
//! direction is one full-duplex half: its own rate, queue and delay.
//!
//! Needs root (namespaces, TUN devices). Everything lives in namespaces the path
//! creates and deletes: no address outside them is ever used.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::Rng;

/// The link each direction of the path emulates.
#[derive(Clone, Debug)]
pub struct LinkSpec {
    /// One-way propagation delay (the round-trip time is twice this).
    pub delay: Duration,
    /// Bottleneck rate in bits per second; 0: no rate limit, only the delay.
    pub rate_bps: u64,
    /// The router's queue in front of the bottleneck, as the longest a packet may
    /// wait in it: a packet that would wait longer is dropped (tail drop).
    pub queue: Duration,
    /// Share of packets lost at random on the way (0.0 to 1.0), besides queue drops.
    pub loss: f64,
    /// MTU of every interface on the path.
    pub mtu: u16,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            delay: Duration::from_millis(10),
            rate_bps: 0,
            queue: Duration::from_millis(50),
            loss: 0.0,
            mtu: 1500,
        }
    }
}

/// What one direction of the path did.
#[derive(Debug, Default)]
pub struct DirectionCounters {
    /// Packets delivered to the far side.
    pub packets: AtomicU64,
    /// Bytes (IP packets, headers included) delivered.
    pub bytes: AtomicU64,
    /// Packets dropped because the queue was full.
    pub queue_drops: AtomicU64,
    /// Packets dropped at random (`LinkSpec::loss`).
    pub random_drops: AtomicU64,
}

/// Errors setting the path up.
#[derive(Debug)]
pub enum PathError {
    /// A set-up command failed (its arguments and output).
    Command(String),
    /// A TUN device or namespace could not be opened.
    Io(String, std::io::Error),
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::Command(c) => write!(f, "setting up the WAN path: {c}"),
            PathError::Io(what, e) => write!(
                f,
                "setting up the WAN path: {what}: {e} (it needs root and /dev/net/tun)"
            ),
        }
    }
}

impl std::error::Error for PathError {}

/// The path: three namespaces, their links and the threads that move packets.
/// Dropping it deletes the namespaces (and with them the devices; the threads end).
pub struct WanPath {
    /// Namespace of the west host.
    pub west_ns: String,
    /// Namespace of the east host.
    pub east_ns: String,
    /// The middle namespace (the link).
    pub middle_ns: String,
    /// The west host's address.
    pub west: Ipv4Addr,
    /// The east host's address.
    pub east: Ipv4Addr,
    /// West to east.
    pub eastbound: Arc<DirectionCounters>,
    /// East to west.
    pub westbound: Arc<DirectionCounters>,
}

/// Runs a set-up command that must succeed.
fn run(args: &[&str]) -> Result<(), PathError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PathError::Io(format!("cannot run {}", args[0]), e))?;
    if !out.status.success() {
        return Err(PathError::Command(format!(
            "{} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

impl WanPath {
    /// Makes the path. `tag` (at most 8 characters) names its namespaces and devices,
    /// `net` picks its addresses (10.`net`.1.0/24 west, 10.`net`.2.0/24 east): paths
    /// alive at once need different tags and nets.
    ///
    /// # Errors
    /// When a namespace, link or TUN device cannot be made (not root, no TUN).
    pub fn create(tag: &str, net: u8, link: &LinkSpec) -> Result<WanPath, PathError> {
        assert!(
            tag.len() <= 8,
            "tag {tag:?}: interface names allow 15 bytes"
        );
        let (west_ns, middle_ns, east_ns) =
            (format!("{tag}-w"), format!("{tag}-m"), format!("{tag}-e"));
        let path = WanPath {
            west_ns,
            east_ns,
            middle_ns,
            west: Ipv4Addr::new(10, net, 1, 1),
            east: Ipv4Addr::new(10, net, 2, 1),
            eastbound: Arc::default(),
            westbound: Arc::default(),
        };
        // From here on, dropping `path` removes whatever was made.
        for ns in [&path.west_ns, &path.middle_ns, &path.east_ns] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let mtu = link.mtu.to_string();
        let (w0, w1, e0, e1) = (
            format!("{tag}w0"),
            format!("{tag}w1"),
            format!("{tag}e0"),
            format!("{tag}e1"),
        );
        let (m, w, e) = (&path.middle_ns, &path.west_ns, &path.east_ns);
        for (host_if, host_ns, mid_if) in [(&w0, w, &w1), (&e0, e, &e1)] {
            run(&[
                "ip", "link", "add", host_if, "netns", host_ns, "mtu", &mtu, "type", "veth",
                "peer", "name", mid_if, "netns", m, "mtu", &mtu,
            ])?;
            run(&["ip", "-n", host_ns, "link", "set", host_if, "up"])?;
            run(&["ip", "-n", m, "link", "set", mid_if, "up"])?;
        }
        let addr = |side: u8, host: u8| format!("10.{net}.{side}.{host}/24");
        run(&["ip", "-n", w, "addr", "add", &addr(1, 1), "dev", &w0])?;
        run(&["ip", "-n", m, "addr", "add", &addr(1, 2), "dev", &w1])?;
        run(&["ip", "-n", e, "addr", "add", &addr(2, 1), "dev", &e0])?;
        run(&["ip", "-n", m, "addr", "add", &addr(2, 2), "dev", &e1])?;
        for (host, side) in [(w, 1), (e, 2)] {
            let gateway = format!("10.{net}.{side}.2");
            run(&["ip", "-n", host, "route", "add", "default", "via", &gateway])?;
        }
        for sysctl in [
            "net.ipv4.ip_forward=1",
            // Packets come back from the TUN devices with addresses routed via the
            // veths: not a spoof here.
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            run(&["ip", "netns", "exec", m, "sysctl", "-qw", sysctl])?;
        }
        let (te, tw) = (format!("{tag}te"), format!("{tag}tw"));
        let devices = open_tuns(m, [&te, &tw], link.mtu)?;
        for (tun, from, table) in [(&te, &w1, "101"), (&tw, &e1, "102")] {
            run(&["ip", "-n", m, "link", "set", tun, "up"])?;
            run(&[
                "ip",
                "netns",
                "exec",
                m,
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{tun}.rp_filter=0"),
            ])?;
            run(&[
                "ip", "-n", m, "route", "add", "default", "dev", tun, "table", table,
            ])?;
            run(&["ip", "-n", m, "rule", "add", "iif", from, "lookup", table])?;
        }
        let [east_dev, west_dev] = devices;
        spawn_direction(east_dev, link.clone(), path.eastbound.clone(), 1, "e");
        spawn_direction(west_dev, link.clone(), path.westbound.clone(), 2, "w");
        Ok(path)
    }

    /// Sets `setting` (`KEY=VALUE`, as `sysctl -w` takes it) on both hosts: the
    /// network sysctls are per namespace, so this tunes the two hosts alone.
    ///
    /// # Errors
    /// When `sysctl` rejects it.
    pub fn host_sysctl(&self, setting: &str) -> Result<(), PathError> {
        for ns in [&self.west_ns, &self.east_ns] {
            run(&["ip", "netns", "exec", ns, "sysctl", "-qw", setting])?;
        }
        Ok(())
    }

    /// Adds `options` (as `ip route` takes them, e.g. `initcwnd 64 initrwnd 64`) to
    /// both hosts' route across the path.
    ///
    /// # Errors
    /// When `ip route` rejects them.
    pub fn host_route_options(&self, options: &str) -> Result<(), PathError> {
        for (ns, gw) in [(&self.west_ns, self.west), (&self.east_ns, self.east)] {
            let [a, b, c, _] = gw.octets();
            let gw = Ipv4Addr::new(a, b, c, 2).to_string();
            let mut args = vec!["ip", "-n", ns, "route", "change", "default", "via", &gw];
            args.extend(options.split_whitespace());
            run(&args)?;
        }
        Ok(())
    }

    /// CPU seconds (user + system) the threads moving packets used so far: the link's
    /// cost, on the machine's cores like everything else. (Writing a packet back also
    /// runs the far host's receive processing in the kernel on that thread.)
    pub fn cpu_secs(&self) -> f64 {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return 0.0;
        };
        let ticks = 100.0; // USER_HZ on Linux
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            .filter_map(|stat| {
                // "tid (comm) state ...": utime and stime are the 12th and 13th
                // fields after the parenthesis.
                let (head, rest) = stat.rsplit_once(')')?;
                if !head.contains(&format!("({THREAD_PREFIX}")) {
                    return None;
                }
                let f: Vec<&str> = rest.split_whitespace().collect();
                let (u, s) = (
                    f.get(11)?.parse::<f64>().ok()?,
                    f.get(12)?.parse::<f64>().ok()?,
                );
                Some((u + s) / ticks)
            })
            .sum()
    }
}

impl Drop for WanPath {
    fn drop(&mut self) {
        for ns in [&self.west_ns, &self.middle_ns, &self.east_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Whether a test that needs root (`what` it is and needs) can run here: as root it
/// must; otherwise only an explicit SHRINKER_SKIP_NETNS=1 lets it pass without
/// running, so that a suite run without root cannot pass it silently.
///
/// # Panics
/// When not root and SHRINKER_SKIP_NETNS is not set.
pub fn needs_root(what: &str) -> bool {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        return true;
    }
    if std::env::var_os("SHRINKER_SKIP_NETNS").is_some() {
        eprintln!("SKIPPED: {what} needs root (SHRINKER_SKIP_NETNS is set)");
        return false;
    }
    panic!("{what} needs root: run the suite as root, or set SHRINKER_SKIP_NETNS=1 to skip it");
}

/// Runs `f` on a thread that entered network namespace `ns` (only that thread: a
/// namespace is per thread) and returns what it returns. Sockets and devices made
/// there stay in `ns` and work from any thread: a test binds a listener on the east
/// host and connects from the west host this way, in one process.
///
/// # Errors
/// When `ns` cannot be entered (it does not exist, not root).
pub fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PathError> {
    let ns_file = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&ns_file).map_err(|e| PathError::Io(ns_file.clone(), e))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| PathError::Io(format!("entering {ns_file}"), e.into()))?;
        Ok(f())
    })
    .join()
    .expect("a function run in a namespace does not panic")
}

/// Opens the TUN devices `names` inside namespace `ns`: a thread enters it (only that
/// thread: namespaces are per thread), creates them and leaves; the open devices work
/// from any thread.
fn open_tuns(ns: &str, names: [&str; 2], mtu: u16) -> Result<[tun::Device; 2], PathError> {
    let names = names.map(str::to_owned);
    in_namespace(ns, move || {
        let open = |name: &str| {
            let mut config = tun::Configuration::default();
            config.tun_name(name).mtu(mtu);
            tun::create(&config).map_err(|e| {
                PathError::Io(
                    format!("creating TUN device {name}"),
                    std::io::Error::other(e.to_string()),
                )
            })
        };
        Ok([open(&names[0])?, open(&names[1])?])
    })?
}

/// One direction: a reader thread takes each packet the kernel routes into `dev`,
/// decides when the link delivers it (or drops it), and a writer thread writes it
/// back at that time. Both end when the device goes away (its namespace deleted).
/// Names of the threads moving packets start with this (see [`WanPath::cpu_secs`]).
const THREAD_PREFIX: &str = "wanpath-";

fn spawn_direction(
    dev: tun::Device,
    link: LinkSpec,
    counters: Arc<DirectionCounters>,
    seed: u64,
    toward: &str,
) {
    let dev = Arc::new(dev);
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader = dev.clone();
    let c = counters.clone();
    let named = |role: &str| thread::Builder::new().name(format!("{THREAD_PREFIX}{toward}{role}"));
    let spawned = named("r").spawn(move || {
        let mut link_state = Bottleneck::new(&link, seed);
        let mut buf = vec![0u8; usize::from(link.mtu) + 64];
        while let Ok(n) = reader.recv(&mut buf) {
            match link_state.admit(n, Instant::now()) {
                Admit::Deliver(at) => {
                    if tx.send((at, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Admit::QueueFull => {
                    c.queue_drops.fetch_add(1, Relaxed);
                }
                Admit::Lost => {
                    c.random_drops.fetch_add(1, Relaxed);
                }
            }
        }
    });
    let writer = named("w").spawn(move || {
        while let Ok((at, packet)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                thread::sleep(at - now);
            }
            if dev.send(&packet).is_err() {
                return;
            }
            counters.packets.fetch_add(1, Relaxed);
            counters.bytes.fetch_add(packet.len() as u64, Relaxed);
        }
    });
    spawned.and(writer).expect("the WAN path's threads start");
}

/// What the link does with one packet.
#[derive(Debug, PartialEq)]
enum Admit {
    /// Delivered to the far side at this time.
    Deliver(Instant),
    /// Dropped: the queue in front of the bottleneck is full.
    QueueFull,
    /// Dropped at random.
    Lost,
}

/// The bottleneck and its queue: a packet starts on the wire when the wire is free
/// (after those queued before it), takes its size over the rate to serialise, and
/// arrives the propagation delay later.
struct Bottleneck {
    delay: Duration,
    /// Seconds per byte; 0 for no rate limit.
    per_byte: f64,
    queue: Duration,
    loss: f64,
    rng: Rng,
    /// When the wire finishes the packets admitted so far.
    wire_free: Option<Instant>,
    /// Delivery times of packets admitted (to keep deliveries in order).
    last_delivery: Option<Instant>,
}

impl Bottleneck {
    fn new(link: &LinkSpec, seed: u64) -> Self {
        Bottleneck {
            delay: link.delay,
            per_byte: if link.rate_bps == 0 {
                0.0
            } else {
                8.0 / link.rate_bps as f64
            },
            queue: link.queue,
            loss: link.loss,
            rng: Rng::new(seed),
            wire_free: None,
            last_delivery: None,
        }
    }

    fn admit(&mut self, len: usize, now: Instant) -> Admit {
        if self.loss > 0.0 {
            let draw = (self.rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            if draw < self.loss {
                return Admit::Lost;
            }
        }
        let start = self.wire_free.map_or(now, |free| free.max(now));
        if start.duration_since(now) > self.queue {
            return Admit::QueueFull;
        }
        let done = start + Duration::from_secs_f64(len as f64 * self.per_byte);
        self.wire_free = Some(done);
        let at = done + self.delay;
        let at = self.last_delivery.map_or(at, |last| at.max(last));
        self.last_delivery = Some(at);
        Admit::Deliver(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(rate_bps: u64) -> LinkSpec {
        LinkSpec {
            delay: Duration::from_millis(10),
            rate_bps,
            queue: Duration::from_millis(5),
            loss: 0.0,
            mtu: 1500,
        }
    }

    #[test]
    fn an_idle_link_delivers_after_serialisation_and_delay() {
        let mut b = Bottleneck::new(&link(8_000_000), 1); // 1 byte per µs
        let t0 = Instant::now();
        assert_eq!(
            b.admit(1000, t0),
            Admit::Deliver(t0 + Duration::from_micros(1000) + Duration::from_millis(10))
        );
    }

    #[test]
    fn a_burst_queues_behind_itself_then_overflows() {
        let mut b = Bottleneck::new(&link(8_000_000), 1);
        let t0 = Instant::now();
        let mut delivered = Vec::new();
        // The queue holds 5 ms: packets that start on the wire 0-5 ms after they
        // arrive pass.
        for _ in 0..6 {
            match b.admit(1000, t0) {
                Admit::Deliver(at) => delivered.push(at),
                other => panic!("{other:?}"),
            }
        }
        // Back to back at the rate: one every 1 ms.
        for w in delivered.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_millis(1));
        }
        // The next would wait 6 ms: dropped.
        assert_eq!(b.admit(1000, t0), Admit::QueueFull);
        // Once the wire caught up, packets go again.
        assert!(matches!(
            b.admit(1000, t0 + Duration::from_millis(9)),
            Admit::Deliver(_)
        ));
    }

    #[test]
    fn loss_drops_about_the_share_asked() {
        let mut l = link(0);
        l.loss = 0.1;
        let mut b = Bottleneck::new(&l, 7);
        let t0 = Instant::now();
        let lost = (0..10_000)
            .filter(|_| b.admit(100, t0) == Admit::Lost)
            .count();
        assert!((800..1200).contains(&lost), "{lost} of 10000 lost");
    }

    #[test]
    fn no_rate_limit_is_only_the_delay() {
        let mut b = Bottleneck::new(&link(0), 1);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(
                b.admit(1500, t0),
                Admit::Deliver(t0 + Duration::from_millis(10))
            );
        }
    }
}
