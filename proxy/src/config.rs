//! Edge configuration: every setting works as a command-line flag and as a key in a
//! TOML file (`--config`); flags override the file; unknown keys are rejected; the
//! result is validated before anything binds a socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use wire::session::CompressMode;

use crate::allow::AllowTarget;
use crate::size::ByteSize;

/// One forward rule: accept on `listen`, carry each connection through the peer edge at
/// `peer`, which connects to `target`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// Local address to accept hypervisor connections on.
    pub listen: SocketAddr,
    /// The peer edge's tunnel address (`host:port`).
    pub peer: String,
    /// Where the peer edge connects (`host:port`, resolved at the peer's site).
    pub target: String,
}

impl FromStr for Forward {
    type Err = String;

    /// Parses `LISTEN=PEER=TARGET`, e.g. `0.0.0.0:4444=edge-b.example:7700=10.1.0.5:4444`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('=').collect();
        let [listen, peer, target] = parts[..] else {
            return Err(format!(
                "invalid forward {s:?}: expected LISTEN=PEER=TARGET, e.g. 0.0.0.0:4444=198.51.100.7:7700=10.1.0.5:4444"
            ));
        };
        let listen = listen.parse().map_err(|_| {
            format!("invalid forward {s:?}: LISTEN {listen:?} is not an IP:port address")
        })?;
        for (what, v) in [("PEER", peer), ("TARGET", target)] {
            check_host_port(v).map_err(|e| format!("invalid forward {s:?}: {what} {e}"))?;
        }
        Ok(Forward {
            listen,
            peer: peer.to_string(),
            target: target.to_string(),
        })
    }
}

/// One transparent listener: accept connections diverted to `listen` by the kernel
/// (iptables/nftables TPROXY, or NAT REDIRECT), and carry each through the peer edge at
/// `peer`, which connects to the connection's original destination.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transparent {
    /// Local address the TPROXY (or REDIRECT) rule sends intercepted connections to.
    pub listen: SocketAddr,
    /// The peer edge's tunnel address (`host:port`).
    pub peer: String,
}

impl FromStr for Transparent {
    type Err = String;

    /// Parses `LISTEN=PEER`, e.g. `0.0.0.0:15001=edge-b.example:7700`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('=').collect();
        let [listen, peer] = parts[..] else {
            return Err(format!(
                "invalid transparent listener {s:?}: expected LISTEN=PEER, e.g. 0.0.0.0:15001=198.51.100.7:7700"
            ));
        };
        let listen = listen.parse().map_err(|_| {
            format!(
                "invalid transparent listener {s:?}: LISTEN {listen:?} is not an IP:port address"
            )
        })?;
        check_host_port(peer)
            .map_err(|e| format!("invalid transparent listener {s:?}: PEER {e}"))?;
        Ok(Transparent {
            listen,
            peer: peer.to_string(),
        })
    }
}

fn check_host_port(v: &str) -> Result<(), String> {
    let Some((host, port)) = v.rsplit_once(':') else {
        return Err(format!("{v:?} has no :port"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{v:?} is not host:port"));
    }
    Ok(())
}

/// Flags of `shrinker edge` (all optional: they override the config file).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EdgeArgs {
    /// TOML file with any of these settings (keys as the flags, with `_` for `-`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This edge's name, sent to peers (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Where peer edges connect (e.g. 0.0.0.0:7700).
    #[arg(long, value_name = "ADDR")]
    pub tunnel_listen: Option<SocketAddr>,
    /// LISTEN=PEER=TARGET: accept on LISTEN, carry through the peer edge at PEER, which
    /// connects to TARGET. Repeatable.
    #[arg(long = "forward", value_name = "LISTEN=PEER=TARGET")]
    pub forwards: Vec<Forward>,
    /// LISTEN=PEER: accept connections that an iptables/nftables TPROXY rule (or a NAT
    /// REDIRECT) diverts to LISTEN, and carry each through the peer edge at PEER, which
    /// connects to the connection's original destination. Needs CAP_NET_ADMIN.
    /// Repeatable.
    #[arg(long = "transparent", value_name = "LISTEN=PEER")]
    pub transparent: Vec<Transparent>,
    /// NET[/LEN][:PORT[-PORT]]: the only destinations peer edges may make this edge
    /// connect to (e.g. 10.2.0.0/16:4444-4450). Repeatable; none given: any.
    #[arg(long = "allow-target", value_name = "NET[:PORTS]")]
    pub allow_targets: Vec<AllowTarget>,
    /// The deployment's private CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This edge's certificate (PEM), issued by the CA.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This edge's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Run the WAN tunnel without TLS (lab use only: anyone on the path can read and
    /// inject data).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Memory for the shared chunk store (e.g. 2GiB).
    #[arg(long, value_name = "SIZE")]
    pub cache_mem: Option<ByteSize>,
    /// Memory for chunks this edge sent, kept as bases for near-duplicate deltas
    /// (e.g. 1GiB; 0 turns deltas off).
    #[arg(long, value_name = "SIZE")]
    pub delta_mem: Option<ByteSize>,
    /// Memory for runs of block ids this edge sent (groups), so a run the peer saw
    /// before crosses as one reference and a byte per block instead of 33 bytes per
    /// block (e.g. 256MiB; about 1/32 of the referenced content it covers; 0: off).
    #[arg(long, value_name = "SIZE")]
    pub group_mem: Option<ByteSize>,
    /// Memory for context-keeping compression streams, 8 MiB of history each, granted
    /// to connections while the link is the bottleneck (e.g. 256MiB; 0: every batch
    /// is compressed on its own). The peer edge keeps the same history to decode.
    #[arg(long, value_name = "SIZE")]
    pub stream_mem: Option<ByteSize>,
    /// Memory for reading tunnels ahead of local sockets that are slow to take what
    /// arrives, beyond 256 KiB per connection (e.g. 64MiB; 0: none). Chunks further on
    /// may be what a sibling connection waits for (QEMU's multifd channels).
    #[arg(long, value_name = "SIZE")]
    pub read_ahead_mem: Option<ByteSize>,
    /// Memory for local data read ahead of the tunnel (read, not yet written to the
    /// peer), beyond 256 KiB per connection (e.g. 64MiB; 0: each connection its 256 KiB
    /// alone). Bounds the sending edge's memory however many connections send at once.
    #[arg(long, value_name = "SIZE")]
    pub send_ahead_mem: Option<ByteSize>,
    /// Heap to touch before serving (e.g. 1GiB; 0: none), at most the memory
    /// budgets above together: the stores then fill memory already mapped instead of
    /// faulting it in page by page during the first migrations after start-up. Costs
    /// about 0.4 s of start-up per GiB, and is resident from the start; never more
    /// than half the memory the machine or this edge's cgroup limit leaves.
    #[arg(long, value_name = "SIZE")]
    pub prefault_mem: Option<ByteSize>,
    /// Most unacknowledged bytes per connection in flight to the peer (bounds memory
    /// kept to answer misses; must cover bandwidth x RTT).
    #[arg(long, value_name = "SIZE")]
    pub window: Option<ByteSize>,
    /// Compression of literals and new chunks on the WAN: off, auto (when the link is
    /// the bottleneck and it pays) or always.
    #[arg(long, value_name = "MODE")]
    pub compress: Option<CompressMode>,
    /// Write a JSON counters snapshot here, periodically and at exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds between stats snapshots.
    #[arg(long, value_name = "SECS")]
    pub stats_interval: Option<f64>,
    /// Seconds allowed for connecting (TCP + TLS + handshake) to a peer or target.
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<f64>,
    /// Seconds a tunnel connection may hear nothing from the peer edge while it
    /// listens before it fails (both local sides reset): a WAN path that silently
    /// drops everything fails a migration instead of hanging it. Edges send a
    /// heartbeat at least every 5 s (a quarter of this, if less); give both edges
    /// the same value.
    #[arg(long, value_name = "SECS")]
    pub wan_timeout: Option<f64>,
    /// Most concurrent proxied connections (further accepts wait).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
}

/// The TOML file form of [`EdgeArgs`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeFile {
    name: Option<String>,
    tunnel_listen: Option<SocketAddr>,
    #[serde(default)]
    forward: Vec<ForwardEntry>,
    #[serde(default)]
    transparent: Vec<TransparentEntry>,
    #[serde(default)]
    allow_target: Vec<AllowTarget>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure_plaintext: Option<bool>,
    cache_mem: Option<ByteSize>,
    delta_mem: Option<ByteSize>,
    group_mem: Option<ByteSize>,
    stream_mem: Option<ByteSize>,
    read_ahead_mem: Option<ByteSize>,
    send_ahead_mem: Option<ByteSize>,
    prefault_mem: Option<ByteSize>,
    window: Option<ByteSize>,
    compress: Option<String>,
    stats_json: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    stats_interval: Option<f64>,
    connect_timeout: Option<f64>,
    wan_timeout: Option<f64>,
    max_connections: Option<usize>,
}

/// A forward in the file: either `"LISTEN=PEER=TARGET"` or a table.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum ForwardEntry {
    Short(String),
    Table(Forward),
}

/// A transparent listener in the file: either `"LISTEN=PEER"` or a table.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum TransparentEntry {
    Short(String),
    Table(Transparent),
}

/// TLS file paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// CA certificate.
    pub ca: PathBuf,
    /// Edge certificate.
    pub cert: PathBuf,
    /// Edge key.
    pub key: PathBuf,
}

/// A complete, validated edge configuration.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// This edge's name.
    pub name: String,
    /// Tunnel listener, if this edge accepts peers.
    pub tunnel_listen: Option<SocketAddr>,
    /// Forward rules.
    pub forwards: Vec<Forward>,
    /// Transparent (TPROXY) listeners.
    pub transparent: Vec<Transparent>,
    /// Destinations peers may ask for (empty: any).
    pub allow_targets: Vec<AllowTarget>,
    /// TLS files, or `None` for plaintext.
    pub tls: Option<TlsPaths>,
    /// Store size in bytes.
    pub cache_bytes: u64,
    /// Memory for delta bases in bytes (0: no deltas).
    pub delta_bytes: u64,
    /// Memory for groups of block ids sent, in bytes (0: references one by one).
    pub group_bytes: u64,
    /// Memory for compression streams in bytes (0: none).
    pub stream_bytes: u64,
    /// Memory for reading tunnels ahead of slow local sockets, beyond each
    /// connection's own 256 KiB.
    pub read_ahead_bytes: u64,
    /// Memory for local data read ahead of the tunnel, beyond each connection's own
    /// 256 KiB.
    pub send_ahead_bytes: u64,
    /// Heap touched before serving, in bytes (0: none; see `allocator::prefault_heap`).
    pub prefault_bytes: u64,
    /// Flow-control window per connection direction.
    pub window: u64,
    /// Compression mode.
    pub compress: CompressMode,
    /// Stats snapshot file.
    pub stats_json: Option<PathBuf>,
    /// Prometheus metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Stats period.
    pub stats_interval: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Longest silence from the peer edge on a tunnel connection that listens.
    pub wan_timeout: Duration,
    /// Connection limit.
    pub max_connections: usize,
}

/// Default store size: large enough for the shared pages of a small cluster.
pub const DEFAULT_CACHE: u64 = 1 << 30;
/// Default memory for delta bases: the pages of a few VMs already sent, so the next
/// similar VM's near-duplicate pages find their base.
pub const DEFAULT_DELTA_MEM: u64 = 512 << 20;
/// Default memory for groups of block ids: ~4 GiB of referenced content at 1/64
/// (an entry costs ~128 bytes for each 4 KiB block it covers, a quarter of the
/// budget holds the ids themselves).
pub const DEFAULT_GROUP_MEM: u64 = 64 << 20;
/// Default memory for compression streams: about 18 connections compressing at once
/// with 8 MiB of history each (14 MiB counted, zstd's match tables included).
pub const DEFAULT_STREAM_MEM: u64 = 256 << 20;
/// Default read-ahead memory: a few QEMU multifd sync rounds of a migration whose
/// destination stalls one channel while it waits for another.
pub const DEFAULT_READ_AHEAD_MEM: u64 = 64 << 20;
/// Default send-ahead memory: 16 MiB each for four busy connections (a multifd
/// migration), a quarter MiB more each for 256 (the sending edge's memory bound).
pub const DEFAULT_SEND_AHEAD_MEM: u64 = 64 << 20;
/// Default heap touched before serving: the most a fresh edge's stores grew over a
/// four-VM cluster of 192 MiB guests (157 and 207 MiB peak resident), at ~0.1 s of
/// start-up.
pub const DEFAULT_PREFAULT_MEM: u64 = 256 << 20;
/// Default `--wan-timeout`: six missed heartbeats, and longer than TCP takes to
/// recover from a few lost segments on a congested link.
pub const DEFAULT_WAN_TIMEOUT_SECS: f64 = 30.0;
/// Default window: 64 MiB covers 1 Gbit/s x 500 ms or 10 Gbit/s x 50 ms.
pub const DEFAULT_WINDOW: u64 = 64 << 20;

/// A configuration that cannot work, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key).
        message: String,
    },
    /// A setting is invalid or missing.
    #[error("{0}")]
    Invalid(String),
}

impl EdgeArgs {
    /// Loads the file (if any), applies the flags over it and validates.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key or flag at fault.
    pub fn resolve(&self) -> Result<EdgeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => EdgeFile::default(),
        };
        let base = self
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let rel = |p: PathBuf| match &base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let mut forwards = Vec::new();
        for f in file.forward {
            forwards.push(match f {
                ForwardEntry::Short(s) => s.parse().map_err(ConfigError::Invalid)?,
                ForwardEntry::Table(t) => {
                    Forward::from_str(&format!("{}={}={}", t.listen, t.peer, t.target))
                        .map_err(ConfigError::Invalid)?
                }
            });
        }
        if !self.forwards.is_empty() {
            forwards = self.forwards.clone();
        }
        let mut transparent = Vec::new();
        for t in file.transparent {
            transparent.push(match t {
                TransparentEntry::Short(s) => s.parse().map_err(ConfigError::Invalid)?,
                TransparentEntry::Table(t) => {
                    Transparent::from_str(&format!("{}={}", t.listen, t.peer))
                        .map_err(ConfigError::Invalid)?
                }
            });
        }
        if !self.transparent.is_empty() {
            transparent = self.transparent.clone();
        }
        let allow_targets = if self.allow_targets.is_empty() {
            file.allow_target
        } else {
            self.allow_targets.clone()
        };
        let compress = match (self.compress, file.compress) {
            (Some(c), _) => c,
            (None, Some(s)) => s.parse().map_err(ConfigError::Invalid)?,
            (None, None) => CompressMode::Auto,
        };
        let insecure = self.insecure_plaintext || file.insecure_plaintext.unwrap_or(false);
        let ca = self.tls_ca.clone().or(file.tls_ca.map(&rel));
        let cert = self.tls_cert.clone().or(file.tls_cert.map(&rel));
        let key = self.tls_key.clone().or(file.tls_key.map(&rel));
        let tls = match (ca, cert, key, insecure) {
            (_, _, _, true) => None,
            (Some(ca), Some(cert), Some(key), false) => Some(TlsPaths { ca, cert, key }),
            _ => {
                return Err(ConfigError::Invalid(
                    "the WAN tunnel needs TLS: pass --tls-ca, --tls-cert and --tls-key (create them with `shrinker certs --out DIR NAME...`), or --insecure-plaintext for a lab without TLS".into(),
                ))
            }
        };
        let secs = |v: Option<f64>, what: &str, default: f64| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            if v.is_finite() && v > 0.0 && v < 86_400.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(ConfigError::Invalid(format!(
                    "--{what} must be a number of seconds between 0 and 86400, got {v}"
                )))
            }
        };
        let mut config = EdgeConfig {
            name: self.name.clone().or(file.name).unwrap_or_else(default_name),
            tunnel_listen: self.tunnel_listen.or(file.tunnel_listen),
            forwards,
            transparent,
            allow_targets,
            tls,
            cache_bytes: self
                .cache_mem
                .or(file.cache_mem)
                .map_or(DEFAULT_CACHE, |s| s.0),
            delta_bytes: self
                .delta_mem
                .or(file.delta_mem)
                .map_or(DEFAULT_DELTA_MEM, |s| s.0),
            group_bytes: self
                .group_mem
                .or(file.group_mem)
                .map_or(DEFAULT_GROUP_MEM, |s| s.0),
            stream_bytes: self
                .stream_mem
                .or(file.stream_mem)
                .map_or(DEFAULT_STREAM_MEM, |s| s.0),
            read_ahead_bytes: self
                .read_ahead_mem
                .or(file.read_ahead_mem)
                .map_or(DEFAULT_READ_AHEAD_MEM, |s| s.0),
            send_ahead_bytes: self
                .send_ahead_mem
                .or(file.send_ahead_mem)
                .map_or(DEFAULT_SEND_AHEAD_MEM, |s| s.0),
            // Filled in below, once the budgets it is bounded by are known.
            prefault_bytes: 0,
            window: self.window.or(file.window).map_or(DEFAULT_WINDOW, |s| s.0),
            compress,
            stats_json: self.stats_json.clone().or(file.stats_json),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            stats_interval: secs(
                self.stats_interval.or(file.stats_interval),
                "stats-interval",
                1.0,
            )?,
            connect_timeout: secs(
                self.connect_timeout.or(file.connect_timeout),
                "connect-timeout",
                10.0,
            )?,
            wan_timeout: secs(
                self.wan_timeout.or(file.wan_timeout),
                "wan-timeout",
                DEFAULT_WAN_TIMEOUT_SECS,
            )?,
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(4096),
        };
        config.prefault_bytes = self
            .prefault_mem
            .or(file.prefault_mem)
            .map_or(DEFAULT_PREFAULT_MEM, |s| s.0)
            .min(config.memory_budgets());
        config.validate()?;
        Ok(config)
    }
}

impl EdgeConfig {
    /// Everything the memory budgets let the edge hold (the stores, delta bases,
    /// groups, compression streams, read-ahead and send-ahead together): the most a
    /// prefault is worth.
    pub fn memory_budgets(&self) -> u64 {
        [
            self.cache_bytes,
            self.delta_bytes,
            self.group_bytes,
            self.stream_bytes,
            self.read_ahead_bytes,
            self.send_ahead_bytes,
        ]
        .iter()
        .fold(0u64, |sum, b| sum.saturating_add(*b))
    }

    /// Checks the settings fit together.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] saying what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.tunnel_listen.is_none() && self.forwards.is_empty() && self.transparent.is_empty() {
            return bad("nothing to do: give --tunnel-listen ADDR (accept peer edges) and/or --forward LISTEN=PEER=TARGET or --transparent LISTEN=PEER".into());
        }
        if !self.allow_targets.is_empty() && self.tunnel_listen.is_none() {
            return bad("--allow-target limits what peer edges may connect to: it needs --tunnel-listen (this edge accepts no peers)".into());
        }
        if self.name.is_empty() || self.name.len() > 255 {
            return bad(format!("--name {:?} must be 1 to 255 bytes", self.name));
        }
        if self.window < (1 << 20) {
            return bad(format!(
                "--window {} is too small: use at least 1MiB (it should cover bandwidth x RTT)",
                ByteSize(self.window)
            ));
        }
        if self.max_connections == 0 {
            return bad("--max-connections must be at least 1".into());
        }
        let mut seen = std::collections::HashSet::new();
        let listens = self.forwards.iter().map(|f| (f.listen, "forward")).chain(
            self.transparent
                .iter()
                .map(|t| (t.listen, "transparent listener")),
        );
        let listens = listens.chain(self.metrics_listen.map(|m| (m, "metrics listener")));
        for (listen, what) in listens {
            if !seen.insert(listen) {
                return bad(format!(
                    "two listeners (forwards, transparent, metrics) on {listen}"
                ));
            }
            if Some(listen) == self.tunnel_listen {
                return bad(format!(
                    "{what} listen address {listen} is also the tunnel listen address"
                ));
            }
        }
        Ok(())
    }
}

fn load_file(path: &Path) -> Result<EdgeFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edge".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_parsing() {
        let f: Forward = "127.0.0.1:4444=127.0.0.1:7700=10.0.0.2:4444"
            .parse()
            .unwrap();
        assert_eq!(f.listen, "127.0.0.1:4444".parse().unwrap());
        assert_eq!(f.peer, "127.0.0.1:7700");
        assert!("127.0.0.1:1=x"
            .parse::<Forward>()
            .unwrap_err()
            .contains("LISTEN=PEER=TARGET"));
        assert!("nope:1=a:1=b:2"
            .parse::<Forward>()
            .unwrap_err()
            .contains("LISTEN"));
        assert!("127.0.0.1:1=a=b:2"
            .parse::<Forward>()
            .unwrap_err()
            .contains("PEER"));
        let v6: Forward = "[::1]:4444=[::1]:7700=[::1]:4445".parse().unwrap();
        assert_eq!(v6.target, "[::1]:4445");
    }

    #[test]
    fn transparent_parsing_and_clashes() {
        let t: Transparent = "0.0.0.0:15001=edge-b:7700".parse().unwrap();
        assert_eq!(t.listen, "0.0.0.0:15001".parse().unwrap());
        assert_eq!(t.peer, "edge-b:7700");
        assert!("0.0.0.0:15001"
            .parse::<Transparent>()
            .unwrap_err()
            .contains("LISTEN=PEER"));
        assert!("0.0.0.0:15001=edge-b"
            .parse::<Transparent>()
            .unwrap_err()
            .contains("PEER"));
        let a = EdgeArgs {
            insecure_plaintext: true,
            transparent: vec![t.clone()],
            ..Default::default()
        };
        assert_eq!(a.resolve().unwrap().transparent, vec![t.clone()]);
        let clash = EdgeArgs {
            forwards: vec!["0.0.0.0:15001=edge-b:7700=10.0.0.2:4444".parse().unwrap()],
            ..a
        };
        let e = clash.resolve().unwrap_err().to_string();
        assert!(e.contains("two listeners"), "{e}");
    }

    #[test]
    fn allow_target_needs_a_tunnel_listener() {
        let mut a = EdgeArgs {
            insecure_plaintext: true,
            forwards: vec!["127.0.0.1:4444=edge-b:7700=10.0.0.2:4444".parse().unwrap()],
            allow_targets: vec!["10.0.0.0/8:4444".parse().unwrap()],
            ..Default::default()
        };
        let e = a.resolve().unwrap_err().to_string();
        assert!(e.contains("needs --tunnel-listen"), "{e}");
        a.tunnel_listen = Some("127.0.0.1:7700".parse().unwrap());
        assert_eq!(a.resolve().unwrap().allow_targets.len(), 1);
    }

    #[test]
    fn tls_required_unless_insecure() {
        let mut a = EdgeArgs {
            tunnel_listen: Some("127.0.0.1:7700".parse().unwrap()),
            ..Default::default()
        };
        let e = a.resolve().unwrap_err().to_string();
        assert!(e.contains("shrinker certs"), "{e}");
        a.insecure_plaintext = true;
        assert!(a.resolve().unwrap().tls.is_none());
    }

    #[test]
    fn nothing_to_do_is_an_error() {
        let a = EdgeArgs {
            insecure_plaintext: true,
            ..Default::default()
        };
        assert!(a
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("nothing to do"));
    }
}
