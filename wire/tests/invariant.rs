//! The invariant as properties: for any input, any read split on either side, any
//! store size and eviction pattern, and any interleaving of concurrent connections
//! sharing one store and one peer model, the receiving side rebuilds exactly the input.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use wire::session::{
    BatchCompressor, CompressMode, Decoder, DecoderConfig, DecoderStats, Encoder, EncoderConfig,
    EncoderStats, SendLedger,
};
use wire::{
    segment::default_segmenter, ChunkId, ChunkParams, ContentStore, Frame, FrameDecoder,
    GroupIndex, Holding, PeerHoldings, Segmenter, SimilarChunks, VerifiedChunk,
};

/// A FIFO store bounded in bytes (0 = stores nothing), with optional forced evictions.
struct TinyStore {
    cap: usize,
    inner: Mutex<(VecDeque<ChunkId>, HashMap<ChunkId, Bytes>, usize)>,
}

impl TinyStore {
    fn new(cap: usize) -> Self {
        TinyStore {
            cap,
            inner: Mutex::new((VecDeque::new(), HashMap::new(), 0)),
        }
    }
    fn evict_all(&self) {
        let mut g = self.inner.lock().unwrap();
        g.0.clear();
        g.1.clear();
        g.2 = 0;
    }
}

impl ContentStore for TinyStore {
    fn get(&self, id: &ChunkId) -> Option<Bytes> {
        self.inner.lock().unwrap().1.get(id).cloned()
    }
    fn insert(&self, chunk: VerifiedChunk) {
        let (id, data) = chunk.into_parts();
        assert_eq!(ChunkId::of(&data), id, "unverified data reached the store");
        let mut g = self.inner.lock().unwrap();
        if data.len() > self.cap || g.1.contains_key(&id) {
            return;
        }
        g.2 += data.len();
        g.0.push_back(id);
        g.1.insert(id, data);
        while g.2 > self.cap {
            let old = g.0.pop_front().unwrap();
            let d = g.1.remove(&old).unwrap();
            g.2 -= d.len();
        }
    }
}

/// Believes the peer holds everything it was ever sent (so evictions cause misses).
/// References to chunks marked within the last `recent` marks are flagged recent, so
/// the receiver defers them when its store lacks them (as when a sibling connection's
/// full copy is still in flight, or was already evicted).
#[derive(Default)]
struct Optimist(Mutex<(HashMap<ChunkId, u64>, u64)>, u64);

impl PeerHoldings for Optimist {
    fn check_and_mark(&self, id: &ChunkId, _len: usize) -> Holding {
        let mut g = self.0.lock().unwrap();
        g.1 += 1;
        let now = g.1;
        match g.0.get(id) {
            None => {
                g.0.insert(*id, now);
                Holding::Absent
            }
            Some(&at) if now - at <= self.1 => Holding::Recent,
            Some(_) => Holding::Held,
        }
    }
    fn forget(&self, id: &ChunkId) {
        self.0.lock().unwrap().0.remove(id);
    }
    // A confirmed id is kept as marked at tick 0: never recent again.
    fn confirm(&self, id: &ChunkId) {
        if let Some(at) = self.0.lock().unwrap().0.get_mut(id) {
            *at = 0;
        }
    }
    fn confirmed(&self, id: &ChunkId) -> bool {
        self.0.lock().unwrap().0.get(id) == Some(&0)
    }
    fn peek(&self, id: &ChunkId) -> Holding {
        let g = self.0.lock().unwrap();
        match g.0.get(id) {
            None => Holding::Absent,
            Some(&at) if g.1 - at <= self.1 => Holding::Recent,
            Some(_) => Holding::Held,
        }
    }
}

/// Remembers every group of block ids formed, without bound.
use wire::fuzzing::MemGroups as Groups;
/// Remembers every chunk sent, by feature, without bound.
use wire::fuzzing::MemSimilar as Similar;

/// One proxied connection: sender side (segmenter, encoder, ledger) and receiver side
/// (frame decoder, decoder), with the wire in between held as bytes in flight.
struct Conn {
    input: Vec<u8>,
    fed: usize,
    read_buf: BytesMut,
    seg: Box<dyn Segmenter>,
    enc: Encoder,
    /// Compresses the encoder's taken batches when set (as the edge does, on another
    /// thread), instead of the encoder's own.
    compressor: Option<BatchCompressor>,
    ledger: SendLedger,
    wire: BytesMut,
    carry: BytesMut,
    fdec: FrameDecoder,
    dec: Decoder,
    back: VecDeque<Frame>,
    out: Vec<u8>,
}

impl Conn {
    fn new(
        input: Vec<u8>,
        store: Arc<dyn ContentStore>,
        peer: Arc<dyn PeerHoldings>,
        similar: Arc<dyn SimilarChunks>,
        mode: CompressMode,
    ) -> Self {
        Conn {
            input,
            fed: 0,
            read_buf: BytesMut::new(),
            seg: default_segmenter(ChunkParams {
                min: 256,
                avg: 1024,
                max: 4096,
            }),
            enc: Encoder::new(
                peer.clone(),
                EncoderConfig {
                    compress: mode,
                    level: 1,
                },
            )
            .with_deltas(similar),
            compressor: None,
            ledger: SendLedger::new().confirming(peer.clone()),
            wire: BytesMut::new(),
            carry: BytesMut::new(),
            fdec: FrameDecoder::new(),
            dec: Decoder::new(
                store,
                DecoderConfig {
                    ack_interval: 2048,
                    max_pending: u64::MAX,
                },
            ),
            back: VecDeque::new(),
            out: Vec::new(),
        }
    }

    /// Sender reads `n` bytes (and flushes when told, like an idle socket).
    fn send_step(&mut self, n: usize, flush: bool, backlog: bool) {
        let end = (self.fed + n).min(self.input.len());
        self.read_buf.extend_from_slice(&self.input[self.fed..end]);
        self.fed = end;
        let done = self.fed == self.input.len();
        let mut segs = Vec::new();
        self.seg
            .segment(&mut self.read_buf, flush || done, &mut segs);
        self.enc.handle_segments(&mut segs, &mut self.ledger);
        if done && !self.enc.is_finished() {
            self.enc.handle_end();
        }
        let batch = match &mut self.compressor {
            Some(c) => self.enc.take_raw_batch().map(|b| c.compress(b, backlog)),
            None => self.enc.take_batch(backlog),
        };
        if let Some(b) = batch {
            self.wire.extend_from_slice(&b);
        }
    }

    /// Sends runs of references through `groups`, cutting groups after ids whose last
    /// byte is a multiple of `modulus` at both ends (small for test-sized streams).
    fn with_groups(mut self, groups: Arc<dyn GroupIndex>, modulus: u8) -> Self {
        self.enc = self.enc.with_groups(groups);
        self.enc.set_group_modulus(modulus);
        self.dec.set_group_modulus(modulus);
        self
    }

    /// Compresses taken batches with a compressor of the driver's from now on.
    fn with_own_compressor(mut self, mode: CompressMode) -> Self {
        self.compressor = Some(BatchCompressor::new(mode, 1));
        self
    }

    /// A new stream setting and level, for whichever compressor is in use.
    fn set_stream(&mut self, window_log: Option<u32>, level: i32) {
        self.enc.set_stream(window_log);
        self.enc.set_level(level);
        if let Some(c) = &mut self.compressor {
            c.set_stream(window_log);
            c.set_level(level);
        }
    }

    /// The encoder's counters with those of the driver's compressor.
    fn stats(&self) -> EncoderStats {
        let mut s = self.enc.stats();
        if let Some(c) = &self.compressor {
            s.add_compression(c.stats());
        }
        s
    }

    /// Receiver reads `n` wire bytes.
    fn recv_step(&mut self, n: usize) {
        let take = n.min(self.wire.len());
        let piece = self.wire.split_to(take);
        self.carry.extend_from_slice(&piece);
        // Frame by frame or all of the read together (chunks hashed side by side),
        // by the parity of the read size: both must rebuild the same bytes.
        let mut frames = Vec::new();
        while let Some(f) = self.fdec.decode(&mut self.carry).expect("valid frames") {
            assert!(
                !matches!(f, Frame::Miss(_) | Frame::Ack(_)),
                "control on data path"
            );
            if n % 2 == 0 {
                frames.push(f);
            } else {
                self.dec.handle_frame(f).expect("valid session");
            }
        }
        self.dec.handle_frames(&mut frames).expect("valid session");
        self.dec.handle_idle();
        // The driver rechecks the store while references are deferred.
        self.dec.recheck().expect("valid session");
        self.collect();
    }

    /// The receiver stops waiting for deferred references.
    fn expire_step(&mut self) {
        self.dec.expire_deferred().expect("valid session");
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(b) = self.dec.poll_output() {
            self.out.extend_from_slice(&b);
        }
        while let Some(c) = self.dec.poll_control() {
            self.back.push_back(c);
        }
    }

    /// Sender handles control frames coming back.
    fn control_step(&mut self) {
        while let Some(c) = self.back.pop_front() {
            if let Some(fill) = self.ledger.handle_control(c).expect("valid control") {
                let mut b = BytesMut::new();
                fill.encode(&mut b);
                // FILLs travel on the data direction's wire, interleaved anywhere.
                self.wire.extend_from_slice(&b);
            }
        }
    }

    fn done(&self) -> bool {
        self.dec.is_finished() && self.wire.is_empty() && self.back.is_empty()
    }

    /// Runs this connection alone until it is done (64 KiB reads, whole wire reads,
    /// control answered each round), then checks what it delivered.
    fn run_to_end(&mut self) {
        while !self.done() {
            self.send_step(65536, false, false);
            self.recv_step(1 << 20);
            self.control_step();
        }
        self.check_finished();
    }

    fn check_finished(&self) {
        assert_eq!(self.out.len(), self.input.len(), "length differs");
        assert!(self.out == self.input, "bytes differ");
        assert_eq!(
            self.ledger.acked(),
            self.ledger.sent(),
            "not everything acknowledged"
        );
        assert_eq!(self.ledger.pinned_bytes(), 0, "pins left after final ack");
    }
}

/// Migration-like input: pages drawn from a small pool (so content repeats, in a
/// different order per stream), unique bytes, zero runs, odd-sized pieces.
fn workload(seed: u64, len: usize, pool: &[Vec<u8>]) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        match next() % 6 {
            // A table of 64-bit words growing by a constant (page tables, pointer
            // arrays), or of 8-word records whose fields step (per-page records),
            // now and then a word out of line: the encoder sends the chunks inside
            // it as word differences.
            5 => {
                let fields: Vec<(u64, u64)> = (0..8).map(|_| (next(), next() % 0x10000)).collect();
                let records = next() % 2 == 0;
                for i in 0..(256 + next() % 1000) as usize {
                    let (v, step) = fields[if records { i % 8 } else { 0 }];
                    let n = if records { i / 8 } else { i } as u64;
                    let w = if next() % 64 == 0 {
                        next()
                    } else {
                        v.wrapping_add(n * step)
                    };
                    out.extend_from_slice(&w.to_le_bytes());
                }
            }
            0 | 1 => out.extend_from_slice(&pool[(next() as usize) % pool.len()]),
            // A near-duplicate: a pool page with a few bytes changed in place, or its
            // content shifted by a few inserted bytes.
            4 => {
                let mut page = pool[(next() as usize) % pool.len()].clone();
                if next() % 2 == 0 {
                    for _ in 0..1 + next() % 3 {
                        let at = (next() as usize) % page.len();
                        page[at] = page[at].wrapping_add(1 + (next() % 255) as u8);
                    }
                } else {
                    let len = page.len();
                    let mut shifted: Vec<u8> = (0..1 + next() % 16).map(|_| next() as u8).collect();
                    shifted.extend_from_slice(&page);
                    shifted.truncate(len);
                    page = shifted;
                }
                out.extend_from_slice(&page);
            }
            // Unique bytes: random, or x86-like code (calls of a few functions from
            // many places), whose chunks the encoder sends with absolute branch
            // targets.
            2 if next() % 2 == 0 => {
                let n = 2048 + (next() % 8192) as usize;
                out.extend_from_slice(&wire::fuzzing::code(n, next()));
            }
            2 => {
                let n = (next() % 3000) as usize;
                for _ in 0..n {
                    out.push(next() as u8);
                }
            }
            _ => out.extend(std::iter::repeat_n(0u8, (next() % 5000) as usize)),
        }
    }
    out.truncate(len);
    out
}

fn pool(seed: u64) -> Vec<Vec<u8>> {
    (0..8)
        .map(|i| workload_raw(seed.wrapping_add(i * 7919), 4096 + (i as usize) * 1000))
        .collect()
}

fn workload_raw(seed: u64, len: usize) -> Vec<u8> {
    wire::fuzzing::noise(len, seed)
}

#[derive(Clone, Debug)]
enum Op {
    Send {
        conn: usize,
        n: usize,
        flush: bool,
        backlog: bool,
    },
    Recv {
        conn: usize,
        n: usize,
    },
    Control {
        conn: usize,
    },
    Expire {
        conn: usize,
    },
    /// The driver grants or withdraws a compression stream, or changes the level
    /// (each restarts or drops the stream's context mid-connection).
    Stream {
        conn: usize,
        window_log: Option<u32>,
        level: i32,
    },
    EvictAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 1..20_000usize, any::<bool>(), any::<bool>())
            .prop_map(|(conn, n, flush, backlog)| Op::Send { conn, n, flush, backlog }),
        4 => (0..3usize, 1..30_000usize).prop_map(|(conn, n)| Op::Recv { conn, n }),
        2 => (0..3usize).prop_map(|conn| Op::Control { conn }),
        1 => (0..3usize).prop_map(|conn| Op::Expire { conn }),
        1 => (0..3usize, proptest::option::of(18..21u32), 1..4i32)
            .prop_map(|(conn, window_log, level)| Op::Stream { conn, window_log, level }),
        1 => Just(Op::EvictAll),
    ]
}

/// Runs the connections to completion, checks each rebuilt its input exactly, and
/// returns how many chunks went as word differences, how many references in runs and
/// how many chunks with absolute branch targets.
fn run(
    inputs: Vec<Vec<u8>>,
    store_cap: usize,
    mode: CompressMode,
    ops: Vec<Op>,
    recent: u64,
) -> (u64, u64, u64) {
    let store = Arc::new(TinyStore::new(store_cap));
    let peer: Arc<dyn PeerHoldings> = Arc::new(Optimist(Mutex::default(), recent));
    let similar: Arc<dyn SimilarChunks> = Arc::new(Similar::default());
    let groups: Arc<dyn GroupIndex> = Arc::new(Groups::default());
    // Every other connection compresses as the edge does: batches taken raw and
    // compressed by a separate compressor. Groups are short (~4 ids) so that runs
    // of references, and their groups' evictions, happen in test-sized streams.
    let mut conns: Vec<Conn> = inputs
        .into_iter()
        .enumerate()
        .map(|(k, i)| {
            let c = Conn::new(i, store.clone(), peer.clone(), similar.clone(), mode)
                .with_groups(groups.clone(), 2);
            if k % 2 == 1 {
                c.with_own_compressor(mode)
            } else {
                c
            }
        })
        .collect();
    let n = conns.len();
    for op in ops {
        match op {
            Op::Send {
                conn,
                n: len,
                flush,
                backlog,
            } => conns[conn % n].send_step(len, flush, backlog),
            Op::Recv { conn, n: len } => conns[conn % n].recv_step(len),
            Op::Control { conn } => conns[conn % n].control_step(),
            Op::Expire { conn } => conns[conn % n].expire_step(),
            Op::Stream {
                conn,
                window_log,
                level,
            } => conns[conn % n].set_stream(window_log, level),
            Op::EvictAll => store.evict_all(),
        }
    }
    // Then run everything to completion, round robin, with bounded steps; deferred
    // references stop waiting every few rounds (the driver's timeout).
    for round in 0..100_000 {
        if conns.iter().all(Conn::done) {
            break;
        }
        for c in conns.iter_mut() {
            c.send_step(8192, false, false);
            c.recv_step(8192);
            c.control_step();
            if round % 4 == 3 {
                c.expire_step();
            }
        }
    }
    for c in &conns {
        assert!(c.done(), "connection did not finish");
        c.check_finished();
    }
    let stats: Vec<EncoderStats> = conns.iter().map(Conn::stats).collect();
    (
        stats.iter().map(|s| s.word_chunks).sum(),
        stats.iter().map(|s| s.group_refs).sum(),
        stats.iter().map(|s| s.branch_chunks).sum(),
    )
}

#[test]
fn the_property_workload_holds_word_tables_code_and_runs() {
    // The generator above must exercise WORDS, BRANCHES, FOLLOW and NEXT frames, or
    // the properties would not cover them.
    let p = pool(11);
    let inputs = (0..3)
        .map(|i| workload(11 ^ (i + 1), 120_000, &p))
        .collect();
    let (words, runs, code) = run(inputs, 1 << 30, CompressMode::Always, Vec::new(), 0);
    assert!(words >= 20, "{words} chunks as word differences");
    assert!(code >= 20, "{code} chunks with absolute branch targets");
    assert!(runs >= 20, "{runs} references in runs");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn any_input_any_split_any_cache(
        seed in any::<u64>(),
        lens in proptest::collection::vec(0..120_000usize, 1..4),
        store_cap in prop_oneof![Just(0usize), 0..20_000usize, Just(1usize << 30)],
        mode in prop_oneof![Just(CompressMode::Off), Just(CompressMode::Auto), Just(CompressMode::Always)],
        ops in proptest::collection::vec(op(), 0..200),
        recent in prop_oneof![Just(0u64), 1..50u64, Just(u64::MAX)],
    ) {
        let p = pool(seed);
        let inputs = lens.iter().enumerate().map(|(i, &l)| workload(seed ^ (i as u64 + 1), l, &p)).collect();
        run(inputs, store_cap, mode, ops, recent);
    }

    #[test]
    fn word_differences_restore_any_bytes(
        data in proptest::collection::vec(any::<u8>(), 0..5000),
        stride in 1..=wire::MAX_WORD_STRIDE,
    ) {
        let diffs = wire::words::difference(&data, stride);
        prop_assert_eq!(diffs.len(), data.len());
        prop_assert_eq!(wire::words::restore(&diffs, stride), data.clone());
        if let Some((s, d)) = wire::words::choose(&data) {
            prop_assert_eq!(wire::words::restore(&d, s), data);
        }
    }

    #[test]
    fn arbitrary_bytes_roundtrip(
        data in proptest::collection::vec(any::<u8>(), 0..50_000),
        store_cap in 0..10_000usize,
        ops in proptest::collection::vec(op(), 0..100),
        recent in prop_oneof![Just(0u64), Just(u64::MAX)],
    ) {
        let twice = [data.clone(), data].concat();
        run(vec![twice.clone(), twice], store_cap, CompressMode::Always, ops, recent);
    }
}

#[test]
fn repeated_content_becomes_references() {
    let p = pool(1);
    let a = workload(11, 400_000, &p);
    let store = Arc::new(TinyStore::new(1 << 30));
    let peer: Arc<dyn PeerHoldings> = Arc::new(Optimist::default());
    let similar: Arc<dyn SimilarChunks> = Arc::new(Similar::default());
    let mut c1 = Conn::new(
        a.clone(),
        store.clone(),
        peer.clone(),
        similar.clone(),
        CompressMode::Off,
    );
    let mut c2 = Conn::new(a, store, peer, similar, CompressMode::Off);
    for c in [&mut c1, &mut c2] {
        c.run_to_end();
    }
    let s2 = c2.enc.stats();
    assert!(
        s2.ref_bytes > 370_000,
        "second copy mostly references: {s2:?}"
    );
    assert!(
        s2.compression.wire_bytes < 30_000,
        "second copy is small on the wire: {s2:?}"
    );
    assert_eq!(c2.dec.stats().misses, 0);
}

/// Two connections sending the same content, the second after the first finished,
/// with groups of ~8 ids; `evict` empties the receiver's store in between. Returns
/// the second connection's counters and the wire bytes it took.
fn send_twice_in_runs(evict: bool, groups: bool) -> (EncoderStats, DecoderStats) {
    let p = pool(3);
    let a = workload(17, 600_000, &p);
    let store = Arc::new(TinyStore::new(1 << 30));
    let peer: Arc<dyn PeerHoldings> = Arc::new(Optimist::default());
    let similar: Arc<dyn SimilarChunks> = Arc::new(Similar::default());
    let index: Arc<dyn GroupIndex> = Arc::new(Groups::default());
    let conn = |input: Vec<u8>| {
        let c = Conn::new(
            input,
            store.clone(),
            peer.clone(),
            similar.clone(),
            CompressMode::Off,
        );
        if groups {
            c.with_groups(index.clone(), 8)
        } else {
            c
        }
    };
    let (mut c1, mut c2) = (conn(a.clone()), conn(a));
    for (k, c) in [&mut c1, &mut c2].into_iter().enumerate() {
        if k == 1 && evict {
            store.evict_all();
        }
        c.run_to_end();
    }
    (c2.enc.stats(), c2.dec.stats().clone())
}

#[test]
fn repeated_runs_cross_as_next_frames() {
    let (plain, _) = send_twice_in_runs(false, false);
    let (runs, dec) = send_twice_in_runs(false, true);
    assert_eq!(plain.group_refs, 0);
    assert_eq!(plain.refs, runs.refs, "the same references either way");
    assert!(runs.refs > 100, "{runs:?}");
    // Nearly every reference inside a run, a FOLLOW opening each.
    assert!(
        runs.group_refs * 10 > runs.refs * 9,
        "references in runs: {runs:?}"
    );
    assert!(runs.follows * 4 < runs.group_refs, "{runs:?}");
    assert_eq!(dec.group_refs, runs.group_refs);
    assert_eq!(dec.misses, 0);
    // What the references cost: 33 bytes each, against ~1 plus a FOLLOW per run.
    let saved = plain.compression.wire_bytes - runs.compression.wire_bytes;
    assert!(
        saved > (runs.group_refs - runs.follows) * 30,
        "saved {saved} B: {plain:?} / {runs:?}"
    );
}

/// Cuts a stream into 4 KiB blocks, as a parser cuts guest RAM (a shorter tail on a
/// flush is opaque).
struct Pages;

impl Segmenter for Pages {
    fn segment(&mut self, input: &mut BytesMut, flush: bool, out: &mut Vec<wire::Segment>) {
        while input.len() >= 4096 {
            out.push(wire::Segment::Block(input.split_to(4096).freeze()));
        }
        if flush && !input.is_empty() {
            out.push(wire::Segment::Opaque(input.split().freeze()));
        }
    }

    fn kind(&self) -> &'static str {
        "pages"
    }
}

#[test]
fn a_page_changed_inside_a_run_takes_its_place_as_delta_base() {
    // A "later VM": the same pages in the same order, every 16th edited in place.
    let pages: Vec<Vec<u8>> = (0..600u64)
        .map(|i| wire::fuzzing::noise(4096, 1000 + i))
        .collect();
    let first: Vec<u8> = pages.concat();
    let mut later = first.clone();
    for k in (5..600).step_by(16) {
        later[k * 4096 + 100] ^= 0x5a;
        later[k * 4096 + 3000] ^= 0xa5;
    }
    let store = Arc::new(TinyStore::new(1 << 30));
    let peer: Arc<dyn PeerHoldings> = Arc::new(Optimist::default());
    let similar: Arc<dyn SimilarChunks> = Arc::new(Similar::default());
    let groups: Arc<dyn GroupIndex> = Arc::new(Groups::default());
    let conn = |input: Vec<u8>| {
        let mut c = Conn::new(
            input,
            store.clone(),
            peer.clone(),
            similar.clone(),
            CompressMode::Off,
        )
        .with_groups(groups.clone(), 8);
        // Fixed 4 KiB blocks, as for guest RAM.
        c.seg = Box::new(Pages);
        c
    };
    let (mut c1, mut c2) = (conn(first), conn(later));
    for c in [&mut c1, &mut c2] {
        c.run_to_end();
    }
    let s = c2.enc.stats();
    assert!(s.deltas >= 30, "{s:?}");
    // (Not all: a page right after a group's last member has no place to look at.)
    assert!(
        s.positional_deltas * 10 >= s.deltas * 6,
        "the run's own page is the base: {s:?}"
    );
}

#[test]
fn a_group_the_receiver_lost_is_asked_for_and_filled() {
    let (runs, dec) = send_twice_in_runs(true, true);
    assert!(runs.group_refs > 100, "{runs:?}");
    // Every group and chunk was evicted: the FOLLOWs' groups and every member
    // went as MISS / FILL round trips, and the bytes still arrived exactly
    // (`check_finished`).
    assert!(dec.misses > runs.follows, "{dec:?} / {runs:?}");
    assert_eq!(dec.fills, dec.misses);
    assert_eq!(dec.group_refs, runs.group_refs);
}

#[test]
fn corrupt_fill_is_refused_and_chunks_are_named_by_their_hash() {
    let store = Arc::new(TinyStore::new(1 << 20));
    let mut dec = Decoder::new(store.clone(), DecoderConfig::default());
    let data = Bytes::from(vec![7u8; 4096]);
    let wrong = ChunkId::of(b"something else");
    let err = dec
        .handle_frame(Frame::Fill {
            id: wrong,
            data: data.clone(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("fails verification"), "{err}");
    assert!(matches!(err, wire::session::SessionError::Corrupt(_)));
    assert!(store.get(&wrong).is_none() && store.get(&ChunkId::of(&data)).is_none());
    // A CHUNK carries no id: whatever its bytes, they are stored under their own hash.
    let mut dec = Decoder::new(store.clone(), DecoderConfig::default());
    dec.handle_frame(Frame::Chunk(data.clone())).unwrap();
    assert_eq!(store.get(&ChunkId::of(&data)), Some(data));
    assert!(store.get(&wrong).is_none());
}

/// Frames handed over together: CHUNKs hashed side by side are stored under their own
/// hash like single ones; the first frame that fails stops the rest, which are dropped,
/// and what preceded it stays delivered.
#[test]
fn frames_together_stop_at_the_first_error() {
    let store = Arc::new(TinyStore::new(1 << 20));
    let mut dec = Decoder::new(store.clone(), DecoderConfig::default());
    let pages: Vec<Bytes> = (0..20)
        .map(|i| Bytes::from(wire::fuzzing::noise(4096, 7000 + i)))
        .collect();
    let mut frames: Vec<Frame> = pages.iter().cloned().map(Frame::Chunk).collect();
    frames.push(Frame::End);
    let after = Bytes::from(wire::fuzzing::noise(4096, 8000));
    frames.push(Frame::Chunk(after.clone()));
    let err = dec.handle_frames(&mut frames).unwrap_err();
    assert!(
        matches!(err, wire::session::SessionError::DataAfterEnd),
        "{err}"
    );
    assert!(frames.is_empty(), "the frames after the error are dropped");
    for page in &pages {
        assert_eq!(store.get(&ChunkId::of(page)).as_ref(), Some(page));
    }
    assert!(store.get(&ChunkId::of(&after)).is_none());
    let mut out = Vec::new();
    while let Some(b) = dec.poll_output() {
        out.extend_from_slice(&b);
    }
    assert_eq!(out, pages.concat());
}

#[test]
fn unknown_miss_and_bad_ack_are_errors() {
    let mut ledger = SendLedger::new();
    assert!(ledger
        .handle_control(Frame::Miss(ChunkId::of(b"x")))
        .is_err());
    assert!(ledger.handle_control(Frame::Ack(1)).is_err());
    assert!(ledger.handle_control(Frame::Ack(0)).is_ok());
}

#[test]
fn recent_reference_waits_for_a_sibling_instead_of_missing() {
    let store = Arc::new(TinyStore::new(1 << 20));
    let page = Bytes::from(vec![3u8; 4096]);
    let id = ChunkId::of(&page);
    // Connection B receives a recent reference before connection A's full copy.
    let mut b = Decoder::new(store.clone(), DecoderConfig::default());
    b.handle_frame(Frame::Literal(Bytes::from_static(b"head")))
        .unwrap();
    b.handle_frame(Frame::RefRecent(id)).unwrap();
    b.handle_frame(Frame::Literal(Bytes::from_static(b"tail")))
        .unwrap();
    assert!(b.has_deferred() && b.is_waiting());
    assert_eq!(b.poll_output().as_deref(), Some(&b"head"[..]));
    assert_eq!(
        b.poll_output(),
        None,
        "nothing passes the waiting reference"
    );
    b.recheck().unwrap();
    assert!(
        !std::iter::from_fn(|| b.poll_control()).any(|f| matches!(f, Frame::Miss(_))),
        "a deferred reference sends no MISS"
    );
    // A's CHUNK arrives on the other connection: B resolves without asking.
    let mut a = Decoder::new(store.clone(), DecoderConfig::default());
    a.handle_frame(Frame::Chunk(page.clone())).unwrap();
    b.recheck().unwrap();
    assert!(!b.has_deferred() && !b.is_waiting());
    let out: Vec<u8> = std::iter::from_fn(|| b.poll_output())
        .flat_map(|x| x.to_vec())
        .collect();
    assert_eq!(out, [&page[..], b"tail"].concat());
    assert_eq!((b.stats().deferred, b.stats().deferred_arrived), (1, 1));
    assert_eq!(b.stats().misses, 0);

    // When nothing comes, giving up the wait asks for it, once.
    let other = ChunkId::of(b"never sent");
    let mut c = Decoder::new(store, DecoderConfig::default());
    c.handle_frame(Frame::RefRecent(other)).unwrap();
    c.handle_frame(Frame::RefRecent(other)).unwrap();
    c.expire_deferred().unwrap();
    let misses: Vec<Frame> = std::iter::from_fn(|| c.poll_control()).collect();
    assert_eq!(misses, vec![Frame::Miss(other)]);
    // A plain REF to a missing chunk still asks at once.
    let mut d = Decoder::new(Arc::new(TinyStore::new(0)), DecoderConfig::default());
    d.handle_frame(Frame::Ref(id)).unwrap();
    assert!(!d.has_deferred());
    assert_eq!(d.poll_control(), Some(Frame::Miss(id)));
}

#[test]
fn near_duplicates_cross_as_deltas_and_rebuild_exactly() {
    // 4 KiB pages cut exactly at page boundaries, as the QEMU and NBD parsers do.
    let pages: Vec<Vec<u8>> = (0..64).map(|i| workload_raw(1000 + i, 4096)).collect();
    let first: Vec<u8> = pages.concat();
    // The second stream: every page with a counter and a pointer changed.
    let second: Vec<u8> = pages
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let mut p = p.clone();
            p[8..16].copy_from_slice(&(i as u64 + 77).to_le_bytes());
            p[3000] ^= 0x40;
            p
        })
        .collect();
    let encoded = send_pages_in_turn([first, second]);
    let (enc2, dec2, wire2) = &encoded[1];
    assert_eq!(enc2.deltas, 64, "{enc2:?}");
    assert_eq!(enc2.zstd_deltas, 0, "in-place edits need no zstd");
    assert_eq!(dec2.deltas_applied, 64);
    assert_eq!(dec2.misses, 0);
    // 64 pages of 4 KiB in well under 100 bytes each.
    assert!(*wire2 < 64 * 100, "{wire2} bytes on the wire");
}

#[test]
fn delta_against_an_evicted_base_is_filled_whole() {
    let base = Bytes::from(workload_raw(5, 4096));
    let mut target = base.to_vec();
    target[100] ^= 1;
    let target = Bytes::from(target);
    let patch = wire::delta::encode(&base, &target, 1024).unwrap();
    let (base_id, id) = (ChunkId::of(&base), ChunkId::of(&target));
    // The receiver lacks the base: it asks for the whole target, once.
    let mut dec = Decoder::new(Arc::new(TinyStore::new(1 << 20)), DecoderConfig::default());
    dec.handle_frame(Frame::Delta {
        base_recent: false,
        zstd: false,
        base: base_id,
        id,
        patch: patch.clone(),
    })
    .unwrap();
    assert_eq!(dec.poll_control(), Some(Frame::Miss(id)));
    dec.handle_frame(Frame::Fill {
        id,
        data: target.clone(),
    })
    .unwrap();
    assert_eq!(dec.poll_output(), Some(target.clone()));
    // A patch that rebuilds something else than its id is refused.
    let store = Arc::new(TinyStore::new(1 << 20));
    store.insert(VerifiedChunk::from_local(base.clone()));
    let mut dec = Decoder::new(store.clone(), DecoderConfig::default());
    let err = dec
        .handle_frame(Frame::Delta {
            base_recent: false,
            zstd: false,
            base: base_id,
            id: ChunkId::of(b"another page"),
            patch,
        })
        .unwrap_err();
    assert!(
        matches!(err, wire::session::SessionError::Corrupt(_)),
        "{err}"
    );
    assert!(store.get(&id).is_none(), "nothing unverified stored");
}

#[test]
fn shifted_near_duplicates_cross_as_zstd_deltas() {
    // Text-like pages, then the same pages with a few bytes inserted in front.
    let pages: Vec<Vec<u8>> = (0..32u64)
        .map(|i| {
            let words = workload_raw(2000 + i, 4096);
            words
                .iter()
                .map(|b| b"etaoin shrdlu cmfwyp"[usize::from(*b) % 20])
                .collect()
        })
        .collect();
    let first: Vec<u8> = pages.concat();
    let second: Vec<u8> = pages
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let mut q = format!("<{i}>").into_bytes();
            q.extend_from_slice(p);
            q.truncate(4096);
            q
        })
        .collect();
    let stats = send_pages_in_turn([first, second]);
    let (enc2, dec2, wire2) = &stats[1];
    assert!(enc2.zstd_deltas >= 30, "{enc2:?}");
    assert_eq!(dec2.deltas_applied, enc2.deltas);
    assert!(*wire2 < 32 * 200, "{wire2} bytes for 32 shifted pages");
}

#[test]
fn word_tables_cross_as_differences_and_rebuild_exactly() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut pages: Vec<Vec<u8>> = Vec::new();
    // Page tables: 512 entries of consecutive 4 KiB frames from a random start, the
    // flags of each table its own, a few entries not present.
    for _ in 0..32 {
        let (start, flags) = (
            (next() % (1 << 30)) & !0xfff,
            0x8000_0000_0000_0063 | (next() % 4) << 5,
        );
        pages.push(
            (0..512u64)
                .flat_map(|i| {
                    let e = if next() % 50 == 0 {
                        0
                    } else {
                        (start + i * 0x1000) | flags
                    };
                    e.to_le_bytes()
                })
                .collect(),
        );
    }
    // Per-page records: 64 records of 8 words, the fields stepping each record.
    for _ in 0..16 {
        let fields: Vec<(u64, u64)> = (0..8).map(|_| (next(), next() % 3 * 0x40)).collect();
        pages.push(
            (0..64u64)
                .flat_map(|r| {
                    let f: Vec<u8> = fields
                        .iter()
                        .flat_map(|&(v, step)| v.wrapping_add(r * step).to_le_bytes())
                        .collect();
                    f
                })
                .collect(),
        );
    }
    // Pages with no such regularity stay as they are.
    for i in 0..16 {
        pages.push(workload_raw(9000 + i, 4096));
    }
    let input: Vec<u8> = pages.concat();
    // The frames of the batch go to the decoder together, as the edge hands over a
    // read's frames (WORDS restored before the pages are hashed side by side).
    let (with, with_bytes) = pages_compressed(&input, |e| e.set_words(true), true);
    let (without, without_bytes) = pages_compressed(&input, |e| e.set_words(false), true);
    assert_eq!(with.word_chunks, 48, "{with:?}");
    assert_eq!(without.word_chunks, 0);
    assert_eq!(with.chunks, 64);
    // The random pages cost their 64 KiB either way; the tables, as differences,
    // less than a third of what they cost as they are.
    let random = 16 * 4096;
    assert!(
        (with_bytes - random) * 3 < without_bytes - random,
        "{with_bytes} B with word differences, {without_bytes} B without"
    );
}

#[test]
fn code_pages_cross_with_absolute_branch_targets_and_are_rebuilt_exactly() {
    // 32 pages of x86-like code (calls of a few functions from many places) and 16
    // pages of random bytes, one batch, compressed; restored and hashed together or
    // one frame at a time, the stream is rebuilt exactly either way.
    let mut pages: Vec<Vec<u8>> = (0..32)
        .map(|i| wire::fuzzing::code(4096, 100 + i))
        .collect();
    for i in 0..16 {
        pages.push(workload_raw(7000 + i, 4096));
    }
    let input: Vec<u8> = pages.concat();
    let (with, with_bytes) = pages_compressed(&input, |e| e.set_branches(true), true);
    let (one_by_one, _) = pages_compressed(&input, |e| e.set_branches(true), false);
    let (without, without_bytes) = pages_compressed(&input, |e| e.set_branches(false), true);
    assert_eq!(with.branch_chunks, 32, "{with:?}");
    assert_eq!(one_by_one.branch_chunks, 32);
    assert_eq!(without.branch_chunks, 0);
    assert!(
        with_bytes < without_bytes,
        "{with_bytes} B with absolute branch targets, {without_bytes} B without"
    );
}

/// Sends `input` as 4 KiB blocks in one compressed batch (level 3) through a fresh
/// encoder, `set` up, and decoder, decoded frame by frame or all `together`; checks
/// every distinct page is stored and returns the encoder's counters and wire size.
fn pages_compressed(
    input: &[u8],
    set: impl FnOnce(&mut Encoder),
    together: bool,
) -> (EncoderStats, usize) {
    let store: Arc<dyn ContentStore> = Arc::new(TinyStore::new(1 << 30));
    let peer: Arc<dyn PeerHoldings> = Arc::new(Optimist::default());
    let mut enc = Encoder::new(
        peer,
        EncoderConfig {
            compress: CompressMode::Always,
            level: 3,
        },
    );
    set(&mut enc);
    let mut dec = Decoder::new(store, DecoderConfig::default());
    let wire_len = pages_through(&mut enc, &mut dec, input, true, together);
    let distinct: HashSet<&[u8]> = input.chunks(4096).collect();
    assert_eq!(dec.stats().chunks_stored, distinct.len() as u64);
    (enc.stats(), wire_len)
}

/// Sends each input in turn as 4 KiB blocks (as the QEMU and NBD parsers cut them)
/// through one encoder/decoder pair per input, sharing store, peer model and delta
/// bases; checks each is rebuilt exactly and returns each one's counters and wire size.
fn send_pages_in_turn(inputs: [Vec<u8>; 2]) -> Vec<(EncoderStats, DecoderStats, usize)> {
    let store = Arc::new(TinyStore::new(1 << 30));
    let peer: Arc<dyn PeerHoldings> = Arc::new(Optimist::default());
    let similar: Arc<dyn SimilarChunks> = Arc::new(Similar::default());
    let mut results = Vec::new();
    for input in inputs {
        let mut enc =
            Encoder::new(peer.clone(), EncoderConfig::default()).with_deltas(similar.clone());
        let mut dec = Decoder::new(store.clone(), DecoderConfig::default());
        let wire_len = pages_through(&mut enc, &mut dec, &input, false, false);
        results.push((enc.stats().clone(), dec.stats().clone(), wire_len));
    }
    results
}

/// Encodes `input` as 4 KiB blocks (as the QEMU and NBD parsers cut them) into one
/// batch (`link_limited` feeds the compression policy), decodes it with `dec` frame by
/// frame or all `together`, checks the stream is rebuilt exactly and finished, and
/// returns the batch's wire size.
fn pages_through(
    enc: &mut Encoder,
    dec: &mut Decoder,
    input: &[u8],
    link_limited: bool,
    together: bool,
) -> usize {
    let mut ledger = SendLedger::new();
    for page in input.chunks(4096) {
        enc.handle_segment(
            wire::Segment::Block(Bytes::copy_from_slice(page)),
            &mut ledger,
        );
    }
    enc.handle_end();
    let wire_bytes = enc.take_batch(link_limited).unwrap();
    let mut buf = BytesMut::from(&wire_bytes[..]);
    let mut fdec = FrameDecoder::new();
    let mut frames = Vec::new();
    while let Some(f) = fdec.decode(&mut buf).unwrap() {
        if together {
            frames.push(f);
        } else {
            dec.handle_frame(f).unwrap();
        }
    }
    assert!(buf.is_empty(), "the batch ends inside a frame");
    dec.handle_frames(&mut frames).unwrap();
    let out: Vec<u8> = std::iter::from_fn(|| dec.poll_output())
        .flat_map(|b| b.to_vec())
        .collect();
    assert!(out == input, "rebuilt stream differs");
    assert!(dec.is_finished());
    wire_bytes.len()
}

/// Sends `input` over one connection with compression always on, in small batches,
/// with or without a compression stream; returns the wire bytes and encoder counters.
fn send_compressed(input: &[u8], window_log: Option<u32>) -> (usize, EncoderStats) {
    let (wire, stats) = send_compressed_by(input, window_log, false);
    (wire.len(), stats)
}

/// [`send_compressed`], with the batches compressed by the encoder or (`own`) by a
/// separate compressor as the edge does; returns the wire bytes themselves.
fn send_compressed_by(input: &[u8], window_log: Option<u32>, own: bool) -> (Vec<u8>, EncoderStats) {
    let store: Arc<dyn ContentStore> = Arc::new(TinyStore::new(0));
    let peer: Arc<dyn PeerHoldings> = Arc::new(Optimist(Mutex::default(), 0));
    let similar: Arc<dyn SimilarChunks> = Arc::new(Similar::default());
    let mut c = Conn::new(input.to_vec(), store, peer, similar, CompressMode::Always);
    if own {
        c = c.with_own_compressor(CompressMode::Always);
    }
    c.enc.set_deltas(false);
    c.set_stream(window_log, 1);
    let mut wire = Vec::new();
    for _ in 0..100_000 {
        if c.done() {
            break;
        }
        c.send_step(16 * 1024, true, true);
        wire.extend_from_slice(&c.wire);
        c.recv_step(usize::MAX);
        c.control_step();
    }
    assert!(c.done(), "connection did not finish");
    c.check_finished();
    (wire, c.stats())
}

#[test]
fn a_separate_compressor_makes_the_encoders_wire_bytes() {
    // The edge compresses taken batches on another thread: same batches, same
    // settings, so the same bytes and counters as the encoder compressing them itself.
    let p = pool(7);
    let input = workload(7, 400_000, &p);
    for window_log in [None, Some(20)] {
        let (inline, s1) = send_compressed_by(&input, window_log, false);
        let (separate, s2) = send_compressed_by(&input, window_log, true);
        assert!(s1.compression.batches_compressed > 5, "{s1:?}");
        assert_eq!(s1, s2);
        assert!(inline == separate, "wire bytes differ ({window_log:?})");
    }
}

#[test]
fn a_compression_stream_reaches_back_across_batches() {
    // Text-like records that recur with small changes far apart: each batch alone
    // sees each record once, the stream sees it again and again.
    let records: Vec<Vec<u8>> = (0..48).map(|i| workload_raw(5000 + i, 700)).collect();
    let mut input = Vec::new();
    for round in 0..12u32 {
        for (i, r) in records.iter().enumerate() {
            input.extend_from_slice(r);
            input.extend_from_slice(format!("#{round}:{i};").as_bytes());
        }
    }
    let (alone, s1) = send_compressed(&input, None);
    let (streamed, s2) = send_compressed(&input, Some(20));
    assert_eq!(s1.compression.batches_streamed, 0);
    assert!(s2.compression.batches_streamed > 10, "{s2:?}");
    assert!(
        streamed * 3 < alone,
        "stream {streamed} B vs batches alone {alone} B"
    );
}
