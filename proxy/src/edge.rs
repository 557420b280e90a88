//! One edge process: listeners, handshakes, and the shared state every connection uses.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cache::{ChunkStore, GroupMap, PeerRegistry, SimilarIndex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};
use wire::handshake::{Hello, HelloReply};
use wire::session::EncoderConfig;
use wire::{ChunkParams, GroupIndex, SimilarChunks};

use crate::budget::StreamBudget;
use crate::config::{EdgeConfig, Forward, Transparent};
use crate::conn::{
    pump, pump_early, pump_replaying, ConnError, EarlyOpen, Ended, Outcome, PumpCtx,
};
use crate::error::EdgeError;
use crate::governor::LinkHistory;
use crate::io::{ConnWan, WanCountingIo};
use crate::order::OpenOrder;
use crate::read_ahead::ReadAheadBudget;
use crate::spare::{secure, KnownPeers, PeerFacts, Secured, Spares};
use crate::stats::{self, ConnSummary, EdgeStats, PeerSnapshot, Snapshot, StoreSnapshot};

/// How long open connections may take to finish after a shutdown request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A boxed tunnel stream (TLS or plaintext), so both paths share one driver.
pub(crate) trait TunnelIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> TunnelIo for T {}
pub(crate) type Tunnel = Box<dyn TunnelIo>;

/// State shared by every connection of the edge.
pub(crate) struct EdgeShared {
    pub(crate) config: EdgeConfig,
    epoch: u64,
    store: ChunkStore,
    /// Chunks sent, as delta bases (`None` when `--delta-mem 0`).
    similar: Option<Arc<dyn SimilarChunks>>,
    /// Groups of block ids sent, for runs of references (`None` when `--group-mem 0`).
    groups: Option<Arc<dyn GroupIndex>>,
    /// Memory for context-keeping compression streams.
    streams: Arc<StreamBudget>,
    /// Memory for downlinks reading the tunnel ahead of a slow local socket.
    read_ahead: Arc<ReadAheadBudget>,
    /// Memory for uplinks reading local data ahead of the tunnel.
    send_ahead: Arc<ReadAheadBudget>,
    /// Bulk compressions that may run at once (see `PumpCtx::compress_slots`).
    compress_slots: Arc<tokio::sync::Semaphore>,
    peers: PeerRegistry,
    pub(crate) stats: Arc<EdgeStats>,
    tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) tls_connector: Option<tokio_rustls::TlsConnector>,
    conn_ids: AtomicU64,
    /// Sequence numbers of the connections this edge forwards (Hello `open_seq`):
    /// unique within the epoch, so a peer can name one as another's predecessor.
    open_seqs: AtomicU64,
    /// Which of the peers' connections have been connected to their targets: a
    /// connection waits for the one its Hello names (`crate::order`).
    open_order: OpenOrder,
    limit: Arc<Semaphore>,
    started: Instant,
    recent: std::sync::Mutex<std::collections::VecDeque<ConnSummary>>,
    /// Per peer edge: what its connections share.
    peer_state: std::sync::Mutex<std::collections::HashMap<String, PeerState>>,
    /// Per peer edge address: what its last handshake reply said (connections to it
    /// then send without waiting for theirs).
    pub(crate) known_peers: KnownPeers,
    /// Whether the operator was told that this host's send buffer holds tunnel
    /// connections back (`crate::send_buffer`: said once).
    sndbuf_advised: std::sync::atomic::AtomicBool,
}

/// What the connections with one peer edge share.
#[derive(Clone, Default)]
struct PeerState {
    /// The compression decisions and the link's pace.
    link: Arc<LinkHistory>,
    /// How many of them failed.
    failures: Arc<AtomicU64>,
}

/// Finished connections kept in the stats snapshot.
const RECENT_CONNECTIONS: usize = 64;

/// An edge whose listeners are bound (so address errors surface before it runs).
pub struct Edge {
    shared: Arc<EdgeShared>,
    tunnel: Option<TcpListener>,
    forwards: Vec<(Route, TcpListener)>,
    metrics: Option<TcpListener>,
}

/// Where a listener's connections go.
#[derive(Clone, Debug)]
enum Route {
    /// A forward: every connection to one target.
    Fixed(Arc<Forward>),
    /// A transparent listener: each connection to where it was going before the
    /// kernel diverted it here.
    Transparent(Transparent),
}

impl Route {
    fn listen(&self) -> SocketAddr {
        match self {
            Route::Fixed(f) => f.listen,
            Route::Transparent(t) => t.listen,
        }
    }

    fn peer(&self) -> &str {
        match self {
            Route::Fixed(f) => &f.peer,
            Route::Transparent(t) => &t.peer,
        }
    }
}

impl Edge {
    /// Loads TLS material and binds every listener.
    ///
    /// # Errors
    /// [`EdgeError`] naming the file or address at fault.
    pub async fn bind(config: EdgeConfig) -> Result<Edge, EdgeError> {
        let (tls_acceptor, tls_connector) = match &config.tls {
            Some(paths) => {
                let files = tls::TlsFiles {
                    ca: paths.ca.clone(),
                    cert: paths.cert.clone(),
                    key: paths.key.clone(),
                };
                (
                    Some(tokio_rustls::TlsAcceptor::from(tls::server_config(&files)?)),
                    Some(tokio_rustls::TlsConnector::from(tls::client_config(
                        &files,
                    )?)),
                )
            }
            None => {
                warn!("TLS is off (--insecure-plaintext): the WAN tunnel can be read and altered by anyone on the path");
                (None, None)
            }
        };
        let tunnel = match config.tunnel_listen {
            Some(addr) => Some(bind(addr, "tunnel").await?),
            None => None,
        };
        if config.tunnel_listen.is_some() && config.allow_targets.is_empty() {
            info!("peer edges may ask this edge to connect to any host and port; limit them with --allow-target");
        }
        let mut forwards = Vec::new();
        for f in &config.forwards {
            forwards.push((
                Route::Fixed(Arc::new(f.clone())),
                bind(f.listen, "forward").await?,
            ));
        }
        for t in &config.transparent {
            forwards.push((Route::Transparent(t.clone()), bind_transparent(t.listen)?));
        }
        let metrics = match config.metrics_listen {
            Some(addr) => Some(bind(addr, "metrics").await?),
            None => None,
        };
        let shared = Arc::new(EdgeShared {
            epoch: rand::random(),
            store: ChunkStore::new(config.cache_bytes),
            similar: (config.delta_bytes > 0)
                .then(|| Arc::new(SimilarIndex::new(config.delta_bytes)) as Arc<dyn SimilarChunks>),
            groups: (config.group_bytes > 0)
                .then(|| Arc::new(GroupMap::new(config.group_bytes)) as Arc<dyn GroupIndex>),
            streams: StreamBudget::new(config.stream_bytes),
            read_ahead: ReadAheadBudget::new(config.read_ahead_bytes),
            send_ahead: ReadAheadBudget::new(config.send_ahead_bytes),
            compress_slots: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(4, |n| 2 * n.get()),
            )),
            peers: PeerRegistry::new(),
            stats: Arc::new(EdgeStats::default()),
            tls_acceptor,
            tls_connector,
            conn_ids: AtomicU64::new(0),
            open_seqs: AtomicU64::new(0),
            open_order: OpenOrder::default(),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            started: Instant::now(),
            recent: Default::default(),
            peer_state: Default::default(),
            known_peers: KnownPeers::default(),
            sndbuf_advised: Default::default(),
            config,
        });
        Ok(Edge {
            shared,
            tunnel,
            forwards,
            metrics,
        })
    }

    /// The bound tunnel address.
    pub fn tunnel_addr(&self) -> Option<SocketAddr> {
        self.tunnel.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound forward addresses, in configuration order (forwards, then transparent
    /// listeners).
    pub fn forward_addrs(&self) -> Vec<SocketAddr> {
        self.forwards
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// The edge's counters (live).
    pub fn stats(&self) -> Arc<EdgeStats> {
        self.shared.stats.clone()
    }

    /// A snapshot of counters, store and peers.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }

    /// Serves until `shutdown` completes, then stops accepting, gives open connections
    /// a grace period, and writes a final stats snapshot.
    ///
    /// # Errors
    /// Only for failures of the edge as a whole (none today: per-connection failures
    /// are logged and counted).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), EdgeError> {
        let Edge {
            shared,
            tunnel,
            forwards,
            metrics,
        } = self;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        info!(
            edge = %shared.config.name,
            epoch = format_args!("{:016x}", shared.epoch),
            cache = %crate::size::ByteSize(shared.config.cache_bytes),
            tls = shared.config.tls.is_some(),
            "edge started"
        );
        if let Some(listener) = tunnel {
            info!(addr = %listener.local_addr().map_err(EdgeError::Io)?, "accepting peer edges");
            tracker.spawn(accept_tunnels(
                shared.clone(),
                listener,
                stop.clone(),
                tracker.clone(),
            ));
        }
        if let Some(listener) = metrics {
            info!(addr = %listener.local_addr().map_err(EdgeError::Io)?, "serving Prometheus metrics at /metrics");
            let shared = shared.clone();
            tracker.spawn(crate::metrics::serve(
                listener,
                move || shared.snapshot(),
                stop.clone(),
            ));
        }
        // One keeper of a warm connection per peer edge, shared by its forwards.
        let mut spares: std::collections::HashMap<String, Spares> = Default::default();
        for (route, listener) in forwards {
            match &route {
                Route::Fixed(f) => {
                    info!(listen = %f.listen, peer = %f.peer, target = %f.target, "forwarding")
                }
                Route::Transparent(t) => info!(
                    listen = %t.listen,
                    peer = %t.peer,
                    "forwarding intercepted connections (TPROXY/REDIRECT) to their original destinations"
                ),
            }
            let peer = route.peer().to_string();
            let spare = spares
                .entry(peer.clone())
                .or_insert_with(|| {
                    let (handle, keeper) = Spares::start(shared.clone(), peer, stop.clone());
                    tracker.spawn(keeper);
                    handle
                })
                .clone();
            tracker.spawn(accept_forward(
                shared.clone(),
                route,
                spare,
                listener,
                stop.clone(),
                tracker.clone(),
            ));
        }
        let stats_task = shared.config.stats_json.clone().map(|path| {
            let shared = shared.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(shared.config.stats_interval);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => break,
                    }
                    if let Err(e) = stats::write_snapshot(&path, &shared.snapshot()) {
                        warn!(path = %path.display(), "cannot write stats snapshot: {e}");
                    }
                }
            })
        });
        shutdown.await;
        info!("shutting down: no new connections; waiting for open ones");
        stop.cancel();
        tracker.close();
        if timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
            warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
        }
        if let Some(t) = stats_task {
            let _ = t.await;
        }
        if let Some(path) = &shared.config.stats_json {
            if let Err(e) = stats::write_snapshot(path, &shared.snapshot()) {
                warn!(path = %path.display(), "cannot write final stats snapshot: {e}");
            }
        }
        info!("edge stopped");
        Ok(())
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, EdgeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EdgeError::Bind { what, addr, source })
}

/// A listener for connections a TPROXY rule diverts: IP_TRANSPARENT lets it accept
/// connections addressed to other hosts, which keep that address as their local one.
fn bind_transparent(addr: SocketAddr) -> Result<TcpListener, EdgeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| EdgeError::Bind {
        what: "transparent",
        addr,
        source,
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    let transparent = if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    };
    transparent.map_err(|source| EdgeError::Transparent { addr, source })?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// Where a connection accepted on the transparent listener `listen` was going. TPROXY
/// leaves the original destination as the socket's local address; NAT REDIRECT
/// rewrites it to the listener's own, and conntrack keeps the original
/// (SO_ORIGINAL_DST). A connection addressed to the listener itself was not diverted:
/// sending it on would make the peer connect back here, a loop, so it is refused.
fn original_destination(local: &TcpStream, listen: SocketAddr) -> Result<SocketAddr, String> {
    let here = local
        .local_addr()
        .map(unmapped)
        .map_err(|e| format!("cannot read the connection's local address: {e}"))?;
    if !is_listener(here, listen) {
        return Ok(here);
    }
    let sock = socket2::SockRef::from(local);
    let original = if here.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match original.ok().and_then(|a| a.as_socket()).map(unmapped) {
        Some(o) if !is_listener(o, listen) => Ok(o),
        _ => Err(format!(
            "connection to {here} was addressed to the transparent listener itself, not diverted by a TPROXY or REDIRECT rule; refused (the peer would connect back here). Intercept other ports to this one, and give the listener a port no intercepted service uses"
        )),
    }
}

/// `addr` with an IPv4-mapped IPv6 address (an IPv4 connection accepted on a
/// dual-stack `[::]` listener) as the IPv4 address it is, so the target the peer dials
/// does not depend on the peer's IPv6 setup.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether `addr` is the transparent listener `listen` (any of its addresses when it
/// listens on all).
fn is_listener(addr: SocketAddr, listen: SocketAddr) -> bool {
    addr.port() == listen.port() && (listen.ip().is_unspecified() || addr.ip() == listen.ip())
}

impl EdgeShared {
    fn snapshot(&self) -> Snapshot {
        let counters = self.stats.snapshot();
        let s = self.store.stats();
        let reduction_ratio = if counters.wan_bytes_out > 0 {
            counters.lan_bytes_in as f64 / counters.wan_bytes_out as f64
        } else {
            0.0
        };
        Snapshot {
            edge: self.config.name.clone(),
            epoch: self.epoch,
            uptime_secs: self.started.elapsed().as_secs_f64(),
            counters,
            store: StoreSnapshot {
                entries: s.entries,
                bytes: s.bytes,
                capacity_bytes: s.capacity_bytes,
                hits: s.hits,
                misses: s.misses,
                evictions: s.evictions,
            },
            peers: self
                .peers
                .peers()
                .into_iter()
                .map(|(name, epoch, modelled_entries)| PeerSnapshot {
                    name,
                    epoch,
                    modelled_entries,
                })
                .collect(),
            reduction_ratio,
            recent_connections: self
                .recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }

    fn ctx(&self, peer_edge: &str, peer_epoch: u64, peer_cache: u64, peer_window: u64) -> PumpCtx {
        let peer = self
            .peer_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer_edge.to_owned())
            .or_default()
            .clone();
        let lookup = self.peers.lookup(peer_edge, peer_epoch, peer_cache);
        if let Some(conflict) = lookup.name_conflict {
            self.stats.peer_name_conflicts.fetch_add(1, Relaxed);
            // The first time, then ever more rarely: alternating connections would
            // otherwise log one warning each.
            if conflict.count.is_power_of_two() {
                warn!(
                    peer = peer_edge,
                    epochs = format_args!("{peer_epoch:016x} and {:016x}", conflict.other_epoch),
                    times = conflict.count,
                    "two live peer edges call themselves {peer_edge:?}: give each edge its \
                     own --name (until then each one's connections make this edge forget \
                     what the other holds, so fewer references cross, and their link \
                     measurements mix)"
                );
            }
        }
        PumpCtx {
            store: Arc::new(self.store.clone()),
            peer: lookup.index,
            similar: self.similar.clone(),
            groups: self.groups.clone(),
            streams: self.streams.clone(),
            read_ahead: self.read_ahead.clone(),
            send_ahead: self.send_ahead.clone(),
            compress_slots: self.compress_slots.clone(),
            encoder: EncoderConfig {
                compress: self.config.compress,
                level: 1,
            },
            chunk: ChunkParams::DEFAULT,
            window: self.config.window,
            peer_window,
            link_history: peer.link,
            stats: self.stats.clone(),
            peer_failures: peer.failures,
            tunnel_fd: None,
            wan_timeout: self.config.wan_timeout,
        }
    }

    fn finish(
        &self,
        id: u64,
        role: &'static str,
        result: Result<Outcome, ConnError>,
        wan: &ConnWan,
    ) {
        self.stats.active_connections.fetch_sub(1, Relaxed);
        // The tunnel socket's state at the end (zero when unknown or failed).
        let path = result
            .as_ref()
            .ok()
            .and_then(|o| o.tunnel_path)
            .unwrap_or_default();
        let mut summary = ConnSummary {
            id,
            role,
            finished_at_secs: self.started.elapsed().as_secs_f64(),
            wan_in: wan.bytes_in.load(Relaxed),
            wan_out: wan.bytes_out.load(Relaxed),
            ..Default::default()
        };
        match &result {
            Ok(o) => {
                summary.kind = o.seg.kind.to_string();
                summary.pages = o
                    .seg
                    .counters
                    .iter()
                    .find(|(k, _)| *k == "pages")
                    .map_or(0, |c| c.1);
                summary.blocks = o.seg.blocks;
                summary.parser_counters = o.seg.counters.iter().copied().collect();
                summary.parser_gave_up = o
                    .seg
                    .gave_up
                    .as_ref()
                    .map(|(at, why)| format!("at {at}: {why}"));
                summary.lan_in = o.lan_in;
                summary.lan_out = o.lan_out;
                summary.refs = o.enc.refs;
                summary.ref_bytes = o.enc.ref_bytes;
                summary.chunks = o.enc.chunks;
                summary.chunk_bytes = o.enc.chunk_bytes;
                summary.misses = o.dec.misses;
                summary.fills_sent = o.fills_sent;
                summary.rtt_ms = f64::from(path.rtt_us) / 1e3;
                summary.sndbuf_limited_ms = path.sndbuf_limited_us / 1000;
                summary.rwnd_limited_ms = path.rwnd_limited_us / 1000;
                summary.result = "ok".into();
            }
            Err(e) => summary.result = e.to_string(),
        }
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT_CONNECTIONS {
                recent.pop_front();
            }
            recent.push_back(summary);
        }
        match result {
            Ok(o) => {
                self.stats.connections_completed.fetch_add(1, Relaxed);
                self.stats.add_encoder(&o.enc);
                self.stats.add_decoder(&o.dec);
                self.stats.fills_sent.fetch_add(o.fills_sent, Relaxed);
                self.stats
                    .tunnel_sndbuf_limited_ms
                    .fetch_add(path.sndbuf_limited_us / 1000, Relaxed);
                self.stats
                    .tunnel_rwnd_limited_ms
                    .fetch_add(path.rwnd_limited_us / 1000, Relaxed);
                if !self.sndbuf_advised.load(Relaxed) {
                    if let Some(advice) =
                        crate::send_buffer::advice(&path, crate::send_buffer::tcp_wmem_max)
                    {
                        self.sndbuf_advised.store(true, Relaxed);
                        warn!("{advice}");
                    }
                }
                let wan_out = wan.bytes_out.load(Relaxed);
                self.stats.add_segmenter(&o.seg);
                let pages = o
                    .seg
                    .counters
                    .iter()
                    .find(|(k, _)| *k == "pages")
                    .map_or(0, |c| c.1);
                info!(
                    kind = o.seg.kind,
                    blocks = o.seg.blocks,
                    pages,
                    parsed_opaque = o.seg.opaque_bytes,
                    fallback = o.seg.fallback_bytes,
                    gave_up = o
                        .seg
                        .gave_up
                        .as_ref()
                        .map(|(at, why)| format!("at {at}: {why}"))
                        .unwrap_or_default(),
                    lan_in = o.lan_in,
                    lan_out = o.lan_out,
                    wan_out,
                    wan_in = wan.bytes_in.load(Relaxed),
                    refs = o.enc.refs,
                    ref_bytes = o.enc.ref_bytes,
                    chunks = o.enc.chunks,
                    literal_bytes = o.enc.literal_bytes,
                    compressed = o.enc.compression.batches_compressed,
                    incompressible = o.enc.compression.batches_incompressible,
                    misses = o.dec.misses,
                    fills_sent = o.fills_sent,
                    rtt_ms = format_args!("{:.1}", f64::from(path.rtt_us) / 1e3),
                    sndbuf_limited_ms = path.sndbuf_limited_us / 1000,
                    rwnd_limited_ms = path.rwnd_limited_us / 1000,
                    ratio = format_args!(
                        "{:.3}",
                        if o.lan_in > 0 {
                            wan_out as f64 / o.lan_in as f64
                        } else {
                            0.0
                        }
                    ),
                    "connection closed"
                );
            }
            Err(e) => {
                self.stats.connections_failed.fetch_add(1, Relaxed);
                match e {
                    ConnError::PeerReset(_) => info!("connection reset: {e}"),
                    ref e if e.is_local() => info!("connection reset by the local side: {e}"),
                    e => warn!("connection failed: {e}"),
                }
            }
        }
    }
}

/// Handshake turns kept per target before finished ones are dropped.
const TURNS_KEPT: usize = 256;

async fn accept_forward(
    shared: Arc<EdgeShared>,
    route: Route,
    spare: Spares,
    listener: TcpListener,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let listen = route.listen();
    // Per target, the turn the next connection to it waits for, and the sequence
    // number of the connection before it: a migration's channels reach their
    // destination in accept order; connections to other targets (other VMs behind a
    // transparent listener) do not wait for each other.
    let mut turns: std::collections::HashMap<String, (oneshot::Receiver<()>, HelloInFlight)> =
        Default::default();
    loop {
        let permit = tokio::select! {
            p = shared.limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.cancelled() => return,
        };
        let (local, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!(listen = %listen, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let fwd = match &route {
            Route::Fixed(f) => f.clone(),
            Route::Transparent(t) => match original_destination(&local, listen) {
                Ok(target) => Arc::new(Forward {
                    listen,
                    peer: t.peer.clone(),
                    target: target.to_string(),
                }),
                Err(msg) => {
                    shared.stats.connections_accepted.fetch_add(1, Relaxed);
                    shared.stats.connections_failed.fetch_add(1, Relaxed);
                    warn!(from = %addr, listen = %listen, "{msg}");
                    crate::io::reset_on_close(&local);
                    continue;
                }
            },
        };
        let seq = shared.open_seqs.fetch_add(1, Relaxed) + 1;
        if turns.len() >= TURNS_KEPT {
            // A finished turn (released or dropped) no longer holds anyone back.
            turns.retain(|_, (rx, _)| {
                matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
            });
        }
        let (release, next_wait) = oneshot::channel::<()>();
        let ours = HelloInFlight::new(seq);
        let (wait, prev) = match turns.insert(fwd.target.clone(), (next_wait, ours.clone())) {
            Some((rx, prev)) => (Some(rx), Some(prev)),
            None => (None, None),
        };
        let turn = OpenTurn {
            wait,
            release,
            prev,
            ours,
        };
        let id = shared.conn_ids.fetch_add(1, Relaxed);
        shared.stats.connections_accepted.fetch_add(1, Relaxed);
        shared.stats.active_connections.fetch_add(1, Relaxed);
        let span = info_span!("conn", id, from = %addr, peer = %fwd.peer, target = %fwd.target);
        let (shared, fwd, spare) = (shared.clone(), fwd.clone(), spare.clone());
        tracker.spawn(
            async move {
                let _permit = permit;
                let mut wan = Arc::new(ConnWan::default());
                let (result, reusable) =
                    forward_one(&shared, local, &fwd, &spare, seq, &mut wan, turn).await;
                shared.finish(id, "forward", result, &wan);
                if let Some(tunnel) = reusable {
                    // Idle, its window open: the next connection to the peer takes it.
                    wan.reset();
                    spare.give_back(Secured { tunnel, wan }).await;
                }
            }
            .instrument(span),
        );
    }
}

/// A connection's place in its forward's handshake order: wait until the previous
/// connection sent its Hello (`wait` resolves, or errors when it is dropped), send
/// ours naming that one while its reply is still outstanding (`prev`), then let the
/// next one go (dropping `release`).
struct OpenTurn {
    wait: Option<oneshot::Receiver<()>>,
    release: oneshot::Sender<()>,
    prev: Option<HelloInFlight>,
    ours: HelloInFlight,
}

/// A connection's sequence number, and whether its Hello is on its way: sent, with
/// no reply yet. Only then must the peer hold the next connection back for it; one
/// answered (connected) or failed is not waited for, and a restarted peer never
/// hears of it.
#[derive(Clone)]
struct HelloInFlight {
    seq: u64,
    flying: Arc<std::sync::atomic::AtomicBool>,
}

impl HelloInFlight {
    fn new(seq: u64) -> Self {
        HelloInFlight {
            seq,
            flying: Arc::default(),
        }
    }

    /// The sequence number to name in the next Hello: this one's while it flies.
    fn to_wait_for(&self) -> u64 {
        if self.flying.load(std::sync::atomic::Ordering::Acquire) {
            self.seq
        } else {
            0
        }
    }

    fn set(&self, flying: bool) {
        self.flying
            .store(flying, std::sync::atomic::Ordering::Release);
    }
}

/// What relaying one connection gave: its outcome, and its tunnel connection when that
/// may carry the next one (both ends sent DONE).
type Relayed = (Result<Outcome, ConnError>, Option<Tunnel>);

/// A connection that failed before relaying: the local side is reset.
fn failed_before_relay(local: TcpStream, msg: String) -> Relayed {
    (Err(reset_local(local, msg)), None)
}

/// Client side: open a tunnel to the peer for one accepted local connection. `wan`
/// ends up counting the tunnel connection actually used.
async fn forward_one(
    shared: &Arc<EdgeShared>,
    local: TcpStream,
    fwd: &Forward,
    spare: &Spares,
    seq: u64,
    wan: &mut Arc<ConnWan>,
    turn: OpenTurn,
) -> Relayed {
    let _ = local.set_nodelay(true);
    let cfg = &shared.config;
    // The peer must connect to the target in the order we accepted: QEMU 7.2 tells a
    // migration's main channel from its multifd channels only by accept order. Our
    // Hellos leave in that order, each naming the connection before it, and the peer
    // connects a connection to the target only after the one it names
    // (`crate::order`): the Hellos cross the WAN side by side, so N channels cost the
    // round trips of one. TCP and TLS come first, in parallel (or come ready-made: a
    // spare).
    let (secured, from_spare) = match spare.take().await {
        Some(s) => (Ok(s), true),
        None => (secure(shared, &fwd.peer).await, false),
    };
    // Our turn comes whatever happened above: a connection that failed must not let
    // the next one overtake the one before it.
    if let Some(prev) = turn.wait {
        let _ = timeout(cfg.connect_timeout, prev).await;
    }
    // Dropped (the next connection goes) once our Hello is written, or on any failure.
    let mut release = Some(turn.release);
    let secured = match secured {
        Ok(s) => s,
        Err(msg) => return failed_before_relay(local, msg),
    };
    let seq = (
        seq,
        turn.prev.as_ref().map_or(0, HelloInFlight::to_wait_for),
    );
    // Flying from before the next connection may go until our reply (or failure).
    turn.ours.set(true);
    let landed = Landed(turn.ours.clone());
    if let Some(facts) = shared.known_peers.get(&fwd.peer) {
        let hello = Early {
            secured,
            from_spare,
            release,
            landed,
            facts,
        };
        return forward_early(shared, local, fwd, seq, hello, wan).await;
    }
    let opened = match open(shared, fwd, seq, secured, wan, &mut release).await {
        // A spare the peer dropped since the keeper last looked (a restarted peer):
        // nothing was read from the local side yet, so connect afresh.
        Err(Failed::Connection(msg)) if from_spare => {
            spare_was_dead(shared, fwd, &msg);
            reopen(shared, fwd, seq, wan).await
        }
        other => other,
    };
    drop(landed);
    match opened {
        Ok((tunnel, rbuf, reply)) => {
            relay_answered(shared, local, fwd, (tunnel, rbuf, reply), wan, Bytes::new()).await
        }
        Err(f) => failed_before_relay(local, f.into_message()),
    }
}

/// A connection ready to send its Hello without waiting for the reply: the peer's
/// facts are known from an earlier reply.
struct Early {
    secured: Secured,
    from_spare: bool,
    release: Option<oneshot::Sender<()>>,
    landed: Landed,
    facts: PeerFacts,
}

/// Sends the Hello and relays at once: the downlink reads the reply before the first
/// frame (`conn::pump_early`), one WAN round trip after the data started. A warm
/// connection keeps what it read until then; lost before the reply, the connection
/// starts over on a fresh tunnel connection with those bytes first.
async fn forward_early(
    shared: &Arc<EdgeShared>,
    local: TcpStream,
    fwd: &Forward,
    seq: (u64, u64),
    early: Early,
    wan: &mut Arc<ConnWan>,
) -> Relayed {
    let Early {
        secured,
        from_spare,
        mut release,
        landed,
        facts,
    } = early;
    let ours = landed.0.clone();
    *wan = secured.wan;
    let mut tunnel = secured.tunnel;
    let sent = send_hello(shared, fwd, seq, &mut tunnel).await;
    // On its way: the peer connects the next connection after this one.
    release.take();
    if let Err(msg) = sent {
        if !from_spare {
            return failed_before_relay(local, msg);
        }
        // As in `forward_one`: nothing was read from the local side yet.
        spare_was_dead(shared, fwd, &msg);
        return start_over(shared, local, fwd, seq, wan, landed, Bytes::new()).await;
    }
    shared.stats.opens_early.fetch_add(1, Relaxed);
    debug!(peer_edge = %facts.edge, "tunnel open, its reply to come");
    let on_reply = {
        let (shared, peer) = (shared.clone(), fwd.peer.clone());
        let target = fwd.target.clone();
        move |reply: &HelloReply| {
            drop(landed);
            if let Some(refused) = refusal(reply, &target) {
                return Err(refused);
            }
            if shared.known_peers.learn(&peer, reply) {
                // References this connection sent on the old facts are answered with
                // MISS and sent again; connections from now on use the new ones.
                info!(
                    peer_edge = %reply.edge,
                    epoch = format_args!("{:016x}", reply.epoch),
                    "peer edge at {peer} answered as another edge process than its last reply"
                );
            }
            Ok(())
        }
    };
    let mut ctx = shared.ctx(&facts.edge, facts.epoch, facts.cache_bytes, facts.window);
    ctx.tunnel_fd = wan.socket_fd();
    let early = EarlyOpen {
        on_reply: Box::new(on_reply),
        reply_within: shared.config.connect_timeout,
        keep_until_reply: from_spare,
    };
    match pump_early(local, tunnel, ctx, early).await {
        (Ended::Relayed(r), reusable) => (r, reusable),
        (Ended::Unanswered { local, read, cause }, _) => {
            spare_was_dead(shared, fwd, &cause.to_string());
            info!(
                "tunnel connection lost before the peer's reply ({cause}); starting over \
                 on a fresh one with the {} bytes read so far",
                read.len()
            );
            ours.set(true);
            start_over(shared, local, fwd, seq, wan, Landed(ours), read).await
        }
    }
}

/// Starts a connection over on a fresh tunnel connection, its warm one found dead
/// (`read`: what it had read from `local` by then, sent first). `landed` is kept
/// until the fresh connection's reply.
async fn start_over(
    shared: &Arc<EdgeShared>,
    local: TcpStream,
    fwd: &Forward,
    seq: (u64, u64),
    wan: &mut Arc<ConnWan>,
    landed: Landed,
    read: Bytes,
) -> Relayed {
    let reopened = reopen(shared, fwd, seq, wan).await;
    drop(landed);
    match reopened {
        Ok(opened) => relay_answered(shared, local, fwd, opened, wan, read).await,
        Err(f) => failed_before_relay(local, f.into_message()),
    }
}

/// Why the peer's reply refused the connection to `target`, if it did.
fn refusal(reply: &HelloReply, target: &str) -> Option<String> {
    let reason = reply.result.as_ref().err()?;
    Some(format!(
        "peer edge {} cannot reach target {target}: {reason}",
        reply.edge
    ))
}

/// A warm connection found dead when used: perhaps a restarted peer, so its facts go.
fn spare_was_dead(shared: &EdgeShared, fwd: &Forward, why: &str) {
    shared.stats.spares_stale.fetch_add(1, Relaxed);
    shared.known_peers.forget(&fwd.peer);
    debug!("spare tunnel connection was dead ({why}); connecting afresh");
}

/// A fresh tunnel connection (TCP, TLS, Hello) and the peer's reply.
async fn reopen(
    shared: &EdgeShared,
    fwd: &Forward,
    seq: (u64, u64),
    wan: &mut Arc<ConnWan>,
) -> Result<(Tunnel, BytesMut, HelloReply), Failed> {
    match secure(shared, &fwd.peer).await {
        Ok(fresh) => open(shared, fwd, seq, fresh, wan, &mut None).await,
        Err(msg) => Err(Failed::Connection(msg)),
    }
}

/// Relays over a tunnel whose reply arrived (`read`, bytes a lost connection had read
/// from `local`, first), after checking the reply and remembering the peer's facts.
async fn relay_answered(
    shared: &Arc<EdgeShared>,
    local: TcpStream,
    fwd: &Forward,
    (tunnel, rbuf, reply): (Tunnel, BytesMut, HelloReply),
    wan: &Arc<ConnWan>,
    read: Bytes,
) -> Relayed {
    if let Some(refused) = refusal(&reply, &fwd.target) {
        return failed_before_relay(local, refused);
    }
    shared.known_peers.learn(&fwd.peer, &reply);
    debug!(peer_edge = %reply.edge, "tunnel open");
    let mut ctx = shared.ctx(&reply.edge, reply.epoch, reply.cache_bytes, reply.window);
    // `wan` counts the tunnel connection used (a spare's or a fresh one).
    ctx.tunnel_fd = wan.socket_fd();
    pump_replaying(local, tunnel, rbuf, ctx, read).await
}

/// Marks a Hello as no longer flying when dropped (answered, or the connection failed).
struct Landed(HelloInFlight);

impl Drop for Landed {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// Why opening a tunnel failed.
enum Failed {
    /// The connection broke, or fell silent, before the peer answered (worth one
    /// fresh try when it was a spare).
    Connection(String),
    /// The peer answered something that is not a handshake reply, or too late.
    Handshake(String),
}

impl Failed {
    fn into_message(self) -> String {
        match self {
            Failed::Connection(m) | Failed::Handshake(m) => m,
        }
    }
}

/// Writes our Hello (`seq`: this connection's and its predecessor's sequence numbers).
async fn send_hello(
    shared: &EdgeShared,
    fwd: &Forward,
    seq: (u64, u64),
    tunnel: &mut Tunnel,
) -> Result<(), String> {
    let cfg = &shared.config;
    let mut out = BytesMut::new();
    Hello {
        edge: cfg.name.clone(),
        epoch: shared.epoch,
        cache_bytes: cfg.cache_bytes,
        window: cfg.window,
        target: fwd.target.clone(),
        open_seq: seq.0,
        after_seq: seq.1,
    }
    .encode(&mut out);
    let sent = timeout(cfg.connect_timeout, async {
        tunnel.write_all(&out).await?;
        tunnel.flush().await
    })
    .await;
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("sending handshake to peer edge {}: {e}", fwd.peer)),
        Err(_) => Err(format!(
            "sending handshake to peer edge {}: not taken within {:?}",
            fwd.peer, cfg.connect_timeout
        )),
    }
}

/// Sends our Hello on a secured tunnel connection, lets the next connection go once
/// it is written (drops `release`), and reads the peer's reply; `wan` takes over that
/// connection's byte counts.
async fn open(
    shared: &EdgeShared,
    fwd: &Forward,
    seq: (u64, u64),
    secured: Secured,
    wan: &mut Arc<ConnWan>,
    release: &mut Option<oneshot::Sender<()>>,
) -> Result<(Tunnel, BytesMut, HelloReply), Failed> {
    let cfg = &shared.config;
    *wan = secured.wan;
    let mut tunnel = secured.tunnel;
    let opened = timeout(cfg.connect_timeout, async {
        send_hello(shared, fwd, seq, &mut tunnel)
            .await
            .map_err(Failed::Connection)?;
        // On its way: the peer connects the next connection after this one, whichever
        // Hello arrives first.
        release.take();
        let mut rbuf = BytesMut::with_capacity(8192);
        let reply = loop {
            match HelloReply::decode(&mut rbuf) {
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(e) => {
                    return Err(Failed::Handshake(format!(
                        "bad handshake reply from {}: {e}",
                        fwd.peer
                    )))
                }
            }
            let n = tunnel.read_buf(&mut rbuf).await.map_err(|e| {
                Failed::Connection(format!(
                    "reading handshake reply from {}: {e}",
                    fwd.peer
                ))
            })?;
            if n == 0 {
                return Err(Failed::Connection(format!(
                    "peer edge {} closed the connection during the handshake (is it a Shrinker edge with a certificate from the same CA?)",
                    fwd.peer
                )));
            }
        };
        Ok((tunnel, rbuf, reply))
    })
    .await;
    // Silence is a connection that died without a word (a path that dropped it): a
    // warm one is then worth one fresh try, as when it was reset.
    opened.unwrap_or_else(|_| {
        Err(Failed::Connection(format!(
            "peer edge {} did not complete the handshake within {:?}",
            fwd.peer, cfg.connect_timeout
        )))
    })
}

fn reset_local(local: TcpStream, msg: String) -> ConnError {
    crate::io::reset_on_close(&local);
    drop(local);
    ConnError::PeerReset(msg)
}

async fn accept_tunnels(
    shared: Arc<EdgeShared>,
    listener: TcpListener,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            p = shared.limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.cancelled() => return,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("tunnel accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let id = shared.conn_ids.fetch_add(1, Relaxed);
        let span = info_span!("tunnel", id, from = %addr);
        let (shared, stop) = (shared.clone(), stop.clone());
        tracker.spawn(
            async move {
                let _permit = permit;
                let wan = Arc::new(ConnWan::default());
                if let Err(msg) = accept_one(&shared, tcp, wan, id, stop).await {
                    shared.stats.tunnels_rejected.fetch_add(1, Relaxed);
                    warn!("rejected tunnel connection from {addr}: {msg}");
                }
            }
            .instrument(span),
        );
    }
}

/// Connects to a peer's target (`host:port`, resolved here): to the first of its
/// addresses that `--allow-target` allows and that answers, within the connect
/// timeout.
async fn connect_target(cfg: &EdgeConfig, target: &str) -> Result<TcpStream, String> {
    let deadline = Instant::now() + cfg.connect_timeout;
    let timed_out = || {
        format!(
            "connecting to {target} timed out after {:?}",
            cfg.connect_timeout
        )
    };
    let addrs: Vec<SocketAddr> = tokio::time::timeout_at(deadline, tokio::net::lookup_host(target))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .collect();
    let allowed = &cfg.allow_targets;
    let usable: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| allowed.is_empty() || allowed.iter().any(|r| r.allows(*a)))
        .collect();
    if usable.is_empty() {
        let rules: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        return Err(format!(
            "{target} ({}) is not an allowed target here (--allow-target {})",
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            rules.join(" ")
        ));
    }
    let mut last = None;
    for addr in usable {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(t)) => return Ok(t),
            Ok(Err(e)) => last = Some(format!("cannot connect to {target} ({addr}): {e}")),
            Err(_) => return Err(timed_out()),
        }
    }
    Err(last.unwrap_or_else(timed_out))
}

/// Server side: TLS, then for each proxied connection the peer opens on it (the
/// first, and each next one once the last ended cleanly: protocol v6), handshake,
/// connect to the target, relay. `Err` = rejected before relaying (counted apart from
/// failed connections).
async fn accept_one(
    shared: &Arc<EdgeShared>,
    tcp: TcpStream,
    wan: Arc<ConnWan>,
    first_id: u64,
    stop: CancellationToken,
) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let cfg = &shared.config;
    wan.set_socket(&tcp);
    let tunnel_fd = wan.socket_fd();
    let io = WanCountingIo::new(tcp, shared.stats.clone(), wan.clone());
    let secured = timeout(cfg.connect_timeout, async {
        match &shared.tls_acceptor {
            Some(a) => a
                .accept(io)
                .await
                .map(|t| Box::new(t) as Tunnel)
                .map_err(|e| format!("TLS handshake failed: {e}")),
            None => Ok(Box::new(io) as Tunnel),
        }
    })
    .await;
    let mut tunnel = match secured {
        Ok(Ok(t)) => t,
        Ok(Err(msg)) => return Err(msg),
        Err(_) => return Err(format!("no TLS handshake within {:?}", cfg.connect_timeout)),
    };
    let mut id = first_id;
    loop {
        let (result, reusable) = match serve_one(shared, tunnel, tunnel_fd, &stop).await? {
            Some(served) => served,
            None => return Ok(()),
        };
        shared.finish(id, "tunnel", result, &wan);
        match reusable {
            Some(t) => tunnel = t,
            None => return Ok(()),
        }
        // The next connection's bytes are its own.
        wan.reset();
        id = shared.conn_ids.fetch_add(1, Relaxed);
    }
}

/// One proxied connection on an accepted tunnel connection: its handshake, its target,
/// the relay. `None`: the peer closed the tunnel connection without a handshake (a
/// warm connection it did not need).
async fn serve_one(
    shared: &Arc<EdgeShared>,
    mut tunnel: Tunnel,
    tunnel_fd: Option<std::os::fd::RawFd>,
    stop: &CancellationToken,
) -> Result<Option<Relayed>, String> {
    let cfg = &shared.config;
    // The peer sends its Hello when its connection's turn comes (after the previous
    // connection of its forward sent its own, itself bounded by the connect timeout),
    // so the Hello may come up to one connect timeout after TLS, plus a round trip;
    // or the connection is the peer's warm spare, kept up to `spare::MAX_AGE`.
    let hello_within = (cfg.connect_timeout * 2).max(crate::spare::HELLO_WAIT_MIN);
    let wait_hello = timeout(hello_within, async {
        let mut rbuf = BytesMut::with_capacity(8192);
        let hello = loop {
            match Hello::decode(&mut rbuf) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => return Err(format!("bad handshake: {e}")),
            }
            let read = tunnel.read_buf(&mut rbuf).await;
            // A peer's warm spare that it closed unused (expired, or the peer shut
            // down): the connection ends before any handshake byte. Not a rejection.
            let unused = rbuf.is_empty()
                && match &read {
                    Ok(n) => *n == 0,
                    Err(e) => e.kind() == std::io::ErrorKind::UnexpectedEof,
                };
            if unused {
                return Ok(None);
            }
            let n = read.map_err(|e| format!("reading handshake: {e}"))?;
            if n == 0 {
                return Err("closed during the handshake".to_string());
            }
        };
        Ok(Some((rbuf, hello)))
    });
    // An idle connection (a warm one, or one handed back) does not hold up a stopping
    // edge: closing it tells the peer's keeper to drop it.
    let opened = tokio::select! {
        o = wait_hello => o,
        _ = stop.cancelled() => Ok(Ok(None)),
    };
    let (rbuf, hello) = match opened {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => {
            debug!("peer edge closed a warm connection it did not need");
            return Ok(None);
        }
        Ok(Err(msg)) => return Err(msg),
        Err(_) => return Err(format!("no handshake within {hello_within:?}")),
    };
    // The connection before this one in the peer's order goes to the target first.
    // Waited for half the connect timeout at most, so that the peer, which waits one
    // connect timeout for our reply, still gets it when that connection was lost.
    let order = &shared.open_order;
    if !order
        .wait_for(
            &hello.edge,
            hello.epoch,
            hello.after_seq,
            cfg.connect_timeout / 2,
        )
        .await
    {
        shared.stats.open_order_expired.fetch_add(1, Relaxed);
        debug!(
            seq = hello.open_seq,
            after = hello.after_seq,
            "the connection before this one never arrived; connecting anyway"
        );
    }
    let target = connect_target(cfg, &hello.target).await;
    order.done(&hello.edge, hello.epoch, hello.open_seq);
    let mut out = BytesMut::new();
    HelloReply {
        edge: cfg.name.clone(),
        epoch: shared.epoch,
        cache_bytes: cfg.cache_bytes,
        window: cfg.window,
        result: target.as_ref().map(|_| ()).map_err(Clone::clone),
    }
    .encode(&mut out);
    let sent = async {
        tunnel.write_all(&out).await?;
        tunnel.flush().await
    }
    .await;
    let target = match target {
        Ok(t) => t,
        Err(msg) => {
            let _ = tunnel.shutdown().await;
            return Err(format!(
                "peer edge {} asked for a target this edge cannot serve: {msg}",
                hello.edge
            ));
        }
    };
    if let Err(e) = sent {
        return Err(format!("sending handshake reply: {e}"));
    }
    let _ = target.set_nodelay(true);
    shared.stats.tunnels_accepted.fetch_add(1, Relaxed);
    shared.stats.active_connections.fetch_add(1, Relaxed);
    debug!(peer_edge = %hello.edge, target = %hello.target, seq = hello.open_seq, "tunnel accepted");
    let mut ctx = shared.ctx(&hello.edge, hello.epoch, hello.cache_bytes, hello.window);
    ctx.tunnel_fd = tunnel_fd;
    Ok(Some(pump(target, tunnel, rbuf, ctx).await))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_itself_is_recognised() {
        let any: SocketAddr = "0.0.0.0:15001".parse().unwrap();
        let one: SocketAddr = "10.0.0.1:15001".parse().unwrap();
        for (addr, listen, is) in [
            ("10.0.0.1:15001", any, true),
            ("10.9.9.9:15001", any, true),
            ("10.9.9.9:4444", any, false),
            ("10.0.0.1:15001", one, true),
            ("10.0.0.2:15001", one, false),
        ] {
            assert_eq!(
                is_listener(addr.parse().unwrap(), listen),
                is,
                "{addr} {listen}"
            );
        }
    }

    #[test]
    fn mapped_addresses_are_plain_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.2.0.5]:4444".parse().unwrap();
        assert_eq!(unmapped(mapped), "10.2.0.5:4444".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::5]:4444".parse().unwrap();
        assert_eq!(unmapped(v6), v6);
        let v4: SocketAddr = "10.2.0.5:4444".parse().unwrap();
        assert_eq!(unmapped(v4), v4);
    }

    #[tokio::test]
    async fn a_connection_not_diverted_is_refused() {
        // Connected straight to the listener: neither TPROXY (local address = the
        // listener) nor REDIRECT (no original destination) moved it, so its target
        // would be this listener again.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap();
        let _client = TcpStream::connect(listen).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let e = original_destination(&accepted, listen).unwrap_err();
        assert!(e.contains("not diverted"), "{e}");
    }
}
