//! Edge-wide counters and the JSON snapshot scripts read (`--stats-json`).
//!
//! Every counter is monotonic except the `active_*` and `spares_idle` gauges. Names are documented in
//! docs/METRICS.md; keep the two in step.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;
use wire::session::{DecoderStats, EncoderStats};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Edge-wide counters, updated lock-free by every connection task.
        #[derive(Debug, Default)]
        pub struct EdgeStats {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`EdgeStats`].
        #[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
        pub struct CountersSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl EdgeStats {
            /// Copies every counter.
            pub fn snapshot(&self) -> CountersSnapshot {
                CountersSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl CountersSnapshot {
            /// Every counter as (name, description, value), in declaration order.
            pub fn entries(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), concat!($($doc),*), self.$name),)*]
            }
        }
    };
}

counters! {
    /// Local (hypervisor-side) connections accepted on forward listeners.
    connections_accepted,
    /// Proxied connections accepted from peer edges (after TLS and handshake): one per
    /// handshake, and a tunnel connection carries one after another.
    tunnels_accepted,
    /// Tunnel connections refused: TLS failure, bad handshake, unreachable target.
    tunnels_rejected,
    /// Peer connections connected to their target without the connection their Hello
    /// named as coming before it: that one never arrived within the connect timeout.
    open_order_expired,
    /// Proxied connections open now (gauge).
    active_connections,
    /// Proxied connections that ended cleanly (both directions delivered).
    connections_completed,
    /// Proxied connections that ended in a reset or error.
    connections_failed,
    /// Warm tunnel connections (TCP + TLS, made ahead of need) opened to peer edges.
    spares_made,
    /// Local connections that started on a warm tunnel connection (two round trips
    /// saved).
    spares_used,
    /// Warm connections found dead when used (peer restarted); the connection then
    /// connected afresh.
    spares_stale,
    /// Warm tunnel connections idle now, ready for the next local connection (gauge).
    spares_idle,
    /// Local connections that started on a tunnel connection an earlier connection
    /// had carried to its end (protocol v6): no TCP or TLS handshake, and the TCP
    /// window already open (with BBR, or `net.ipv4.tcp_slow_start_after_idle=0`).
    tunnels_reused,
    /// Local connections whose data left before the peer's handshake reply (its facts
    /// known from an earlier reply: one more round trip saved).
    opens_early,
    /// Bytes read from local sockets (hypervisor side).
    lan_bytes_in,
    /// Bytes written to local sockets.
    lan_bytes_out,
    /// Bytes written to tunnel TCP sockets (including TLS overhead).
    wan_bytes_out,
    /// Bytes read from tunnel TCP sockets (including TLS overhead).
    wan_bytes_in,
    /// Logical bytes sent as literals.
    literal_bytes,
    /// Chunks sent in full.
    chunks_sent,
    /// Logical bytes sent in full as chunks.
    chunk_bytes,
    /// Chunks sent as references.
    refs_sent,
    /// Of those, references flagged recent (their full copy was sent moments before,
    /// perhaps on another connection, and may still be in flight).
    refs_recent_sent,
    /// Of `refs_sent`, references sent inside runs the peer saw before (FOLLOW or
    /// NEXT frames: one byte each after the first of a run, instead of 33).
    group_refs_sent,
    /// Logical bytes replaced by references.
    ref_bytes,
    /// Chunks sent as deltas against a similar chunk the peer holds.
    deltas_sent,
    /// Logical bytes sent as deltas.
    delta_bytes,
    /// Patch bytes of those deltas.
    delta_patch_bytes,
    /// Of `deltas_sent`, those sent as zstd frames with the base as dictionary.
    zstd_deltas_sent,
    /// Of `chunks_sent`, those sent as the word differences of their bytes (WORDS
    /// frames: tables of 64-bit values that compress far better so).
    word_chunks_sent,
    /// Of `chunks_sent`, those sent with their x86 branch targets made absolute
    /// (BRANCHES frames: code whose calls of one function then carry the same bytes).
    branch_chunks_sent,
    /// Deltas received, rebuilt, verified and stored.
    deltas_applied,
    /// Batches sent zstd-compressed.
    batches_compressed,
    /// Of those, batches sent as pieces of a context-keeping stream (matches reach back
    /// into earlier batches of the connection).
    batches_streamed,
    /// Sum of the zstd levels of `batches_compressed` (over that count: the mean level
    /// the governor chose).
    batch_level_sum,
    /// Batches sent without trying compression: the link was not the bottleneck, or
    /// compression was backing off after batches that did not pay.
    batches_raw,
    /// Batches compressed at the fast level although the governor found the CPU, not
    /// the link, the limit: the link had more than a batch's compression time of work
    /// queued (spare-time compression). Counted in `batches_compressed` too when it
    /// paid.
    spare_batches,
    /// Times a connection stopped reading its local socket because what it held on the
    /// way to the peer used up its share of `--send-ahead-mem` (it waited for its
    /// tunnel writes).
    send_ahead_waits,
    /// MISS requests this edge sent (a reference it could not resolve).
    misses_sent,
    /// FILLs this edge sent in answer to a peer's MISS.
    fills_sent,
    /// Milliseconds finished tunnel connections spent held back by this host's TCP
    /// send buffer (all they had buffered in flight, the window open for more:
    /// `net.ipv4.tcp_wmem`'s maximum too small for the path's rate x round trip).
    tunnel_sndbuf_limited_ms,
    /// Milliseconds finished tunnel connections spent held back by the peer's receive
    /// window (the peer host's `net.ipv4.tcp_rmem` maximum, or the peer edge slow to
    /// read because its own local side is).
    tunnel_rwnd_limited_ms,
    /// Chunks a failed connection had sent whole or as deltas without the peer's
    /// acknowledgment, dropped from this edge's model of the peer (they are sent again
    /// rather than referred to).
    peer_chunks_forgotten,
    /// Connections from a peer edge whose name another live edge also announces (an
    /// epoch this edge had seen replaced came back): each one's connections reset
    /// this edge's model of the other's store, and their link measurements mix. Give
    /// each edge its own `--name`.
    peer_name_conflicts,
    /// New chunks verified and stored.
    chunks_stored,
    /// References resolved from the store or a fill.
    refs_resolved,
    /// Of those, references received inside runs (FOLLOW or NEXT frames).
    group_refs_resolved,
    /// Runs of block ids cut from delivered streams and stored, for the peer's runs
    /// of references.
    groups_stored,
    /// Recent references this edge's store lacked on arrival, which waited for their
    /// chunk to arrive on another connection before asking.
    refs_deferred,
    /// Of those, the ones whose chunk arrived in time (no MISS, no FILL).
    refs_deferred_arrived,
    /// Outgoing streams recognised as QEMU migration main channels.
    qemu_streams,
    /// Outgoing streams recognised as QEMU multifd channels.
    multifd_channels,
    /// Outgoing streams recognised as NBD clients (disk mirrors).
    nbd_streams,
    /// Outgoing streams recognised as NBD servers (their READ replies: disks pulled).
    nbd_server_streams,
    /// Outgoing streams recognised as QEMU postcopy preempt channels.
    preempt_channels,
    /// Exact protocol blocks (RAM pages, disk blocks) found by stream parsers.
    protocol_blocks,
    /// Bytes the stream parsers classified as headers or device state.
    parsed_opaque_bytes,
    /// Bytes content-defined chunked (unknown streams, or after a parser gave up).
    cdc_bytes,
    /// Streams whose parser gave up part-way (a fallback, never an error).
    parser_fallbacks,
}

impl EdgeStats {
    /// Adds one finished direction's encoder counters.
    pub fn add_encoder(&self, s: &EncoderStats) {
        self.literal_bytes.fetch_add(s.literal_bytes, Relaxed);
        self.chunks_sent.fetch_add(s.chunks, Relaxed);
        self.chunk_bytes.fetch_add(s.chunk_bytes, Relaxed);
        self.refs_sent.fetch_add(s.refs, Relaxed);
        self.refs_recent_sent.fetch_add(s.refs_recent, Relaxed);
        self.group_refs_sent.fetch_add(s.group_refs, Relaxed);
        self.deltas_sent.fetch_add(s.deltas, Relaxed);
        self.delta_bytes.fetch_add(s.delta_bytes, Relaxed);
        self.zstd_deltas_sent.fetch_add(s.zstd_deltas, Relaxed);
        self.word_chunks_sent.fetch_add(s.word_chunks, Relaxed);
        self.branch_chunks_sent.fetch_add(s.branch_chunks, Relaxed);
        self.delta_patch_bytes
            .fetch_add(s.delta_patch_bytes, Relaxed);
        self.ref_bytes.fetch_add(s.ref_bytes, Relaxed);
        let c = &s.compression;
        self.batches_compressed
            .fetch_add(c.batches_compressed, Relaxed);
        self.batches_streamed.fetch_add(c.batches_streamed, Relaxed);
        self.batch_level_sum.fetch_add(c.batch_level_sum, Relaxed);
        self.batches_raw.fetch_add(c.batches_raw, Relaxed);
    }

    /// Adds one finished direction's segmenter report.
    pub fn add_segmenter(&self, r: &wire::segment::SegmenterReport) {
        let counter = match r.kind {
            "qemu-main" => Some(&self.qemu_streams),
            "qemu-multifd" => Some(&self.multifd_channels),
            "nbd-client" => Some(&self.nbd_streams),
            "nbd-server" => Some(&self.nbd_server_streams),
            "qemu-preempt" => Some(&self.preempt_channels),
            _ => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Relaxed);
            if r.gave_up.is_some() {
                self.parser_fallbacks.fetch_add(1, Relaxed);
            }
        }
        self.protocol_blocks.fetch_add(r.blocks, Relaxed);
        self.parsed_opaque_bytes.fetch_add(r.opaque_bytes, Relaxed);
        self.cdc_bytes.fetch_add(r.fallback_bytes, Relaxed);
    }

    /// Adds one finished direction's decoder counters.
    pub fn add_decoder(&self, s: &DecoderStats) {
        self.misses_sent.fetch_add(s.misses, Relaxed);
        self.chunks_stored.fetch_add(s.chunks_stored, Relaxed);
        self.refs_resolved.fetch_add(s.refs_resolved, Relaxed);
        self.group_refs_resolved.fetch_add(s.group_refs, Relaxed);
        self.groups_stored.fetch_add(s.groups_stored, Relaxed);
        self.refs_deferred.fetch_add(s.deferred, Relaxed);
        self.deltas_applied.fetch_add(s.deltas_applied, Relaxed);
        self.refs_deferred_arrived
            .fetch_add(s.deferred_arrived, Relaxed);
    }
}

/// The whole snapshot file.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// This edge's name.
    pub edge: String,
    /// This edge's cache epoch.
    pub epoch: u64,
    /// Seconds since the edge started.
    pub uptime_secs: f64,
    /// Counters.
    pub counters: CountersSnapshot,
    /// The shared chunk store.
    pub store: StoreSnapshot,
    /// Peers this edge has talked to: name, epoch, modelled entries.
    pub peers: Vec<PeerSnapshot>,
    /// LAN bytes in / WAN bytes out: above 1 means the WAN carried less than the LAN.
    pub reduction_ratio: f64,
    /// The most recently finished connections, oldest first.
    pub recent_connections: Vec<ConnSummary>,
}

/// One finished proxied connection (one migration channel, one NBD connection...).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnSummary {
    /// Connection id (as in the log's span).
    pub id: u64,
    /// `forward` (this edge accepted the local side) or `tunnel` (a peer opened it).
    pub role: &'static str,
    /// Seconds since the edge started, at the end.
    pub finished_at_secs: f64,
    /// `ok`, or the error that ended it.
    pub result: String,
    /// What the outgoing stream was recognised as (`qemu-main`, `unknown`).
    pub kind: String,
    /// RAM PAGE records found (QEMU).
    pub pages: u64,
    /// Exact blocks found by the parser.
    pub blocks: u64,
    /// Where the parser gave up, if it did.
    pub parser_gave_up: Option<String>,
    /// What the parser counted (records, packets, requests, replies: per kind).
    pub parser_counters: std::collections::BTreeMap<&'static str, u64>,
    /// Bytes read from the local side.
    pub lan_in: u64,
    /// Bytes written to the local side.
    pub lan_out: u64,
    /// Tunnel bytes written (TLS included).
    pub wan_out: u64,
    /// Tunnel bytes read (TLS included).
    pub wan_in: u64,
    /// Chunks sent as references, and their bytes.
    pub refs: u64,
    /// Logical bytes replaced by references.
    pub ref_bytes: u64,
    /// Chunks sent in full.
    pub chunks: u64,
    /// Their bytes.
    pub chunk_bytes: u64,
    /// References this edge could not resolve (fetched from the peer).
    pub misses: u64,
    /// Chunks sent to answer the peer's misses.
    pub fills_sent: u64,
    /// The tunnel socket's smoothed round trip at the end, ms (0: not measured).
    pub rtt_ms: f64,
    /// How long this host's TCP send buffer held the tunnel connection back, ms.
    pub sndbuf_limited_ms: u64,
    /// How long the peer's receive window held it back, ms.
    pub rwnd_limited_ms: u64,
}

/// Store part of the snapshot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreSnapshot {
    /// Entries held.
    pub entries: usize,
    /// Weighted bytes held.
    pub bytes: u64,
    /// Budget.
    pub capacity_bytes: u64,
    /// Lookups that found the chunk.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Entries evicted.
    pub evictions: u64,
}

/// One peer in the snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct PeerSnapshot {
    /// Peer edge name.
    pub name: String,
    /// Its cache epoch as last seen.
    pub epoch: u64,
    /// Chunks this edge believes the peer holds.
    pub modelled_entries: usize,
}

/// Writes `snapshot` to `path` atomically (temp file + rename), so readers never see
/// a half-written file.
///
/// # Errors
/// The I/O error, for the caller to log.
pub fn write_snapshot(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}
