//! The driver of one proxied connection over its tunnel connection: four futures that
//! only move bytes between sockets and the sans-IO state machines of `wire::session`.
//!
//! - **uplink**: local socket → segmenter → encoder → batch queue;
//! - **compressor**: batch queue → compression (on a blocking-pool thread for bulk
//!   batches, so it runs beside the uplink's hashing) → data queue;
//! - **downlink**: tunnel → frame decoder → decoder → local socket; MISS/ACK from the
//!   peer go to the ledger (a MISS is answered with a FILL on the control queue);
//! - **writer**: control queue (first) and data queue → tunnel.
//!
//! All but the compression run in one task. Both edges run the same driver; only the
//! handshake differs (see `edge.rs`).
//! Shutdown rule: a tunnel end closes once its decoder delivered the peer's END, its own
//! END is sent, and the peer acknowledged every byte it sent (no MISS can come any
//! more). Any error aborts all four futures, tells the peer (RESET) when the fault is
//! not the peer's, and resets the local socket (RST), so a failure is never silent.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{ReadHalf as LocalRead, WriteHalf as LocalWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wire::handshake::HelloReply;
use wire::segment::SegmenterReport;
use wire::session::{
    BatchCompressor, CompressStats, Decoder, DecoderConfig, DecoderStats, Encoder, EncoderConfig,
    EncoderStats, RawBatch, SendLedger, SessionError,
};
use wire::{
    ChunkParams, ContentStore, Frame, FrameDecoder, FrameError, GroupIndex, PeerHoldings,
    SimilarChunks,
};

use crate::budget::{StreamBudget, StreamGrant};
use crate::cpu_clock::thread_cpu_time;
use crate::delivery::DeliveryMarks;
use crate::governor::{
    CompressGovernor, Encoding, LinkHistory, LinkMeter, FAST_LEVEL, STRONG_LEVEL,
};
use crate::read_ahead::{ReadAhead, ReadAheadBudget};
use crate::stats::EdgeStats;

/// Local reads are taken in bursts up to this size: large enough to amortise hashing
/// and frame overhead, small enough to keep per-connection memory low.
const READ_CAP: usize = 256 * 1024;
/// Read buffer of a connection whose reads stay small (the sending side's ACKs, an idle
/// return path): at 256 connections, a [`READ_CAP`] buffer in each direction of each
/// was ~100 MiB of the sending edge's heap, most of it never filled.
const SMALL_READ: usize = 16 * 1024;
/// Encoded bytes gathered before a batch goes to the writer while bulk data flows.
const BATCH_TARGET: usize = 256 * 1024;
/// ...or once it stands for this many bytes of the local stream: a run of references
/// costs a byte or two per 4 KiB page, and a batch grown to `BATCH_TARGET` of those
/// would stand for more than the flow-control window (the uplink then waited for an
/// ACK of bytes it had not sent). ACKs also come sooner for smaller spans.
const BATCH_LOGICAL_TARGET: u64 = 16 << 20;
/// A burst shorter than this that ends with the socket drained is an interactive
/// message (a return-path reply, an NBD reply): flush it at once for latency.
const SMALL_BURST: usize = 16 * 1024;
/// A bulk stream that pauses mid-chunk is flushed after this long, so chunk boundaries
/// stay content-defined while data flows and nothing waits for long when it stops.
const IDLE_FLUSH: Duration = Duration::from_millis(1);
/// Resolved bytes are acknowledged at the latest this long after they resolve.
const ACK_DELAY: Duration = Duration::from_millis(2);
/// Batches queued for the tunnel writer. A non-empty queue means the link is the
/// bottleneck, which is when compression is worth its CPU.
const DATA_QUEUE: usize = 8;
/// Batches at least this large that compression will be tried on are compressed on a
/// blocking-pool thread, beside the uplink; smaller ones (interactive messages) inline,
/// where a thread hand-off would add latency for little CPU.
const OFFLOAD_MIN: usize = 64 * 1024;
/// Bytes waiting for the link (queued for the writer, plus held unsent by the tunnel
/// socket) above which a batch the governor would send raw is compressed at the fast
/// level anyway: the link has work queued for longer than compressing the batch takes,
/// so the CPU it costs is time the link does not wait for (see
/// [`spare_time_compression`]).
const SPARE_BACKLOG: u64 = 1 << 20;
/// Frames smaller than this are gathered into one write.
const COALESCE: usize = 64 * 1024;
/// Longest a writer stays silent: past it, it repeats its last ACK, which the peer
/// takes as a no-op, so a peer that hears nothing for its `--wan-timeout` knows the
/// path is down rather than this end idle. A protocol rule (v5): a peer's timeout
/// may be as short as two of these.
const HEARTBEAT_MAX: Duration = Duration::from_secs(5);

/// How often a writer with `wan_timeout` sends a heartbeat: [`HEARTBEAT_MAX`], or a
/// quarter of the timeout when that is shorter.
fn heartbeat_every(wan_timeout: Duration) -> Duration {
    (wan_timeout / 4).min(HEARTBEAT_MAX)
}

/// How long a finished connection waits for the peer's DONE (without it the tunnel
/// connection is closed, not handed back for the next one).
const LINGER: Duration = Duration::from_secs(5);
/// How long a failed tunnel keeps reading so the peer can take in our RESET.
const RESET_LINGER: Duration = Duration::from_secs(1);
/// How often deferred references (REF_RECENT the store lacked) look in the store again
/// for a chunk arriving on a sibling connection.
const DEFER_RECHECK: Duration = Duration::from_millis(1);
/// Deferred references give up and send MISS once none of them has resolved, and the
/// store has taken no new chunk, for this long. The full copy they wait for left the
/// peer within the last 2 s (`cache::RECENT_MARK`) and usually arrives within
/// milliseconds; a longer silence means it is not coming (evicted, or its connection
/// failed).
const DEFER_LIMIT: Duration = Duration::from_millis(500);
/// ... and after this long in any case. While sibling connections keep delivering, the
/// copy may be queued behind seconds of their data on a slow shared link (four
/// concurrent migrations at 100 Mbit/s: with only `DEFER_LIMIT`, 8,143 pages came
/// twice, as the copy and as a fill: 33 MB, 40% of the WAN bytes). A failed
/// connection with the same peer ends the wait at once (the copy may have been on it).
const DEFER_MAX: Duration = Duration::from_secs(10);
/// How long a sibling's failure still ends a wait for deferred references that begins
/// after it: a REF_RECENT's copy left the peer within the last 2 s
/// (`cache::RECENT_MARK`), so one that failed longer ago cannot have carried it. (Under
/// load, references sometimes began to wait just after the sibling carrying their copy
/// failed, and then waited the full 10 s.)
const FAILURE_REACH: Duration = Duration::from_secs(2);
/// Extra pending allowance over the peer's window: one read burst plus frame slack.
const PENDING_SLACK: u64 = 16 << 20;

/// Everything a connection needs from its edge.
#[derive(Clone)]
pub(crate) struct PumpCtx {
    pub(crate) store: Arc<dyn ContentStore>,
    pub(crate) peer: Arc<dyn PeerHoldings>,
    /// Where delta bases come from (`None`: no deltas).
    pub(crate) similar: Option<Arc<dyn SimilarChunks>>,
    /// Groups of block ids sent, for runs of references (`None`: one by one).
    pub(crate) groups: Option<Arc<dyn GroupIndex>>,
    /// Memory for context-keeping compression streams.
    pub(crate) streams: Arc<StreamBudget>,
    /// Memory for reading the tunnel ahead of a slow local socket.
    pub(crate) read_ahead: Arc<ReadAheadBudget>,
    /// Memory for local data read ahead of the tunnel (the uplink's side of the same
    /// rule: each connection its base, the rest edge-wide).
    pub(crate) send_ahead: Arc<ReadAheadBudget>,
    /// Bulk compressions running at once, edge-wide: two per core. More only queue for
    /// the CPU, and each running one holds a zstd context (1–3 MiB; 256 connections
    /// compressing at once held ~100 MiB of them). One per core made a 4-channel
    /// multifd migration wait for slots (median 2.79 s against 2.43 s at 1 Gbit/s).
    pub(crate) compress_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) encoder: EncoderConfig,
    pub(crate) chunk: ChunkParams,
    /// Our send window.
    pub(crate) window: u64,
    /// The peer's send window (bounds what may queue behind a miss here).
    pub(crate) peer_window: u64,
    /// The compression decisions of every connection to this peer.
    pub(crate) link_history: Arc<LinkHistory>,
    pub(crate) stats: Arc<EdgeStats>,
    /// Connections with this peer edge that failed, counted by all of them: a chunk
    /// a deferred reference here waits for may have been on one of them.
    pub(crate) peer_failures: Arc<AtomicU64>,
    /// The tunnel's TCP socket, for the kernel's view of the link (`tcp_info`); the
    /// socket lives as long as `pump` owns the tunnel. `None`: no such evidence.
    pub(crate) tunnel_fd: Option<std::os::fd::RawFd>,
    /// Longest the downlink may wait for the peer's bytes while it reads before the
    /// connection fails (`--wan-timeout`); the writer sends a heartbeat well within it.
    pub(crate) wan_timeout: Duration,
}

/// What an early open does with the peer's reply: `Err` is why the peer refused.
pub(crate) type OnReply = Box<dyn FnOnce(&HelloReply) -> Result<(), String> + Send + Sync>;

/// A connection that sends before the peer's handshake reply has arrived (one WAN
/// round trip sooner): the downlink reads the reply before the first frame.
pub(crate) struct EarlyOpen {
    /// Called with the reply when it arrives (dropped uncalled when it never does);
    /// `Err` is why the peer refused, and fails the connection.
    pub(crate) on_reply: OnReply,
    /// How long the reply may take.
    pub(crate) reply_within: Duration,
    /// Keep a copy of what is read from the local socket until the reply arrives, so
    /// that a tunnel connection lost before it (a warm connection that died unseen)
    /// can be replaced without losing those bytes ([`Ended::Unanswered`]).
    pub(crate) keep_until_reply: bool,
}

/// How [`pump_early`] ended.
// Returned once per connection: its size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Ended {
    /// Relayed to the end, or failed loudly (the local socket reset).
    Relayed(Result<Outcome, ConnError>),
    /// The tunnel connection was lost before the peer's reply, and every byte read
    /// from `local` is in `read`: nothing was written to `local` and the peer never
    /// answered, so the connection can start over on a new tunnel connection,
    /// `read` first ([`pump_replaying`]).
    Unanswered {
        local: TcpStream,
        read: Bytes,
        cause: ConnError,
    },
}

/// What a finished connection did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) enc: EncoderStats,
    pub(crate) seg: SegmenterReport,
    pub(crate) dec: DecoderStats,
    pub(crate) lan_in: u64,
    pub(crate) lan_out: u64,
    pub(crate) fills_sent: u64,
    /// The tunnel socket's kernel state at the end (how long its windows held it
    /// back, its round trip), when it is a TCP socket.
    pub(crate) tunnel_path: Option<tcp_info::PathSample>,
}

/// Why a proxied connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("reading from the local side failed: {0}")]
    LocalRead(io::Error),
    #[error("writing to the local side failed: {0}")]
    LocalWrite(io::Error),
    #[error("reading from the tunnel failed: {0}")]
    TunnelRead(io::Error),
    #[error("writing to the tunnel failed: {0}")]
    TunnelWrite(io::Error),
    #[error("the peer edge closed the tunnel mid-stream")]
    TunnelClosed,
    #[error("malformed tunnel data from the peer edge: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation by the peer edge: {0}")]
    Session(#[from] SessionError),
    #[error("the peer edge reset the connection: {0}")]
    PeerReset(String),
    #[error("the peer edge sent nothing for {0:?}, not even a heartbeat: the WAN path is down or drops everything (--wan-timeout)")]
    PeerSilent(Duration),
    #[error("compressing a batch for the tunnel failed: {0}")]
    Compressor(String),
    #[error("aborted")]
    Aborted,
}

impl ConnError {
    /// Whether to tell the peer with a RESET (it does not know yet).
    fn tell_peer(&self) -> bool {
        matches!(
            self,
            ConnError::LocalRead(_)
                | ConnError::LocalWrite(_)
                | ConnError::Frame(_)
                | ConnError::Session(_)
                | ConnError::Compressor(_)
                | ConnError::PeerSilent(_)
        )
    }

    /// Whether the local side (not the peer edge or this edge) caused it.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, ConnError::LocalRead(_) | ConnError::LocalWrite(_))
    }
}

struct Shared {
    ledger: Mutex<SendLedger>,
    /// Signalled by the downlink on every ACK (the uplink may be waiting for window).
    acked: Notify,
    /// Signalled by the compressor when END is queued for the writer.
    uplink_finished: Notify,
    uplink_done: AtomicBool,
    abort: CancellationToken,
    error: Mutex<Option<ConnError>>,
    lan_in: AtomicU64,
    /// Local bytes whose frames the writer has handed to the tunnel (the stream offset
    /// of the last batch written): `lan_in` minus this is what the connection holds
    /// on the way out.
    written: AtomicU64,
    /// Signalled by the writer after each batch (the uplink may wait for memory).
    wrote: Notify,
    lan_out: AtomicU64,
    fills_sent: AtomicU64,
    /// Wire bytes handed to the writer and not yet written to the tunnel.
    queued: AtomicU64,
    /// Every connection to the same peer records its writes here: the governor reads
    /// the link's pace from all of them together.
    peer_link: Arc<LinkHistory>,
    /// This connection's own writes to the tunnel (the governor's kernel-buffer
    /// allowance counts them).
    own_link: LinkMeter,
    /// The batches queued for the tunnel and not yet acknowledged (the governor's
    /// measure of what queues on the way to the peer).
    delivery: DeliveryMarks,
    /// See [`PumpCtx::peer_failures`].
    peer_failures: Arc<AtomicU64>,
    /// The model of what the peer holds, and the edge's counters: a failed connection
    /// takes back what it claimed the peer would store.
    peer: Arc<dyn PeerHoldings>,
    stats: Arc<EdgeStats>,
    /// Until the peer's handshake reply arrives on an early open, a copy of every byte
    /// read from the local socket ([`EarlyOpen::keep_until_reply`]), and its length:
    /// memory the connection holds.
    kept: Mutex<Option<BytesMut>>,
    kept_len: AtomicU64,
}

impl Shared {
    fn ledger(&self) -> MutexGuard<'_, SendLedger> {
        // A panic while holding the lock would already have aborted the connection.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer may never have stored the chunks this connection sent whole or as
    /// deltas past its last ACK: forgets them in the model of the peer, so that later
    /// connections send them again instead of references that wait for a copy that is
    /// not coming and then cost a MISS/FILL round trip.
    fn forget_unacknowledged(&self) {
        let ledger = self.ledger();
        let mut forgotten = 0u64;
        for id in ledger.unacknowledged_carried() {
            self.peer.forget(id);
            forgotten += 1;
        }
        drop(ledger);
        self.stats
            .peer_chunks_forgotten
            .fetch_add(forgotten, Relaxed);
    }

    /// What the connection holds between its local socket and the tunnel: read and
    /// not yet written to the tunnel, plus the copy kept until the peer's reply.
    fn held_to_send(&self) -> u64 {
        self.lan_in
            .load(Relaxed)
            .saturating_sub(self.written.load(Relaxed))
            + self.kept_len.load(Relaxed)
    }

    /// The peer's reply arrived: the copy kept for a new tunnel is no longer needed.
    fn answer(&self) {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.kept_len.store(0, Relaxed);
        // The uplink may be waiting for memory that copy held.
        self.wrote.notify_one();
    }

    /// Records the first error, asks the peer to reset when it does not know, and
    /// aborts the other futures.
    fn fail(&self, err: ConnError, ctrl: &mpsc::UnboundedSender<Frame>) -> ConnError {
        if matches!(err, ConnError::Aborted) {
            return err;
        }
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            if err.tell_peer() {
                let _ = ctrl.send(Frame::Reset(err.to_string()));
            }
            *slot = Some(err);
            // Sibling connections stop waiting for chunks this one may have carried.
            self.peer_failures.fetch_add(1, Relaxed);
            drop(slot);
            self.forget_unacknowledged();
        } else {
            drop(slot);
        }
        self.abort.cancel();
        ConnError::Aborted
    }
}

/// Relays `local` over `tunnel` until both directions are delivered, or fails loudly.
/// `leftover` holds tunnel bytes read past the handshake. With the outcome, the tunnel
/// connection when it may carry another proxied connection (both ends sent DONE and
/// nothing followed).
pub(crate) async fn pump<T>(
    local: TcpStream,
    tunnel: T,
    leftover: BytesMut,
    ctx: PumpCtx,
) -> (Result<Outcome, ConnError>, Option<T>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin,
{
    pump_replaying(local, tunnel, leftover, ctx, Bytes::new()).await
}

/// [`pump`] for a connection whose Hello is sent and whose reply is still to come:
/// local bytes flow at once.
pub(crate) async fn pump_early<T>(
    local: TcpStream,
    tunnel: T,
    ctx: PumpCtx,
    early: EarlyOpen,
) -> (Ended, Option<T>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin,
{
    relay(
        local,
        tunnel,
        BytesMut::new(),
        ctx,
        Some(early),
        Bytes::new(),
    )
    .await
}

/// [`pump`] for a connection that starts over after [`Ended::Unanswered`]: `read` is
/// relayed first, as if read from `local` again.
pub(crate) async fn pump_replaying<T>(
    local: TcpStream,
    tunnel: T,
    leftover: BytesMut,
    ctx: PumpCtx,
    read: Bytes,
) -> (Result<Outcome, ConnError>, Option<T>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin,
{
    match relay(local, tunnel, leftover, ctx, None, read).await {
        (Ended::Relayed(r), reusable) => (r, reusable),
        (Ended::Unanswered { .. }, _) => unreachable!("only an early open ends unanswered"),
    }
}

async fn relay<T>(
    mut local: TcpStream,
    tunnel: T,
    leftover: BytesMut,
    ctx: PumpCtx,
    early: Option<EarlyOpen>,
    replay: Bytes,
) -> (Ended, Option<T>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin,
{
    // The socket's counters so far: a reused tunnel connection reports this
    // connection's share.
    let path_start = ctx.tunnel_fd.and_then(tcp_info::sample_fd);
    let (mut tr, mut tw) = tokio::io::split(tunnel);
    let keep = early.as_ref().is_some_and(|e| e.keep_until_reply);
    let shared = Shared {
        // Acknowledged chunks and groups become known stored: runs of references
        // follow only such groups.
        ledger: Mutex::new(SendLedger::new().confirming(ctx.peer.clone())),
        acked: Notify::new(),
        uplink_finished: Notify::new(),
        uplink_done: AtomicBool::new(false),
        abort: CancellationToken::new(),
        error: Mutex::new(None),
        // Replayed bytes count as read: they were, by the connection this one replaces.
        lan_in: AtomicU64::new(replay.len() as u64),
        written: AtomicU64::new(0),
        wrote: Notify::new(),
        lan_out: AtomicU64::new(0),
        fills_sent: AtomicU64::new(0),
        queued: AtomicU64::new(0),
        peer_link: ctx.link_history.clone(),
        own_link: LinkMeter::default(),
        delivery: DeliveryMarks::new(ctx.link_history.clone()),
        peer_failures: ctx.peer_failures.clone(),
        peer: ctx.peer.clone(),
        stats: ctx.stats.clone(),
        kept: Mutex::new(keep.then(BytesMut::new)),
        kept_len: AtomicU64::new(0),
    };
    let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel::<Frame>();
    // Wire bytes of a batch, and the local stream offset it ends at.
    let (data_tx, data_rx) = mpsc::channel::<(Bytes, u64)>(DATA_QUEUE);
    // One batch waits while the previous one is compressed.
    let (batch_tx, batch_rx) = mpsc::channel::<TakenBatch>(1);
    let governor = Mutex::new(CompressGovernor::new(
        Instant::now(),
        ctx.link_history.clone(),
    ));
    let (enc, mut dec) = {
        let (mut lr, mut lw) = local.split();
        let up = uplink(
            &mut lr,
            replay,
            batch_tx,
            ctrl_tx.clone(),
            &shared,
            &ctx,
            &governor,
        );
        let squeeze = compressor(batch_rx, data_tx, ctrl_tx.clone(), &shared, &ctx, &governor);
        let down = downlink(&mut tr, &mut lw, leftover, early, ctrl_tx, &shared, &ctx);
        let write = writer(
            &mut tw,
            ctrl_rx,
            data_rx,
            &shared,
            heartbeat_every(ctx.wan_timeout),
        );
        let (up, squeezed, down, _) = tokio::join!(up, squeeze, down, write);
        let up = match (up, squeezed) {
            (Ok((mut enc, seg)), Ok(c)) => {
                enc.add_compression(&c);
                Ok((enc, seg))
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        (up, down)
    };
    let error = shared
        .error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    // Completed: our DONE is sent; the peer's (read by the downlink, or still to
    // come behind its last heartbeats) makes the connection idle and reusable.
    let mut reusable = false;
    if let (None, Ok(end)) = (&error, &mut dec) {
        let rbuf = std::mem::take(&mut end.rbuf);
        reusable = if end.peer_done {
            // Nothing may follow it: the next bytes are the next Hello's.
            rbuf.is_empty()
        } else {
            await_done(&mut tr, rbuf).await
        };
    }
    // After a failure our RESET is sent: read until the peer closes too before
    // closing the socket. Closing with unread data would make the kernel send RST,
    // which can destroy our last frames before the peer reads them.
    let linger = match &error {
        Some(e) if e.tell_peer() => Some(RESET_LINGER),
        _ => None,
    };
    if let Some(limit) = linger {
        let _ = tokio::time::timeout(limit, async {
            let mut sink = vec![0u8; 64 * 1024];
            while let Ok(n) = tr.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
    if let Some(err) = error {
        // The tunnel connection was lost before the peer answered, with a copy of all
        // that was read: nothing reached the local side, so the caller can start over.
        let lost = matches!(
            err,
            ConnError::TunnelRead(_) | ConnError::TunnelWrite(_) | ConnError::TunnelClosed
        );
        let kept = shared.kept.lock().unwrap_or_else(|p| p.into_inner()).take();
        // (A copy is kept only until the reply.)
        if let (true, Some(read)) = (lost, kept) {
            let ended = Ended::Unanswered {
                local,
                read: read.freeze(),
                cause: err,
            };
            return (ended, None);
        }
        // RST, not FIN: the local application must see that the stream broke.
        crate::io::reset_on_close(&local);
        return (Ended::Relayed(Err(err)), None);
    }
    let (enc, seg) = enc.unwrap_or_default();
    // The socket is still open (`tr` and `tw` own it until this returns).
    let tunnel_path = ctx
        .tunnel_fd
        .and_then(tcp_info::sample_fd)
        .map(|end| path_start.map_or(end, |start| end.since(&start)));
    let ended = Ended::Relayed(Ok(Outcome {
        tunnel_path,
        enc,
        seg,
        dec: dec.map(|end| end.stats).unwrap_or_default(),
        lan_in: shared.lan_in.load(Relaxed),
        lan_out: shared.lan_out.load(Relaxed),
        fills_sent: shared.fills_sent.load(Relaxed),
    }));
    (ended, reusable.then(|| tr.unsplit(tw)))
}

/// How the downlink ended a completed connection.
#[derive(Default)]
struct DownlinkEnd {
    stats: DecoderStats,
    /// Tunnel bytes read and not decoded (empty unless the peer misbehaved).
    rbuf: BytesMut,
    /// The peer's DONE was read (nothing after it was decoded).
    peer_done: bool,
}

/// After a completed connection whose peer's DONE was not read yet: reads it (behind
/// heartbeat ACKs at most) within [`LINGER`]. Whether it came, alone: the tunnel
/// connection is then idle and may carry the next proxied connection.
async fn await_done<R: AsyncRead + Unpin>(tr: &mut R, mut rbuf: BytesMut) -> bool {
    let mut fdec = FrameDecoder::new();
    let read = tokio::time::timeout(LINGER, async {
        loop {
            loop {
                match fdec.decode(&mut rbuf) {
                    Ok(Some(Frame::Ack(_))) => {}
                    Ok(Some(Frame::Done)) => return rbuf.is_empty(),
                    Ok(Some(_)) | Err(_) => return false,
                    Ok(None) => break,
                }
            }
            match tr.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    })
    .await;
    read.unwrap_or(false)
}

/// A batch the uplink took, with how to compress it (decided when it was taken).
struct TakenBatch {
    batch: RawBatch,
    level: i32,
    /// The link limits: compression is wanted (`auto`).
    limited: bool,
    /// Try it even while compression is backing off.
    persistent: bool,
    /// The stream offset the batch ends at (what the peer's ACK for it will say).
    stream_end: u64,
    /// A stream granted with this batch: compress it and the following ones as pieces
    /// of one stream.
    grant: Option<StreamGrant>,
}

/// Makes room for the next read: [`READ_CAP`] once reads come that large (half of
/// [`SMALL_READ`] or more), [`SMALL_READ`] while they stay small.
fn reserve_read(buf: &mut BytesMut, last_read: usize) {
    let want = if last_read >= SMALL_READ / 2 {
        READ_CAP
    } else {
        SMALL_READ
    };
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
}

fn lock_governor(g: &Mutex<CompressGovernor>) -> MutexGuard<'_, CompressGovernor> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

async fn uplink(
    lr: &mut LocalRead<'_>,
    mut replay: Bytes,
    batch_tx: mpsc::Sender<TakenBatch>,
    ctrl_tx: mpsc::UnboundedSender<Frame>,
    shared: &Shared,
    ctx: &PumpCtx,
    governor: &Mutex<CompressGovernor>,
) -> Result<(EncoderStats, SegmenterReport), ConnError> {
    let mut seg = wire::segment::detecting_segmenter(ctx.chunk);
    let (mut batches, mut limited_batches) = (0u64, 0u64);
    let always = ctx.encoder.compress == wire::session::CompressMode::Always;
    // `off`: no zstd on the WAN at all, so neither zstd deltas nor a compression
    // stream (its memory would be reserved for nothing).
    let off = ctx.encoder.compress == wire::session::CompressMode::Off;
    let mut enc = Encoder::new(ctx.peer.clone(), ctx.encoder.clone());
    if let Some(similar) = &ctx.similar {
        enc = enc.with_deltas(similar.clone());
    }
    if let Some(groups) = &ctx.groups {
        enc = enc.with_groups(groups.clone());
    }
    // Whether the compressor holds a stream grant (returned when the connection ends).
    let mut stream_granted = false;
    let mut buf = BytesMut::new();
    let mut last_read = 0;
    let mut segs = Vec::new();
    let mut send_ahead = ReadAhead::new(ctx.send_ahead.clone());
    let fail = |e| shared.fail(e, &ctrl_tx);
    let mut eof = false;
    while !eof {
        // Flow control: the ledger pins every reference until acknowledged. What is
        // encoded but not yet sent counts as in flight too: it is sent first, or the
        // wait would be for an ACK of bytes the peer never got (bytes read but not yet
        // encoded do not count, and stay for the segmenter).
        let wait_start = Instant::now();
        let (mut counted, mut must_flush, mut window_full) = (false, false, false);
        loop {
            if shared.ledger().in_flight() <= ctx.window {
                break;
            }
            if enc.batch_len() > 0 {
                window_full = true;
                break;
            }
            tokio::select! {
                _ = shared.acked.notified() => {}
                _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
            }
        }
        // Memory: what this connection holds between its local socket and the tunnel
        // (read, encoded, queued, being compressed) beyond its base must be covered by
        // the edge's send-ahead budget; at 256 concurrent connections, each queueing
        // batches faster than the tunnels took them, the sending edge's heap grew past
        // 1 GiB. Refused, the connection sends what it has and waits for its own
        // writer, which needs nothing from other connections: every connection always
        // keeps its base, so none can starve another.
        // (A full window already sends what is here.)
        if !window_full {
            loop {
                let held = shared.held_to_send();
                send_ahead.drained(held);
                if send_ahead.may_read(held) {
                    break;
                }
                if !counted {
                    ctx.stats.send_ahead_waits.fetch_add(1, Relaxed);
                    counted = true;
                }
                if !buf.is_empty() || enc.batch_len() > 0 {
                    must_flush = true;
                    break;
                }
                tokio::select! {
                    _ = shared.wrote.notified() => {}
                    _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
                }
            }
        }
        // Both waits (window, then memory) in one report: each is for the link.
        lock_governor(governor).waited(wait_start.elapsed());
        reserve_read(&mut buf, last_read);
        let read_start = Instant::now();
        let before = buf.len();
        // A replayed connection's bytes come first, a read's worth at a time (already
        // counted in `lan_in` and the edge's counters).
        let replayed = !(must_flush || window_full || replay.is_empty());
        if replayed {
            let n = replay.len().min(READ_CAP);
            buf.extend_from_slice(&replay.split_to(n));
            last_read = n;
        }
        let first = if must_flush || window_full || replayed {
            // Out of memory or window to read more: send what is here.
            None
        } else if buf.is_empty() && enc.batch_len() == 0 {
            tokio::select! {
                r = lr.read_buf(&mut buf) => Some(r),
                _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
            }
        } else {
            tokio::select! {
                r = tokio::time::timeout(IDLE_FLUSH, lr.read_buf(&mut buf)) => r.ok(),
                _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
            }
        };
        lock_governor(governor).source_waited(read_start.elapsed());
        let (mut burst, mut flush) = match first {
            // Replayed bytes are cut where their content says, as when first read.
            None if replayed => (0, false),
            // The stream paused mid-chunk: cut what we have.
            None => (0, true),
            Some(Ok(0)) => {
                eof = true;
                (0, true)
            }
            Some(Ok(n)) => (n, false),
            Some(Err(e)) => return Err(fail(ConnError::LocalRead(e))),
        };
        if burst > 0 {
            // Take whatever else is already there, without waiting.
            while buf.len() < READ_CAP {
                match lr.try_read_buf(&mut buf) {
                    Ok(0) => {
                        eof = true;
                        flush = true;
                        break;
                    }
                    Ok(n) => burst += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        flush |= burst < SMALL_BURST;
                        break;
                    }
                    Err(e) => return Err(fail(ConnError::LocalRead(e))),
                }
            }
            last_read = burst;
            shared.lan_in.fetch_add(burst as u64, Relaxed);
            ctx.stats.lan_bytes_in.fetch_add(burst as u64, Relaxed);
            if let Some(kept) = shared
                .kept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                kept.extend_from_slice(&buf[before..]);
                shared.kept_len.store(kept.len() as u64, Relaxed);
            }
        }
        // A full window sends the batch but leaves a partial block for the next read.
        seg.segment(&mut buf, flush && !window_full, &mut segs);
        if !segs.is_empty() {
            enc.handle_segments(&mut segs, &mut shared.ledger());
        }
        if eof {
            enc.handle_end();
        }
        // While bulk data keeps coming, let the batch grow to a full batch: one zstd
        // frame over more neighbouring chunks compresses better and costs fewer
        // writes. Idle input (the 1 ms flush above), small messages and the end send
        // at once.
        if !flush && enc.batch_len() < BATCH_TARGET && enc.batch_logical() < BATCH_LOGICAL_TARGET {
            continue;
        }
        let (encoding, every_try, transforms_pay) = {
            let mut g = lock_governor(governor);
            g.set_reply_paced(seg.awaits_replies());
            // One getsockopt per batch, a system call beside a batch's hashing and
            // compression: the peer-wide meter of what the path took stays as fresh
            // as the batches.
            g.observe_path(ctx.tunnel_fd.and_then(tcp_info::sample_fd));
            let e = g.encoding(Instant::now(), shared.peer_link.meter(), &shared.own_link);
            (e, g.worth_every_try(), g.worth_transforms())
        };
        let limited = encoding != Encoding::Raw;
        // `auto` picks the level by the link's pace; `always` asks for few bytes
        // whatever the CPU cost (at least the strong level, the deep one when the link
        // is that slow). zstd deltas cost two compressions per chunk with a similar
        // base: only when the link is far slower than compression (or `always`).
        let level = match encoding {
            Encoding::Zstd(level) => level,
            Encoding::Raw => FAST_LEVEL,
        };
        let level = if always {
            level.max(STRONG_LEVEL)
        } else {
            level
        };
        enc.set_level(level);
        let thorough = !off && level >= STRONG_LEVEL;
        enc.set_thorough(thorough);
        // Deltas, word differences and branch targets cost CPU per new chunk (the
        // sketch, the price pass, the scan) to save bytes that only a link far slower
        // than compression turns into time: while the link's known pace is within
        // reach of the fast level (1 Gbit/s here), they run only where that pace is
        // unknown yet and a tunnel socket has held bytes back. (At 1 Gbit/s, with
        // them in every batch the link limited, the four guests took a median of
        // 1.81 s against 1.695 s, the edges' CPU 1.26-2.36 s against 1.35-1.61 s; at
        // 100 Mbit/s the link is slow and nothing changes.) Word differences and
        // branch targets only help compressed batches.
        let slow = limited && transforms_pay;
        enc.set_deltas(always || slow);
        let transforms = !off && (always || slow);
        enc.set_words(transforms);
        enc.set_branches(transforms);
        // Compressing with history needs a stream: ask once the link limits.
        let grant = if (always || limited) && !off && !stream_granted {
            ctx.streams.take()
        } else {
            None
        };
        stream_granted |= grant.is_some();
        batches += 1;
        limited_batches += u64::from(limited);
        if let Some(batch) = enc.take_raw_batch() {
            let taken = TakenBatch {
                batch,
                level,
                limited,
                // A link far slower than compression is worth every try, at whatever
                // level the CPU allows (with the CPU ceiling at the fast level, the
                // back-off skipped 34 batches of four guests over 100 Mbit/s), and so
                // is a link not measured yet (`CompressGovernor::worth_every_try`).
                persistent: thorough || (!off && limited && every_try),
                stream_end: shared.ledger().sent(),
                grant,
            };
            // A wait here is for the compressor (the CPU) or, behind it, the link:
            // the compressor measures the link's part itself.
            tokio::select! {
                r = batch_tx.send(taken) => if r.is_err() { return Err(ConnError::Aborted) },
                _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
            }
        }
    }
    tracing::debug!(
        governor = ?*lock_governor(governor),
        limited_batches,
        batches,
        "uplink finished"
    );
    Ok((enc.stats(), seg.report()))
}

/// Compresses the uplink's batches one at a time, in order (a stream's pieces chain),
/// and queues them for the writer. Bulk batches are compressed on a blocking-pool
/// thread, so compression runs on another core while the uplink hashes and encodes the
/// next batch: on a link-limited connection compression is about half of the sender's
/// CPU, and the uplink alone kept one core busy while the other idled.
async fn compressor(
    mut batch_rx: mpsc::Receiver<TakenBatch>,
    data_tx: mpsc::Sender<(Bytes, u64)>,
    ctrl_tx: mpsc::UnboundedSender<Frame>,
    shared: &Shared,
    ctx: &PumpCtx,
    governor: &Mutex<CompressGovernor>,
) -> Result<CompressStats, ConnError> {
    let mut comp = BatchCompressor::new(ctx.encoder.compress, ctx.encoder.level);
    // Held while the compressor keeps a stream (returned when the connection ends).
    let mut _grant: Option<StreamGrant> = None;
    let mut end_sent = false;
    loop {
        let taken = tokio::select! {
            t = batch_rx.recv() => t,
            _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
        };
        let Some(taken) = taken else { break };
        let raw = taken.batch.len();
        let spare = !taken.limited
            && raw >= OFFLOAD_MIN
            && ctx.encoder.compress == wire::session::CompressMode::Auto
            && spare_time_compression(shared, ctx);
        if spare {
            ctx.stats.spare_batches.fetch_add(1, Relaxed);
        }
        comp.set_level(if spare { FAST_LEVEL } else { taken.level });
        comp.set_persistent(taken.persistent);
        if let Some(grant) = taken.grant {
            comp.set_stream(Some(grant.window_log()));
            _grant = Some(grant);
        }
        let (limited, taken_end) = (taken.limited || spare, taken.stream_end);
        end_sent |= taken.batch.end();
        let attempts = comp.stats().attempts();
        let (done, out, took) = if raw >= OFFLOAD_MIN && comp.may_try(limited) {
            let slot = tokio::select! {
                s = ctx.compress_slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => return Err(ConnError::Aborted),
                },
                _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
            };
            let job = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                let (started, cpu) = (std::time::Instant::now(), thread_cpu_time());
                let out = comp.compress(taken.batch, limited);
                (comp, out, (started.elapsed(), thread_cpu_time() - cpu))
            });
            tokio::select! {
                r = job => match r {
                    Ok(done) => done,
                    Err(e) => {
                        return Err(shared.fail(ConnError::Compressor(e.to_string()), &ctrl_tx))
                    }
                },
                _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
            }
        } else {
            let (started, cpu) = (Instant::now(), thread_cpu_time());
            let out = comp.compress(taken.batch, limited);
            (comp, out, (started.elapsed(), thread_cpu_time() - cpu))
        };
        comp = done;
        shared.delivery.queued(taken_end, out.len());
        shared.queued.fetch_add(out.len() as u64, Relaxed);
        if comp.stats().attempts() > attempts {
            lock_governor(governor).record(raw, comp.level(), took.0, took.1);
        }
        let send_start = Instant::now();
        tokio::select! {
            r = data_tx.send((out, taken_end)) => if r.is_err() { return Err(ConnError::Aborted) },
            _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
        }
        lock_governor(governor).waited(send_start.elapsed());
    }
    // The uplink ended: normally after END, which is now queued for the writer.
    if end_sent {
        shared.uplink_done.store(true, Relaxed);
        shared.uplink_finished.notify_one();
    }
    Ok(comp.stats().clone())
}

/// Whether the link has more work queued ahead of this connection's next batch than
/// compressing the batch takes ([`SPARE_BACKLOG`]): then a batch the governor would
/// send raw (the CPU, not the link, looks like the limit) is compressed at the fast
/// level, in time the link spends on what is queued. Compression then runs exactly
/// while the link is busy and stops when it would starve it, whichever of the two is
/// short: on a fast link with a busy CPU (1 Gbit/s, two cores shared with both
/// QEMUs), a first guest's new pages went out raw and the link, not the CPU, set its
/// time.
fn spare_time_compression(shared: &Shared, ctx: &PumpCtx) -> bool {
    link_backlog_exceeds(SPARE_BACKLOG, shared.queued.load(Relaxed), || {
        ctx.tunnel_fd
            .and_then(tcp_info::sample_fd)
            .map(|p| p.notsent)
    })
}

/// Whether `queued` bytes (handed to the writer) plus what the tunnel socket holds
/// unsent reach `limit`; the socket is asked (a system call) only when `queued` alone
/// does not, and counts as empty where it cannot tell.
fn link_backlog_exceeds(limit: u64, queued: u64, unsent: impl FnOnce() -> Option<u64>) -> bool {
    queued >= limit || queued + unsent().unwrap_or(0) >= limit
}

async fn downlink<T: AsyncRead>(
    tr: &mut ReadHalf<T>,
    lw: &mut LocalWrite<'_>,
    mut rbuf: BytesMut,
    early: Option<EarlyOpen>,
    ctrl_tx: mpsc::UnboundedSender<Frame>,
    shared: &Shared,
    ctx: &PumpCtx,
) -> Result<DownlinkEnd, ConnError> {
    let fail = |e| shared.fail(e, &ctrl_tx);
    let mut peer_window = ctx.peer_window;
    if let Some(early) = early {
        let reply = match read_reply(tr, &mut rbuf, &early, shared).await {
            Ok(r) => r,
            Err(e) => return Err(fail(e)),
        };
        peer_window = reply.window;
        if let Err(msg) = (early.on_reply)(&reply) {
            return Err(fail(ConnError::PeerReset(msg)));
        }
        shared.answer();
    }
    let mut fdec = FrameDecoder::new();
    let mut dec = Decoder::new(
        ctx.store.clone(),
        DecoderConfig {
            ack_interval: 1 << 20,
            max_pending: peer_window.saturating_add(PENDING_SLACK),
        },
    );
    let mut local_shut = false;
    let mut ack_deadline: Option<Instant> = None;
    // Deferred references: when to give up waiting, and progress seen so far.
    let mut defer_deadline: Option<Instant> = None;
    let mut deferred_arrived = 0u64;
    // When the oldest deferred reference began waiting, and the store's insert count
    // when progress was last seen.
    let mut defer_started: Option<Instant> = None;
    let mut store_inserted = 0u64;
    // Failed connections with the peer as last taken into account, and when that count
    // was last brought up to date while nothing waited: a sibling that failed shortly
    // before references begin to wait (the copy they wait for may have been on it)
    // still ends their wait at once.
    let mut failures_seen = ctx.peer_failures.load(Relaxed);
    // ... and the count at that time, which becomes `failures_seen` at the next update:
    // a failure counts for at least FAILURE_REACH.
    let mut failures_at_sync = failures_seen;
    let mut failures_synced = Instant::now();
    let mut tunnel_eof = false;
    // The peer's DONE: it has sent all it will on this connection (and by when this
    // side must be complete too).
    let mut peer_done = false;
    let mut done_deadline: Option<Instant> = None;
    let mut outq: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    // Bytes in `outq`, and the memory this connection may take to read ahead of them.
    let mut held = 0u64;
    let mut read_ahead = ReadAhead::new(ctx.read_ahead.clone());
    // Size of the last tunnel read (see `reserve_read`).
    let mut last_read = 0;
    // Data frames decoded from one read, handed to the decoder together (their chunks
    // hashed side by side) before any control frame that follows them.
    let mut data_frames: Vec<Frame> = Vec::new();
    // A protocol error is acted on after delivering what preceded it: nothing more is
    // read or decoded, the output queued before it is written, then the connection
    // fails.
    let mut broken: Option<ConnError> = None;
    // Bytes written to the local socket (the logical offset the peer's ACKs count),
    // and the ACKs the decoder gave that wait for them, oldest first: the peer learns
    // that bytes are delivered only once they are in the local socket, as when
    // nothing was read ahead (its connection completes on our final ACK). Each goes
    // as soon as the socket took its bytes, so the peer's window keeps moving while
    // we read ahead.
    let mut written = 0u64;
    let mut acks_held: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    // When deferred references are next looked at again: a deadline kept across loop
    // passes, so that frequent writes do not keep putting it off.
    let mut next_recheck = Instant::now();
    // Since when the downlink has listened to the tunnel without hearing from it: a
    // pass that does not read (its local side is slow to take what it holds) starts
    // the count again, since the silence was then ours.
    let mut quiet_since = Instant::now();
    loop {
        while broken.is_none() && !peer_done {
            let frame = match fdec.decode(&mut rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e.into());
                    break;
                }
            };
            if frame.is_data() {
                data_frames.push(frame);
                continue;
            }
            if let Err(e) = dec.handle_frames(&mut data_frames) {
                broken = Some(e.into());
                break;
            }
            match frame {
                Frame::Miss(_) | Frame::Ack(_) => {
                    let ack = match frame {
                        Frame::Ack(offset) => Some(offset),
                        _ => None,
                    };
                    let reply = shared.ledger().handle_control(frame);
                    match reply {
                        Ok(Some(fill)) => {
                            shared.fills_sent.fetch_add(1, Relaxed);
                            let _ = ctrl_tx.send(fill);
                        }
                        Ok(None) => {}
                        Err(e) => return Err(fail(e.into())),
                    }
                    if let Some(offset) = ack {
                        shared.delivery.acked(offset);
                        shared.acked.notify_one();
                    }
                }
                Frame::Reset(reason) => return Err(fail(ConnError::PeerReset(reason))),
                // Nothing is decoded after it (it is the peer's last frame). A peer
                // sends it once it has all we sent and we have all it sent: the checks
                // below end the connection at once, or it counts as closed.
                Frame::Done => {
                    peer_done = true;
                    done_deadline = Some(Instant::now() + LINGER);
                }
                // The decoder refuses what is neither data nor control.
                other => {
                    if let Err(e) = dec.handle_frame(other) {
                        broken = Some(e.into());
                        break;
                    }
                }
            }
        }
        // What preceded a decode error is delivered before the error is acted on.
        if let Err(e) = dec.handle_frames(&mut data_frames) {
            broken.get_or_insert(e.into());
        }
        // Everything resolved goes out in as few writes as possible: a page arrives as
        // a small literal (its record header) and a chunk, and one write each cost two
        // syscalls per 4 KiB page.
        // They are written while the tunnel is read further (`read_ahead`): a chunk
        // behind them may be what a sibling connection's application waits for.
        while let Some(out) = dec.poll_output() {
            held += out.len() as u64;
            outq.push_back(out);
        }
        if outq.is_empty() {
            if let Some(e) = broken.take() {
                return Err(fail(e));
            }
        }
        while let Some(c) = dec.poll_control() {
            match c {
                Frame::Ack(offset) => acks_held.push_back(offset),
                other => {
                    let _ = ctrl_tx.send(other);
                }
            }
        }
        let mut ack = None;
        while let Some(offset) = acks_held.front().copied().filter(|&o| o <= written) {
            acks_held.pop_front();
            ack = Some(offset);
        }
        if let Some(offset) = ack {
            let _ = ctrl_tx.send(Frame::Ack(offset));
        }
        if dec.has_deferred() {
            // Wait as long as deferred references keep resolving or chunks keep
            // arriving (the copy may be queued behind them); give up after DEFER_LIMIT
            // without progress, or DEFER_MAX in all; at once when a connection with
            // the peer failed meanwhile (the copy may have been on it, and sibling
            // connections delivering other chunks would keep us waiting for nothing).
            let now = Instant::now();
            let started = *defer_started.get_or_insert(now);
            let failures = ctx.peer_failures.load(Relaxed);
            let inserted = ctx.store.inserted();
            let progress =
                dec.stats().deferred_arrived > deferred_arrived || inserted > store_inserted;
            if failures > failures_seen {
                defer_deadline = Some(now);
                failures_seen = failures;
                failures_at_sync = failures;
                failures_synced = now;
            } else if defer_deadline.is_none() || (progress && now < started + DEFER_MAX) {
                deferred_arrived = dec.stats().deferred_arrived;
                store_inserted = inserted;
                defer_deadline = Some(now + DEFER_LIMIT);
            }
        } else {
            defer_deadline = None;
            defer_started = None;
            // Failures older than a recent reference's reach (the copy left the peer
            // within the last 2 s) no longer concern the next wait.
            let now = Instant::now();
            if now >= failures_synced + FAILURE_REACH {
                failures_seen = failures_at_sync;
                failures_at_sync = ctx.peer_failures.load(Relaxed);
                failures_synced = now;
            }
        }
        if dec.is_finished() && outq.is_empty() && !local_shut {
            local_shut = true;
            // Half-close: the peer's application finished sending.
            if let Err(e) = lw.shutdown().await {
                if e.kind() != io::ErrorKind::NotConnected {
                    return Err(fail(ConnError::LocalWrite(e)));
                }
            }
        }
        if local_shut && shared.uplink_done.load(Relaxed) && shared.ledger().in_flight() == 0 {
            return Ok(DownlinkEnd {
                stats: dec.stats().clone(),
                rbuf,
                peer_done,
            });
        }
        // What arrived before the tunnel closed is delivered first.
        if tunnel_eof && outq.is_empty() {
            return Err(fail(ConnError::TunnelClosed));
        }
        if dec.has_unacked() && ack_deadline.is_none() {
            ack_deadline = Some(Instant::now() + ACK_DELAY);
        }
        let deadline = ack_deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        reserve_read(&mut rbuf, last_read);
        let reading = !tunnel_eof && !peer_done && broken.is_none() && read_ahead.may_read(held);
        if !reading {
            quiet_since = Instant::now();
        }
        tokio::select! {
            r = write_some(lw, &mut outq), if !outq.is_empty() => match r {
                Ok(n) => {
                    held -= n;
                    written += n;
                    read_ahead.drained(held);
                    shared.lan_out.fetch_add(n, Relaxed);
                    ctx.stats.lan_bytes_out.fetch_add(n, Relaxed);
                }
                Err(e) => return Err(fail(ConnError::LocalWrite(e))),
            },
            r = tr.read_buf(&mut rbuf), if reading => match r {
                Ok(0) => tunnel_eof = true,
                Ok(n) => {
                    last_read = n;
                    quiet_since = Instant::now();
                }
                Err(e) => return Err(fail(ConnError::TunnelRead(e))),
            },
            _ = tokio::time::sleep_until(quiet_since + ctx.wan_timeout), if reading => {
                return Err(fail(ConnError::PeerSilent(ctx.wan_timeout)));
            }
            _ = tokio::time::sleep_until(deadline), if ack_deadline.is_some() => {
                dec.handle_idle();
                ack_deadline = None;
            }
            _ = tokio::time::sleep_until(next_recheck), if defer_deadline.is_some() => {
                next_recheck = Instant::now() + DEFER_RECHECK;
                let r = if defer_deadline.is_some_and(|d| Instant::now() >= d) {
                    defer_deadline = None;
                    dec.expire_deferred()
                } else {
                    dec.recheck()
                };
                if let Err(e) = r {
                    return Err(fail(e.into()));
                }
            }
            _ = shared.uplink_finished.notified() => {}
            _ = tokio::time::sleep_until(done_deadline.unwrap_or_else(Instant::now)), if done_deadline.is_some() => {
                return Err(fail(ConnError::TunnelClosed));
            }
            _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
        }
    }
}

/// The peer's handshake reply on an early open, read before any frame (the peer sends
/// nothing before it).
async fn read_reply<T: AsyncRead>(
    tr: &mut ReadHalf<T>,
    rbuf: &mut BytesMut,
    early: &EarlyOpen,
    shared: &Shared,
) -> Result<HelloReply, ConnError> {
    let deadline = Instant::now() + early.reply_within;
    loop {
        match HelloReply::decode(rbuf) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => {
                return Err(ConnError::PeerReset(format!(
                    "bad handshake reply from the peer edge: {e}"
                )))
            }
        }
        rbuf.reserve(8192);
        tokio::select! {
            r = tr.read_buf(rbuf) => match r {
                Ok(0) => return Err(ConnError::TunnelClosed),
                Ok(_) => {}
                Err(e) => return Err(ConnError::TunnelRead(e)),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ConnError::PeerReset(format!(
                    "the peer edge did not answer the handshake within {:?}",
                    early.reply_within
                )))
            }
            _ = shared.abort.cancelled() => return Err(ConnError::Aborted),
        }
    }
}

async fn writer<T: AsyncWrite>(
    tw: &mut WriteHalf<T>,
    mut ctrl_rx: mpsc::UnboundedReceiver<Frame>,
    mut data_rx: mpsc::Receiver<(Bytes, u64)>,
    shared: &Shared,
    heartbeat: Duration,
) -> Result<(), ConnError> {
    let mut scratch = BytesMut::with_capacity(COALESCE);
    let (mut ctrl_open, mut data_open) = (true, true);
    // The last ACK written (a heartbeat repeats it) and when anything was last written.
    let (mut last_ack, mut last_write) = (0u64, Instant::now());
    let result: Result<(), io::Error> = async {
        loop {
            // Control frames first: a MISS or FILL unblocks the peer, an ACK frees memory.
            tokio::select! {
                biased;
                _ = shared.abort.cancelled() => {
                    // Deliver a queued RESET so the peer learns why, then stop.
                    while let Ok(f) = ctrl_rx.try_recv() {
                        if let Frame::Reset(_) = f {
                            f.encode(&mut scratch);
                        }
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        tw.write_all(&scratch).await?;
                        tw.shutdown().await
                    }).await;
                    return Ok(());
                }
                f = ctrl_rx.recv(), if ctrl_open => match f {
                    Some(f) => encode_control(&f, &mut scratch, &mut last_ack),
                    None => ctrl_open = false,
                },
                b = data_rx.recv(), if data_open && scratch.is_empty() => match b {
                    Some((b, end)) => {
                        last_write = Instant::now();
                        write_or_abort(tw, &b, shared).await?;
                        shared.queued.fetch_sub(b.len() as u64, Relaxed);
                        shared.peer_link.meter().record(b.len());
                        shared.own_link.record(b.len());
                        shared.written.store(end, Relaxed);
                        shared.wrote.notify_one();
                    }
                    None => data_open = false,
                },
                // While the downlink still reads (it holds the control channel open),
                // the peer's downlink may be waiting to hear from us.
                _ = tokio::time::sleep_until(last_write + heartbeat), if ctrl_open => {
                    Frame::Ack(last_ack).encode(&mut scratch);
                }
                else => break,
            }
            // Gather more control frames already queued into the same write.
            while scratch.len() < COALESCE {
                match ctrl_rx.try_recv() {
                    Ok(f) => encode_control(&f, &mut scratch, &mut last_ack),
                    Err(_) => break,
                }
            }
            if !scratch.is_empty() {
                last_write = Instant::now();
                let bytes = scratch.split().freeze();
                write_or_abort(tw, &bytes, shared).await?;
            }
            if ctrl_rx.is_empty() && data_rx.is_empty() {
                tw.flush().await?;
            }
            if !ctrl_open && !data_open {
                break;
            }
        }
        // DONE: this direction is complete, and the connection stays open for the next
        // proxied connection (protocol v6; before it, close_notify + FIN).
        Frame::Done.encode(&mut scratch);
        let done = scratch.split().freeze();
        tw.write_all(&done).await?;
        tw.flush().await
    }
    .await;
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted && shared.abort.is_cancelled() => {
            Err(ConnError::Aborted)
        }
        Err(e) => {
            let (tx, _rx) = mpsc::unbounded_channel();
            Err(shared.fail(ConnError::TunnelWrite(e), &tx))
        }
    }
}

/// Encodes a control frame for the writer, noting the offset of an ACK (what a
/// heartbeat repeats).
fn encode_control(f: &Frame, scratch: &mut BytesMut, last_ack: &mut u64) {
    if let Frame::Ack(offset) = f {
        *last_ack = *offset;
    }
    f.encode(scratch);
}

/// Most buffers handed to one `writev` (Linux's IOV_MAX is 1024).
const MAX_IOV: usize = 512;

/// One vectored write of the front of `bufs`, which it advances: the bytes written.
/// Cancel-safe (a write that has not completed has written nothing), so it can race
/// the tunnel's reads.
async fn write_some(
    lw: &mut LocalWrite<'_>,
    bufs: &mut std::collections::VecDeque<Bytes>,
) -> io::Result<u64> {
    use bytes::Buf;
    let iov: Vec<io::IoSlice<'_>> = bufs
        .iter()
        .take(MAX_IOV)
        .map(|b| io::IoSlice::new(b))
        .collect();
    let written = lw.write_vectored(&iov).await?;
    drop(iov);
    if written == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    let mut n = written;
    while n > 0 {
        let front = bufs.front_mut().expect("wrote more than queued");
        if front.len() <= n {
            n -= front.len();
            bufs.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
    Ok(written as u64)
}

/// Writes all of `data` unless the connection is aborted meanwhile.
async fn write_or_abort<T: AsyncWrite>(
    tw: &mut WriteHalf<T>,
    data: &[u8],
    shared: &Shared,
) -> Result<(), io::Error> {
    tokio::select! {
        r = tw.write_all(data) => r,
        _ = shared.abort.cancelled() => Err(io::Error::new(io::ErrorKind::Interrupted, "aborted")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_time_counts_the_writer_queue_and_the_socket_together() {
        let limit = 1 << 20;
        // The writer's queue alone: the socket is not asked.
        assert!(link_backlog_exceeds(limit, limit, || panic!("asked")));
        // Neither alone, both together.
        assert!(link_backlog_exceeds(limit, 600 << 10, || Some(500 << 10)));
        assert!(!link_backlog_exceeds(limit, 600 << 10, || Some(100 << 10)));
        // A socket that cannot tell counts as empty: the link may be idle.
        assert!(!link_backlog_exceeds(limit, 600 << 10, || None));
        assert!(!link_backlog_exceeds(limit, 0, || Some(limit - 1)));
    }
}
