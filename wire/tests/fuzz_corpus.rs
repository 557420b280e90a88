//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the entry points
//! in `wire::fuzzing`, so every input a fuzzer ever kept (seeds, coverage finds, past
//! crashes) is a regression test on stable, without cargo-fuzz.
//!
//! `generate_seed_corpus` (ignored) writes the hand-made seeds:
//! `cargo test -p shrinker-wire --test fuzz_corpus -- --ignored generate_seed_corpus`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use wire::frame::{self, Frame};
use wire::handshake::{Hello, HelloReply};
use wire::segment::Segment;
use wire::session::{CompressMode, Encoder, EncoderConfig, SendLedger};
use wire::{fuzzing, ChunkId, Holding, PeerHoldings};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Corpus inputs that still panic because of a reported, not yet fixed, bug in `wire`:
/// `(target, file name, text the panic message must contain)`. They are replayed too,
/// and must panic with that message; once the bug is fixed the replay fails and asks
/// for the entry to be removed, so the input becomes an ordinary regression test.
const KNOWN_BUGS: &[(&str, &str, &str)] = &[];

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Runs every file of `fuzz/corpus/<target>/` through `entry`; fails on an empty or
/// missing directory, and names every input that panicked (or, for a [`KNOWN_BUGS`]
/// entry, that no longer panics as expected).
fn replay(target: &str, entry: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read corpus {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus {} is empty: the replay would test nothing",
        dir.display()
    );
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("read corpus file");
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let known = KNOWN_BUGS
            .iter()
            .find(|(t, n, _)| *t == target && *n == name);
        match (std::panic::catch_unwind(|| entry(&data)), known) {
            (Ok(()), None) => {}
            (Err(_), None) => failed.push(format!("{}: panicked", f.display())),
            (Err(p), Some((_, _, expect))) => {
                let msg = panic_text(&*p);
                if msg.contains(expect) {
                    eprintln!("known bug still present: {} ({msg:.80})", f.display());
                } else {
                    failed.push(format!(
                        "{}: known-bug input panicked differently: {msg}",
                        f.display()
                    ));
                }
            }
            (Ok(()), Some(_)) => failed.push(format!(
                "{}: known bug looks fixed (no panic): remove its KNOWN_BUGS entry \
                 (and the `known-bug-` prefix of the file name)",
                f.display()
            )),
        }
    }
    for (t, n, _) in KNOWN_BUGS {
        if *t == target && !files.iter().any(|f| f.ends_with(n)) {
            failed.push(format!("KNOWN_BUGS entry {t}/{n} has no corpus file"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs failed:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn replay_frame_decoder() {
    replay("frame_decoder", fuzzing::frame_decoder);
}

#[test]
fn replay_handshake() {
    replay("handshake", fuzzing::handshake);
}

#[test]
fn replay_chunker_split_invariance() {
    replay(
        "chunker_split_invariance",
        fuzzing::chunker_split_invariance,
    );
}

#[test]
fn replay_session_decoder() {
    replay("session_decoder", fuzzing::session_decoder);
}

#[test]
fn replay_tunnel_roundtrip() {
    replay("tunnel_roundtrip", fuzzing::tunnel_roundtrip);
}

#[test]
fn replay_delta_patch() {
    replay("delta_patch", fuzzing::delta_patch);
}

#[test]
fn replay_word_differences() {
    replay("word_differences", fuzzing::word_differences);
}

#[test]
fn replay_branch_targets() {
    replay("branch_targets", fuzzing::branch_targets);
}

#[test]
fn qemu_segment_corpus() {
    replay("qemu_segment", fuzzing::qemu_segment);
}

// ---------------------------------------------------------------------------------------
// Seed generation
// ---------------------------------------------------------------------------------------

fn noise(n: usize, seed: u64) -> Vec<u8> {
    wire::fuzzing::noise(n, seed)
}

/// A few pages drawn from a small pool, with zero runs: content that deduplicates.
fn pagey(n: usize, seed: u64) -> Vec<u8> {
    let pool: Vec<Vec<u8>> = (0..3)
        .map(|i| noise(700 + 300 * i, seed + i as u64))
        .collect();
    let mut out = Vec::new();
    let mut i = seed as usize;
    while out.len() < n {
        i = i.wrapping_mul(7).wrapping_add(3);
        match i % 4 {
            0 => out.extend_from_slice(&[0u8; 400]),
            _ => out.extend_from_slice(&pool[i % pool.len()]),
        }
    }
    out.truncate(n);
    out
}

fn enc(frames: &[Frame]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b);
    }
    b.to_vec()
}

fn zbatch(frames: &[Frame]) -> Vec<u8> {
    let raw = enc(frames);
    let z = zstd::bulk::compress(&raw, 1).expect("zstd");
    let mut b = BytesMut::new();
    frame::encode_zbatch_header(&mut b, raw.len(), z.len());
    b.extend_from_slice(&z);
    b.to_vec()
}

/// Two ZSTREAM frames, each carrying `frames`, as consecutive pieces of one stream.
fn zstream_pieces(frames: &[Frame]) -> [Vec<u8>; 2] {
    let raw = enc(frames);
    let mut c = wire::zstream::StreamCompressor::new(18).expect("zstd context");
    [(); 2].map(|()| {
        let piece = c.compress(&raw, 3).expect("zstd");
        let mut b = BytesMut::new();
        frame::encode_zstream_header(&mut b, piece.fresh, raw.len(), piece.bytes.len());
        b.extend_from_slice(&piece.bytes);
        b.to_vec()
    })
}

fn with_header(header: &[u8], body: &[u8]) -> Vec<u8> {
    [header, body].concat()
}

#[derive(Default)]
struct Optimist(Mutex<HashSet<ChunkId>>);

impl PeerHoldings for Optimist {
    fn check_and_mark(&self, id: &ChunkId, _len: usize) -> Holding {
        if self.0.lock().unwrap().insert(*id) {
            Holding::Absent
        } else {
            Holding::Held
        }
    }
    fn forget(&self, id: &ChunkId) {
        self.0.lock().unwrap().remove(id);
    }
}

/// What the real encoder puts on the wire for `input` (cut into fixed blocks).
fn encoder_stream(input: &[u8], mode: CompressMode) -> Vec<u8> {
    encoder_output(input, mode, None)
}

/// [`encoder_stream`], with batches as pieces of a compression stream of
/// `2^window_log` bytes of history when given.
fn encoder_output(input: &[u8], mode: CompressMode, window_log: Option<u32>) -> Vec<u8> {
    let mut e = Encoder::new(
        std::sync::Arc::new(Optimist::default()),
        EncoderConfig {
            compress: mode,
            level: 1,
        },
    );
    e.set_stream(window_log);
    let mut ledger = SendLedger::new();
    let mut out = Vec::new();
    for piece in input.chunks(700) {
        let seg = if piece.len() >= 512 {
            Segment::Block(Bytes::copy_from_slice(piece))
        } else {
            Segment::Opaque(Bytes::copy_from_slice(piece))
        };
        e.handle_segment(seg, &mut ledger);
        if e.batch_len() > 2000 {
            out.extend_from_slice(&e.take_batch(true).expect("batch"));
        }
    }
    e.handle_end();
    out.extend_from_slice(&e.take_batch(true).expect("end"));
    out
}

/// Named seed inputs of one target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn write_seeds(target: &str, seeds: &Seeds, entry: fn(&[u8])) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    for (name, data) in seeds {
        // A seed must itself pass, or the replay tests would fail on it.
        if std::panic::catch_unwind(|| entry(data)).is_err() {
            panic!("seed {target}/{name} fails its own entry point");
        }
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
    }
}

fn frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let chunk = Bytes::from(noise(600, 1));
    let id = ChunkId::of(&chunk);
    let table = Bytes::from(wire::words::difference(&tabley(512, 1, 0x5000), 1));
    let code = Bytes::from(wire::branches::absolute(&fuzzing::code(4096, 5)).0);
    let every = vec![
        Frame::Literal(Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n")),
        Frame::Chunk(chunk.clone()),
        Frame::Words {
            stride: 1,
            diffs: table.clone(),
        },
        Frame::Branches(code.clone()),
        Frame::Ref(id),
        Frame::RefRecent(id),
        Frame::Delta {
            base_recent: true,
            zstd: false,
            base: id,
            id: ChunkId::of(b"target"),
            patch: Bytes::from_static(&[0, 2, 7, 7, 100, 1, 9]),
        },
        Frame::Follow { group: id, pos: 3 },
        Frame::Next,
        Frame::Miss(id),
        Frame::Fill {
            id,
            data: chunk.clone(),
        },
        Frame::Ack(0),
        Frame::Ack(300),
        Frame::Ack(u64::MAX),
        Frame::Literal(Bytes::new()),
        Frame::Reset("target refused: connection reset — ☃".into()),
        Frame::End,
        Frame::Done,
    ];
    let data_frames = vec![
        Frame::Literal(Bytes::from_static(b"hello")),
        Frame::Chunk(chunk.clone()),
        Frame::Words {
            stride: 8,
            diffs: table.clone(),
        },
        Frame::Branches(code.clone()),
        Frame::Ref(id),
        Frame::RefRecent(id),
        Frame::Ref(id),
        Frame::Follow { group: id, pos: 0 },
        Frame::Next,
        Frame::Literal(Bytes::from_static(b"page header")),
        Frame::Next,
    ];
    let encoder_tables = encoder_output(
        &[tabley(512, 1, 0x9000), tabley(512, 8, 0x77)].concat(),
        CompressMode::Always,
        Some(18),
    );
    let mut words = 0;
    let (mut wire_bytes, mut dec) = (
        BytesMut::from(&encoder_tables[..]),
        frame::FrameDecoder::new(),
    );
    while let Some(f) = dec.decode(&mut wire_bytes).expect("the encoder's frames") {
        words += usize::from(matches!(f, Frame::Words { .. }));
    }
    assert!(words > 0, "the table seed holds no WORDS frame");
    let mut mixed = enc(&every[..3]);
    mixed.extend(zbatch(&data_frames));
    mixed.extend(enc(&[Frame::Ack(9), Frame::End]));
    let mut control_in_batch = zbatch(&[Frame::Ack(1)]);
    control_in_batch.extend(enc(&[Frame::End]));
    let mut truncated_batch = zbatch(&data_frames);
    truncated_batch.truncate(truncated_batch.len() - 3);
    vec![
        ("every-frame-whole", with_header(&[0, 0], &enc(&every))),
        ("every-frame-bytewise", with_header(&[1, 0], &enc(&every))),
        ("every-frame-step7", with_header(&[2, 6], &enc(&every))),
        ("every-frame-random", with_header(&[3, 0x5a], &enc(&every))),
        ("zbatch", with_header(&[3, 1], &zbatch(&data_frames))),
        ("zbatch-empty", with_header(&[1, 0], &zbatch(&[]))),
        ("zbatch-with-ack", with_header(&[0, 0], &control_in_batch)),
        ("zbatch-truncated", with_header(&[2, 30], &truncated_batch)),
        (
            "zstream-two-pieces",
            with_header(&[2, 11], &zstream_pieces(&data_frames).concat()),
        ),
        ("mixed", with_header(&[3, 9], &mixed)),
        (
            "encoder-always",
            with_header(
                &[3, 77],
                &encoder_stream(&pagey(6000, 3), CompressMode::Always),
            ),
        ),
        (
            "encoder-zstream",
            with_header(
                &[3, 5],
                &encoder_output(&pagey(6000, 5), CompressMode::Always, Some(18)),
            ),
        ),
        // The stream's later pieces without its first: must be refused, not decoded.
        (
            "zstream-missing-first-piece",
            with_header(&[0, 0], &zstream_pieces(&data_frames)[1]),
        ),
        (
            "encoder-off",
            with_header(
                &[2, 200],
                &encoder_stream(&pagey(3000, 4), CompressMode::Off),
            ),
        ),
        // Malformed on purpose: unknown type, overlong varint, RESET not UTF-8,
        // LITERAL over the cap.
        (
            "unknown-type",
            with_header(&[0, 0], &[0x01, 0x01, b'x', 0x0a]),
        ),
        (
            "overlong-varint",
            with_header(&[1, 0], &[[0x06].as_slice(), &[0xff; 11]].concat()),
        ),
        (
            "reset-not-utf8",
            with_header(&[0, 0], &[0x08, 0x02, 0xc3, 0x28]),
        ),
        (
            "literal-too-long",
            with_header(&[0, 0], &[0x01, 0x81, 0x80, 0x40]),
        ),
        // WORDS with a stride of 0 and of 65 (the largest is 64).
        (
            "words-stride-0",
            with_header(&[0, 0], &[0x0d, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]),
        ),
        (
            "words-stride-65",
            with_header(&[1, 0], &[0x0d, 0x41, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]),
        ),
        ("encoder-tables", with_header(&[3, 21], &encoder_tables)),
        // FOLLOW cut short.
        (
            "follow-truncated",
            with_header(&[1, 0], &[&[0x0e][..], &[7; 20]].concat()),
        ),
    ]
}

fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hello = Hello {
        edge: "site-a".into(),
        epoch: 0x0123_4567_89ab_cdef,
        cache_bytes: 1 << 30,
        window: 64 << 20,
        target: "10.0.0.1:4444".into(),
        open_seq: 7,
        after_seq: 6,
    };
    let ok = HelloReply {
        edge: "site-b".into(),
        epoch: 42,
        cache_bytes: 2 << 30,
        window: 64 << 20,
        result: Ok(()),
    };
    let refused = HelloReply {
        edge: "site-b".into(),
        epoch: 42,
        cache_bytes: 0,
        window: 1,
        result: Err("connect to 10.0.0.1:4444: connection refused".into()),
    };
    let long = Hello {
        edge: "e".repeat(255),
        target: format!("{}.example:443", "h".repeat(1800)),
        ..hello.clone()
    };
    let mut b = BytesMut::new();
    hello.encode(&mut b);
    let hello_b = b.split().to_vec();
    ok.encode(&mut b);
    let ok_b = b.split().to_vec();
    refused.encode(&mut b);
    let refused_b = b.split().to_vec();
    long.encode(&mut b);
    let long_b = b.split().to_vec();
    let mut v2 = hello_b.clone();
    v2[5] = 2;
    vec![
        ("hello-whole", with_header(&[0, 0], &hello_b)),
        ("hello-bytewise", with_header(&[1, 0], &hello_b)),
        (
            "hello-then-frames",
            with_header(&[3, 3], &[hello_b.clone(), vec![7]].concat()),
        ),
        ("reply-ok", with_header(&[2, 4], &ok_b)),
        ("reply-refused", with_header(&[3, 8], &refused_b)),
        ("hello-long", with_header(&[2, 100], &long_b)),
        (
            "two-replies",
            with_header(&[0, 0], &[ok_b, refused_b].concat()),
        ),
        ("version-2", with_header(&[0, 0], &v2)),
        ("not-shrinker", with_header(&[1, 0], b"GET / HTTP/1.1\r\n")),
    ]
}

fn chunker_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("noise-whole", with_header(&[0, 0, 0], &noise(4000, 5))),
        ("noise-bytewise", with_header(&[1, 0, 3], &noise(3000, 6))),
        ("noise-random", with_header(&[3, 0x21, 7], &noise(4000, 7))),
        ("pages-step", with_header(&[2, 99, 1], &pagey(4000, 8))),
        ("zeros", with_header(&[3, 7, 7], &[0u8; 3000])),
        (
            "text",
            with_header(
                &[2, 15, 2],
                &b"the quick brown fox jumps over the lazy dog. ".repeat(60),
            ),
        ),
    ]
}

fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let blocks = fuzzing::session_known_blocks();
    let ids: Vec<ChunkId> = blocks.iter().map(|b| ChunkId::of(b)).collect();
    let sent = fuzzing::session_ledger_sent();
    let fresh = Bytes::from(noise(900, 11));
    let fresh_id = ChunkId::of(&fresh);
    let mut edited0 = blocks[0].to_vec();
    edited0[3] ^= 0x55;
    let honest = enc(&[
        Frame::Literal(Bytes::from_static(b"abc")),
        Frame::Ref(ids[0]),
        Frame::Ref(ids[2]),
        Frame::Literal(Bytes::from_static(b"queued behind a miss")),
        Frame::RefRecent(ids[1]),
        Frame::Ref(ids[3]),
        Frame::Delta {
            base_recent: false,
            zstd: false,
            base: ids[0],
            id: ChunkId::of(&edited0),
            patch: wire::delta::encode(&blocks[0], &edited0, 4096).expect("patch"),
        },
        Frame::Chunk(fresh.clone()),
        Frame::Words {
            stride: 1,
            diffs: Bytes::from(wire::words::difference(&tabley(256, 1, 0xabc000), 1)),
        },
        Frame::Branches(Bytes::from(
            wire::branches::absolute(&fuzzing::code(2048, 11)).0,
        )),
        Frame::Fill {
            id: ids[3],
            data: blocks[3].clone(),
        },
        Frame::Fill {
            id: ids[2],
            data: blocks[2].clone(),
        },
        Frame::Ref(fresh_id),
        Frame::End,
    ]);
    let ledger = enc(&[
        Frame::Miss(ids[1]),
        Frame::Ack(50),
        Frame::Miss(ids[2]),
        Frame::Ack(sent - blocks[3].len() as u64),
        Frame::Miss(ids[3]),
        Frame::Ack(sent),
        Frame::Miss(ids[3]),
    ]);
    let mut batched = zbatch(&[
        Frame::Ref(ids[0]),
        Frame::Literal(Bytes::from_static(b"xyz")),
        Frame::Ref(ids[2]),
    ]);
    batched.extend(enc(&[
        Frame::Miss(ids[2]),
        Frame::Fill {
            id: ids[2],
            data: blocks[2].clone(),
        },
        Frame::Ack(sent),
        Frame::End,
    ]));
    let corrupt = enc(&[
        Frame::Ref(ids[2]),
        Frame::Fill {
            id: ids[2],
            data: blocks[1].clone(),
        },
        Frame::Chunk(fresh.clone()),
    ]);
    let bad_ledger = enc(&[Frame::Ack(sent + 1), Frame::Miss(fresh_id), Frame::Ack(10)]);
    let after_end = enc(&[
        Frame::End,
        Frame::Literal(Bytes::from_static(b"late")),
        Frame::Reset("bye".into()),
    ]);
    // A run of references into a group of four known blocks: the group itself is
    // missing (MISS), then filled; the last NEXT goes past its end (an error).
    let content: Vec<u8> = ids.iter().flat_map(|i| i.0).collect();
    let group = ChunkId::of(&content);
    let runs = enc(&[
        Frame::Follow { group, pos: 0 },
        Frame::Literal(Bytes::from_static(b"hdr")),
        Frame::Next,
        Frame::Next,
        Frame::Fill {
            id: group,
            data: Bytes::from(content.clone()),
        },
        Frame::Next,
        Frame::Follow { group, pos: 2 },
        Frame::Next,
        Frame::Next,
        Frame::End,
    ]);
    let next_alone = enc(&[Frame::Next, Frame::End]);
    let many_waits = enc(&(0..40)
        .map(|i| Frame::Ref(ChunkId::of(&[i])))
        .collect::<Vec<_>>());
    vec![
        (
            "honest-big-store",
            with_header(&[0, 0, 0x03 | 0x30], &honest),
        ),
        (
            "honest-no-store-idle",
            with_header(&[1, 0, 0x40 | 0x30 | 0x04], &honest),
        ),
        (
            "honest-small-window",
            with_header(&[3, 5, 0x02 | 0x10], &honest),
        ),
        ("ledger", with_header(&[2, 40, 0x30], &ledger)),
        (
            "zbatch-and-control",
            with_header(&[3, 17, 0x43 | 0x08 | 0x30], &batched),
        ),
        ("corrupt", with_header(&[0, 0, 0x33], &corrupt)),
        ("runs", with_header(&[0, 0, 0x03 | 0x30], &runs)),
        ("runs-tiny-store", with_header(&[1, 3, 0x01 | 0x30], &runs)),
        (
            "next-without-follow",
            with_header(&[0, 0, 0x30], &next_alone),
        ),
        ("bad-ledger", with_header(&[0, 0, 0x30], &bad_ledger)),
        ("data-after-end", with_header(&[0, 0, 0x30], &after_end)),
        (
            "many-waits-window",
            with_header(&[2, 32, 0x10], &many_waits),
        ),
    ]
}

fn tunnel_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let h = |h0: u8, h1: u8, s: [u8; 2], r: [u8; 2]| [h0, h1, s[0], s[1], r[0], r[1]];
    vec![
        ("empty", h(0, 0, [0, 0], [0, 0]).to_vec()),
        (
            "text-whole",
            with_header(&h(7, 0x40, [0, 0], [0, 0]), b"hello, tunnel\n"),
        ),
        (
            "pages-big-store-always",
            with_header(
                &h(0x07 | 0x10 | 0x40, 0x40, [3, 11], [3, 12]),
                &pagey(4000, 21),
            ),
        ),
        (
            "pages-no-store",
            with_header(&h(0x08 | 0x20, 0x08, [2, 150], [2, 90]), &pagey(3000, 22)),
        ),
        (
            "pages-tiny-store-evict",
            with_header(
                &h(0x03 | 0x10 | 0x80, 0x02 | 0x40, [3, 1], [1, 0]),
                &pagey(4000, 23),
            ),
        ),
        (
            "noise-medium-store-flush",
            with_header(
                &h(0x04 | 0x18, 0x20 | 0x18, [3, 99], [3, 100]),
                &noise(2500, 24),
            ),
        ),
        (
            "code-always-stream",
            with_header(
                &h(0x07 | 0x10 | 0x40, 0x40, [3, 11], [3, 12]),
                &fuzzing::code(9000, 41),
            ),
        ),
        (
            "tables-always-stream",
            with_header(
                &h(0x07 | 0x10 | 0x40, 0x40, [3, 11], [3, 12]),
                &[tabley(1024, 1, 0x4000), tabley(1024, 8, 0x99)].concat(),
            ),
        ),
        (
            "zeros-forget",
            with_header(
                &h(0x02 | 0x40 | 0x10, 0x01 | 0x10, [2, 63], [3, 7]),
                &[0u8; 3000],
            ),
        ),
    ]
}

/// Writes the hand-made seeds into `fuzz/corpus/<target>/seed-*` (overwriting them).
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn generate_seed_corpus() {
    write_seeds("frame_decoder", &frame_seeds(), fuzzing::frame_decoder);
    write_seeds("handshake", &handshake_seeds(), fuzzing::handshake);
    write_seeds(
        "chunker_split_invariance",
        &chunker_seeds(),
        fuzzing::chunker_split_invariance,
    );
    write_seeds(
        "session_decoder",
        &session_seeds(),
        fuzzing::session_decoder,
    );
    write_seeds(
        "tunnel_roundtrip",
        &tunnel_seeds(),
        fuzzing::tunnel_roundtrip,
    );
    write_seeds("delta_patch", &delta_seeds(), fuzzing::delta_patch);
    write_seeds("word_differences", &word_seeds(), fuzzing::word_differences);
    write_seeds("branch_targets", &branch_seeds(), fuzzing::branch_targets);
}

/// Tables of 64-bit words growing by a constant, every `k`-th word stepping (1: a
/// page table; 8: 64-byte records): content the encoder sends as word differences.
fn tabley(words: u64, k: u64, seed: u64) -> Vec<u8> {
    (0..words)
        .flat_map(|i| {
            let w = if i % k == 0 {
                seed.wrapping_add(i / k * 0x1000) | 0x63
            } else {
                seed.rotate_left((i % k) as u32).wrapping_add(i / k * 0x40)
            };
            w.to_le_bytes()
        })
        .collect()
}

fn word_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", vec![]),
        (
            "page-table",
            [&[0u8][..], &tabley(512, 1, 0x1234_5000)].concat(),
        ),
        (
            "records",
            [&[7u8][..], &tabley(512, 8, 0xffff_ea00_0000_0000)].concat(),
        ),
        (
            "odd-tail",
            [&[63u8][..], &tabley(100, 1, 77)[..797]].concat(),
        ),
        ("noise", [&[200u8][..], &noise(4096, 31)].concat()),
        ("zeros", vec![0u8; 4097]),
    ]
}

fn branch_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Opcodes whose operands sit on the edge of the near range, and at the very end.
    let mut edges = vec![0xE8, 0xff, 0xff, 0xff, 0x00, 0xE9, 0x00, 0x00, 0x00, 0x01];
    edges.extend_from_slice(&[0xE8, 0xff, 0xff, 0xff, 0xfe, 0xE8, 0xE8, 0xE9, 0xE8]);
    vec![
        ("empty", vec![]),
        ("code", fuzzing::code(4096, 3)),
        (
            "code-absolute",
            wire::branches::absolute(&fuzzing::code(4096, 4)).0,
        ),
        ("edges", edges),
        ("noise", noise(4096, 77)),
    ]
}

fn delta_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let edits: Vec<u8> = [(8u16, 1u8), (9, 2), (10, 3), (2000, 9), (4000, 0)]
        .iter()
        .flat_map(|&(at, v)| {
            let [lo, hi] = at.to_le_bytes();
            [lo, hi, v]
        })
        .collect();
    vec![
        ("few-edits", [&[255u8, 7][..], &edits].concat()),
        ("no-edits", vec![0, 1]),
        ("garbage", with_header(&[3, 9], &noise(200, 5))),
        (
            "one-edit-end",
            vec![255, 3, 0, 0x10, 0xAA, 0x0b, 0xff, 0x0f, 1],
        ),
        (
            "zstd-frame",
            with_header(&[9, 4], &zstd::bulk::compress(&noise(300, 8), 1).unwrap()),
        ),
    ]
}
