//! Warm tunnel connections: TCP + TLS connections to each peer edge, made ahead of
//! need, so a new local connection skips two of the three round trips to the peer
//! (TCP, TLS). On a 20 ms WAN that is 40 ms off every migration, multifd channel and
//! NBD connection.
//!
//! The third, the handshake's, is skipped too once the peer is known ([`KnownPeers`]:
//! what its last reply said of itself): the connection sends its Hello and its data
//! without waiting for the reply (`conn::pump_early`). On a warm connection it keeps
//! a copy of what it read until the reply arrives, so that one found dead then is
//! replaced without losing a byte, as before.
//!
//! Since protocol v6 a tunnel connection that carried a proxied connection to its end
//! (both ends sent DONE) comes back to the keeper and carries the next one: no TCP or
//! TLS handshake, and the TCP window the last connection grew (a fresh one starts at
//! 10 packets and needs ~8 round trips to fill 1 Gbit/s at 20 ms; a later guest of a
//! cluster sends a few MB). Those are handed out first, the last one back first.
//!
//! A keeper task per peer owns the spares: it makes one at start-up and replaces each
//! one used, hands fresh ones out oldest first, and keeps as many as the largest burst of
//! requests since it last idled (the channels of a multifd migration open within
//! milliseconds: each finds a warm connection next time), at most [`MAX_SPARES`]. It
//! drops one the peer closes (a restarted peer) or that has idled [`MAX_AGE`] (the
//! peer waits [`HELLO_WAIT_MIN`] for a handshake on an accepted connection), and stops
//! making new ones once nobody has asked for [`KEEP_WHILE_IDLE`]. A spare can still
//! die between the keeper's last look and its use: the connection that took it then
//! connects afresh (before the reply, nothing it read is lost).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use wire::handshake::HelloReply;

use crate::edge::{EdgeShared, Tunnel};
use crate::io::ConnWan;

/// Longest a spare waits for a connection before it is closed and replaced.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(30);
/// The accepting edge waits at least this long for the handshake on a tunnel
/// connection (longer than [`MAX_AGE`], so a spare is never dropped under us).
pub(crate) const HELLO_WAIT_MIN: Duration = Duration::from_secs(60);
/// A keeper stops replacing spares once none was asked for in this long (an idle
/// edge does not hold connections open forever); the next request restarts it.
const KEEP_WHILE_IDLE: Duration = Duration::from_secs(600);
/// First delay before trying again when the peer cannot be reached (doubles up to
/// [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What a peer edge said of itself in its last handshake reply: what a connection
/// needs to know of the peer before it sends (what the peer's store holds is tracked
/// per epoch; its window bounds what it may send back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerFacts {
    pub(crate) edge: String,
    pub(crate) epoch: u64,
    pub(crate) cache_bytes: u64,
    pub(crate) window: u64,
}

impl PeerFacts {
    fn of(reply: &HelloReply) -> Self {
        PeerFacts {
            edge: reply.edge.clone(),
            epoch: reply.epoch,
            cache_bytes: reply.cache_bytes,
            window: reply.window,
        }
    }
}

/// Per peer edge address, the facts of its last reply, while there is no sign that
/// the process behind the address changed (a warm connection it closed, a connection
/// lost before its reply). Facts that turn out stale cost no correctness: references
/// to chunks a restarted peer lacks are answered with MISS and sent again (FILL).
#[derive(Default)]
pub(crate) struct KnownPeers(Mutex<HashMap<String, PeerFacts>>);

impl KnownPeers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, PeerFacts>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, peer: &str) -> Option<PeerFacts> {
        self.map().get(peer).cloned()
    }

    /// Remembers what `reply`, from the edge at `peer`, said; whether it differed
    /// from what was known.
    pub(crate) fn learn(&self, peer: &str, reply: &HelloReply) -> bool {
        let facts = PeerFacts::of(reply);
        self.map().insert(peer.to_owned(), facts.clone()) != Some(facts)
    }

    pub(crate) fn forget(&self, peer: &str) {
        self.map().remove(peer);
    }
}

/// A tunnel connection after TCP and TLS, before the handshake.
pub(crate) struct Secured {
    pub(crate) tunnel: Tunnel,
    /// Its WAN byte counts (the TLS handshake's bytes included).
    pub(crate) wan: Arc<ConnWan>,
}

/// What connections ask of a peer's keeper.
enum Request {
    /// A spare, if one is ready.
    Take(oneshot::Sender<Option<Secured>>),
    /// A tunnel connection that carried a proxied connection to its end (both ends
    /// sent DONE): idle, its TCP window open, for the next one.
    Return(Secured),
}

/// The handle connections use to ask a peer's keeper for its spare.
#[derive(Clone)]
pub(crate) struct Spares {
    requests: mpsc::Sender<Request>,
}

impl Spares {
    /// Starts the keeper for `peer` (it ends when `stop` is cancelled).
    pub(crate) fn start(
        shared: Arc<EdgeShared>,
        peer: String,
        stop: CancellationToken,
    ) -> (Spares, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(64);
        (Spares { requests: tx }, keep(shared, peer, rx, stop))
    }

    /// The spare, if one is ready: a connection an earlier one used first.
    pub(crate) async fn take(&self) -> Option<Secured> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(Request::Take(tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Hands back a tunnel connection that is idle again (`conn::pump`'s reusable
    /// tunnel): the next connection to the peer starts on it.
    pub(crate) async fn give_back(&self, used: Secured) {
        let _ = self.requests.send(Request::Return(used)).await;
    }
}

/// TCP connect and TLS handshake with `peer` (bounded by the connect timeout).
pub(crate) async fn secure(shared: &EdgeShared, peer: &str) -> Result<Secured, String> {
    let wan = Arc::new(ConnWan::default());
    let made = tokio::time::timeout(shared.config.connect_timeout, async {
        let tcp = tokio::net::TcpStream::connect(peer)
            .await
            .map_err(|e| format!("cannot connect to peer edge {peer}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        wan.set_socket(&tcp);
        let io = crate::io::WanCountingIo::new(tcp, shared.stats.clone(), wan.clone());
        let tunnel: Tunnel = match &shared.tls_connector {
            Some(c) => {
                let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Box::new(
                    c.connect(tls::server_name_for(host), io)
                        .await
                        .map_err(|e| format!("TLS handshake with peer edge {peer} failed: {e}"))?,
                )
            }
            None => Box::new(io),
        };
        Ok::<_, String>(tunnel)
    })
    .await;
    let tunnel = made.unwrap_or_else(|_| {
        Err(format!(
            "no TCP and TLS connection to peer edge {peer} within {:?}",
            shared.config.connect_timeout
        ))
    })?;
    Ok(Secured { tunnel, wan })
}

/// Most warm connections kept to one peer edge.
const MAX_SPARES: usize = 8;
/// Requests for a warm connection closer together than this are one burst: the
/// channels of one migration (main and multifd, or a postcopy preempt channel) open
/// within milliseconds of each other.
const BURST_GAP: Duration = Duration::from_millis(100);

async fn keep(
    shared: Arc<EdgeShared>,
    peer: String,
    mut requests: mpsc::Receiver<Request>,
    stop: CancellationToken,
) {
    // Handed out from the front: connections given back (their TCP window open from
    // the connection they carried, the last given back first), then fresh ones,
    // oldest first. Each with when it became idle, and whether it was used.
    let mut spares: VecDeque<(Secured, Instant, bool)> = VecDeque::new();
    let mut making: JoinSet<Result<Secured, String>> = JoinSet::new();
    // How many to keep: the largest burst of requests since the keeper last idled, so
    // that every channel of the next multifd migration finds one (up to MAX_SPARES).
    let (mut want, mut burst) = (1usize, 0usize);
    let mut last_request: Option<Instant> = None;
    let mut retry = RETRY_MIN;
    let mut next_try = Instant::now();
    let mut asked = Instant::now();
    loop {
        shared.stats.spares_idle.store(spares.len() as u64, Relaxed);
        let now = Instant::now();
        let wanted = now.duration_since(asked) < KEEP_WHILE_IDLE;
        if !wanted {
            want = 1;
        }
        let short = wanted && spares.len() + making.len() < want;
        if short && now >= next_try {
            while spares.len() + making.len() < want {
                let (shared, peer) = (shared.clone(), peer.clone());
                making.spawn(async move { secure(&shared, &peer).await });
            }
        }
        // The one idle longest expires first.
        let oldest = (0..spares.len()).min_by_key(|&i| spares[i].1);
        let expires = oldest.map(|i| spares[i].1 + MAX_AGE);
        let waiting_to_retry = short && making.is_empty() && next_try > now;
        tokio::select! {
            _ = stop.cancelled() => return,
            req = requests.recv() => {
                let reply = match req {
                    None => return,
                    Some(Request::Take(reply)) => reply,
                    Some(Request::Return(used)) => {
                        spares.push_front((used, Instant::now(), true));
                        if spares.len() > MAX_SPARES {
                            // Too many: close a fresh one (its window never opened).
                            if let Some((mut s, _, _)) = spares.pop_back() {
                                let _ = tokio::time::timeout(Duration::from_secs(1), s.tunnel.shutdown()).await;
                            }
                        }
                        continue;
                    }
                };
                let now = Instant::now();
                let close = last_request.is_some_and(|t| now.duration_since(t) < BURST_GAP);
                burst = if close { burst + 1 } else { 1 };
                last_request = Some(now);
                asked = now;
                want = want.max(burst).min(MAX_SPARES);
                let given = spares.pop_front().map(|(s, _, used)| {
                    if used {
                        shared.stats.tunnels_reused.fetch_add(1, Relaxed);
                    }
                    s
                });
                if given.is_some() {
                    shared.stats.spares_used.fetch_add(1, Relaxed);
                } else if making.is_empty() {
                    // Asked while idle or backing off: try again now.
                    next_try = now;
                }
                let _ = reply.send(given);
            }
            Some(made) = making.join_next(), if !making.is_empty() => {
                match made {
                    Ok(Ok(s)) => {
                        shared.stats.spares_made.fetch_add(1, Relaxed);
                        spares.push_back((s, Instant::now(), false));
                        retry = RETRY_MIN;
                    }
                    Ok(Err(e)) => {
                        // The connection that needs the peer reports the failure.
                        debug!(%peer, "no spare tunnel connection: {e}");
                        next_try = Instant::now() + retry;
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                    Err(e) => debug!(%peer, "making a spare tunnel connection ended: {e}"),
                }
            }
            // The peer sends nothing before our handshake: anything read (end of
            // stream, an error, bytes) means this connection is of no use.
            closed = std::future::poll_fn(|cx| poll_closed(&mut spares, cx)), if !spares.is_empty() => {
                debug!(%peer, "spare tunnel connection closed by the peer");
                spares.remove(closed);
                // Perhaps a restarted peer: the next connection waits for its reply.
                shared.known_peers.forget(&peer);
            }
            _ = sleep_until(expires.unwrap_or(now)), if expires.is_some() => {
                if let Some((mut s, _, _)) = oldest.and_then(|i| spares.remove(i)) {
                    // Close it cleanly: the peer sees an unused connection end.
                    let _ = tokio::time::timeout(Duration::from_secs(1), s.tunnel.shutdown()).await;
                }
            }
            _ = sleep_until(next_try), if waiting_to_retry => {}
        }
    }
}

/// The index of a spare whose connection the peer closed (or sent anything on).
fn poll_closed(
    spares: &mut VecDeque<(Secured, Instant, bool)>,
    cx: &mut Context<'_>,
) -> Poll<usize> {
    for (i, (s, _, _)) in spares.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        if Pin::new(&mut s.tunnel).poll_read(cx, &mut buf).is_ready() {
            return Poll::Ready(i);
        }
    }
    Poll::Pending
}
