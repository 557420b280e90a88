//! The QEMU main-channel segmenter on a real QEMU 7.2 capture: byte-exact under any
//! read split and any flush pattern, every RAM page found, and graceful fallback on
//! damaged or foreign input.

use std::collections::HashSet;

use bytes::BytesMut;
use proptest::prelude::*;
use wire::segment::{detecting_segmenter, Segment, Segmenter};
use wire::ChunkParams;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let z = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    zstd::decode_all(&z[..]).unwrap()
}

/// Feeds `input` in pieces of the given sizes (cycled); flushes where told.
fn run(input: &[u8], sizes: &[usize], flush_every: bool) -> (Vec<Segment>, Box<dyn Segmenter>) {
    let mut seg = detecting_segmenter(ChunkParams::DEFAULT);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < input.len() {
        let n = sizes[i % sizes.len()].max(1).min(input.len() - at);
        i += 1;
        buf.extend_from_slice(&input[at..at + n]);
        at += n;
        seg.segment(&mut buf, flush_every, &mut out);
    }
    seg.segment(&mut buf, true, &mut out);
    assert!(buf.is_empty(), "flush left bytes behind");
    (out, seg)
}

fn concat(segs: &[Segment]) -> Vec<u8> {
    segs.iter()
        .flat_map(|s| s.bytes().iter().copied())
        .collect()
}

/// The bytes of the Block segments, in order.
fn blocks(segs: &[Segment]) -> Vec<Vec<u8>> {
    segs.iter()
        .filter_map(|s| match s {
            Segment::Block(b) => Some(b.to_vec()),
            _ => None,
        })
        .collect()
}

fn nonzero_pages(ram: &[u8]) -> HashSet<Vec<u8>> {
    ram.chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .map(|p| p.to_vec())
        .collect()
}

/// Captures of the same 16 MiB guest (`pc-16M.ram.zst`) migrated by each QEMU version.
const CAPTURES: [&str; 2] = ["qemu-7.2-pc-16M.mig.zst", "qemu-10.0-pc-16M.mig.zst"];

#[test]
fn real_capture_every_page_found_any_split() {
    let ram = fixture("pc-16M.ram.zst");
    let want = nonzero_pages(&ram);
    for capture in CAPTURES {
        let stream = fixture(capture);
        for sizes in [
            &[1usize << 20][..],
            &[1, 2, 3, 5, 7, 4096, 9],
            &[65_536, 4095, 32_768],
            &[13],
        ] {
            let (segs, seg) = run(&stream, sizes, false);
            assert!(
                concat(&segs) == stream,
                "not byte-exact with splits {sizes:?}"
            );
            let blocks: HashSet<Vec<u8>> = segs
                .iter()
                .filter_map(|s| match s {
                    Segment::Block(b) if b.len() == 4096 => Some(b.to_vec()),
                    _ => None,
                })
                .collect();
            let missing = want.iter().filter(|p| !blocks.contains(*p)).count();
            assert_eq!(
                missing, 0,
                "{missing} guest pages not recognised as blocks (splits {sizes:?})"
            );
            let r = seg.report();
            assert_eq!(r.kind, "qemu-main");
            assert!(
                !seg.awaits_replies(),
                "a precopy stream does not wait for replies"
            );
            assert_eq!(r.gave_up, None, "{r:?}");
            assert_eq!(r.blocks_lost, 0);
            let pages = r.counters.iter().find(|(k, _)| *k == "pages").unwrap().1;
            assert_eq!(r.blocks, pages, "every PAGE record became a block");
            assert!(
                r.counters
                    .iter()
                    .any(|(k, v)| *k == "zero_pages" && *v > 3000),
                "{r:?}"
            );
        }
    }
}

#[test]
fn flush_after_every_read_stays_exact() {
    for capture in CAPTURES {
        let stream = fixture(capture);
        let (segs, seg) = run(&stream, &[1000, 3, 70_000], true);
        assert!(concat(&segs) == stream);
        let r = seg.report();
        assert_eq!(r.gave_up, None, "flushes must not derail the parser: {r:?}");
        assert!(r.blocks > 0);
    }
}

#[test]
fn foreign_stream_falls_back_to_cdc() {
    let data: Vec<u8> = (0..200_000u32)
        .flat_map(|i| (i.wrapping_mul(2654435761) >> 7).to_le_bytes())
        .collect();
    let (segs, seg) = run(&data, &[4096], false);
    assert!(concat(&segs) == data);
    assert_eq!(seg.report().kind, "unknown");
    assert!(seg.report().fallback_bytes > 0);
}

#[test]
fn damage_after_the_header_gives_up_but_stays_exact() {
    let mut stream = fixture("qemu-7.2-pc-16M.mig.zst");
    // Corrupt a RAM record header somewhere in the middle.
    let at = stream.len() / 2;
    for b in &mut stream[at..at + 64] {
        *b = 0xEE;
    }
    let (segs, seg) = run(&stream, &[4096, 17], false);
    assert!(concat(&segs) == stream);
    assert!(seg.report().gave_up.is_some() || seg.report().blocks > 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Mutated captures (flips, cuts, insertions) never break exactness or panic.
    #[test]
    fn mutated_capture_is_exact(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        sizes in proptest::collection::vec(1usize..70_000, 1..6),
        flush in any::<bool>(),
    ) {
        let mut stream = fixture(CAPTURES[edits.len() % 2]);
        stream.truncate(300_000);
        for (idx, byte, kind) in edits {
            let i = idx.index(stream.len());
            match kind {
                0 => stream[i] = byte,
                1 => stream.insert(i, byte),
                _ => { stream.truncate(i.max(1)); }
            }
        }
        let (segs, _) = run(&stream, &sizes, flush);
        prop_assert!(concat(&segs) == stream);
    }

    /// Mutated NBD streams, both directions (flips, cuts, insertions), never break
    /// exactness or panic, and an intact one finds every aligned block at any split.
    #[test]
    fn mutated_nbd_streams_are_exact(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..6),
        sizes in proptest::collection::vec(1usize..9_000, 1..6),
        flush in any::<bool>(),
        which in 0u8..3,
    ) {
        let (mut stream, pages) = match which {
            0 => nbd_stream(),
            1 => nbd_server_stream(true),
            _ => nbd_server_stream(false),
        };
        let intact = edits.iter().all(|e| e.2 == 3);
        for (idx, byte, kind) in edits {
            let i = idx.index(stream.len());
            match kind {
                0 => stream[i] = byte,
                1 => stream.insert(i, byte),
                2 => { stream.truncate(i.max(1)); }
                _ => {}
            }
        }
        let (segs, _) = run(&stream, &sizes, flush);
        prop_assert!(concat(&segs) == stream);
        if intact && which < 2 && !flush {
            let blocks = blocks(&segs);
            prop_assert_eq!(blocks, pages);
        }
    }
}

#[test]
fn multifd_channel_pages_found_and_opaque_packets_skipped() {
    let seed = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/qemu_segment/seed-multifd-opaque"
    ))
    .unwrap();
    let stream = &seed[3..];
    for sizes in [&[1usize << 20][..], &[1, 7, 1344, 4096], &[100]] {
        let (segs, seg) = run(stream, sizes, false);
        assert!(concat(&segs) == stream);
        let r = seg.report();
        assert_eq!(r.kind, "qemu-multifd", "{r:?}");
        assert_eq!(r.gave_up, None, "{r:?}");
        assert_eq!(r.blocks, 1, "the one uncompressed page is a block: {r:?}");
        assert!(r.counters.contains(&("opaque_packets", 2)), "{r:?}");
    }
}

/// An NBD client stream as QEMU's mirror sends it: flags, options, then compact and
/// extended requests; WRITE payloads become blocks at 4 KiB-aligned disk offsets only.
fn nbd_stream() -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut s = vec![0, 0, 0, 3];
    let opt = |s: &mut Vec<u8>, o: u32, data: &[u8]| {
        s.extend_from_slice(b"IHAVEOPT");
        s.extend_from_slice(&o.to_be_bytes());
        s.extend_from_slice(&(data.len() as u32).to_be_bytes());
        s.extend_from_slice(data);
    };
    opt(&mut s, 11, b""); // EXTENDED_HEADERS
    opt(
        &mut s,
        10,
        b"\0\0\0\x02d0\0\0\0\x01\0\0\0\x0fbase:allocation",
    );
    opt(&mut s, 7, b"\0\0\0\x02d0\0\x01\0\x03");
    let page = |i: u8| vec![i; 4096];
    let mut aligned_pages = Vec::new();
    // Compact WRITE at an aligned offset: 3 blocks.
    let w = |s: &mut Vec<u8>, ext: bool, ty: u16, off: u64, data: &[u8]| {
        if ext {
            s.extend_from_slice(&0x21E4_1C71u32.to_be_bytes());
        } else {
            s.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        }
        s.extend_from_slice(&0u16.to_be_bytes());
        s.extend_from_slice(&ty.to_be_bytes());
        s.extend_from_slice(&7u64.to_be_bytes());
        s.extend_from_slice(&off.to_be_bytes());
        if ext {
            s.extend_from_slice(&(data.len() as u64).to_be_bytes());
        } else {
            s.extend_from_slice(&(data.len() as u32).to_be_bytes());
        }
        s.extend_from_slice(data);
    };
    let body: Vec<u8> = (0..3).flat_map(|i| page(i + 1)).collect();
    w(&mut s, false, 1, 65536, &body);
    aligned_pages.extend((0..3).map(|i| page(i + 1)));
    // Extended WRITE without PAYLOAD_LEN (as QEMU 10.0 sends), unaligned start:
    // 512 bytes of head, two aligned blocks, 100 bytes of tail.
    let mut body = vec![9u8; 512];
    body.extend(page(20));
    body.extend(page(21));
    body.extend(vec![8u8; 100]);
    w(&mut s, true, 1, 8192 - 512, &body);
    aligned_pages.push(page(20));
    aligned_pages.push(page(21));
    // FLUSH and WRITE_ZEROES carry no payload; DISC ends.
    w(&mut s, false, 3, 0, &[]);
    let mut wz = Vec::new();
    w(&mut wz, false, 6, 0, &[]);
    wz[24..28].copy_from_slice(&(1u32 << 20).to_be_bytes());
    s.extend(wz);
    w(&mut s, false, 2, 0, &[]);
    (s, aligned_pages)
}

#[test]
fn nbd_writes_become_aligned_blocks() {
    let (stream, pages) = nbd_stream();
    for sizes in [&[1usize << 20][..], &[1, 3, 28, 4096], &[5]] {
        let (segs, seg) = run(&stream, sizes, false);
        assert!(concat(&segs) == stream);
        let r = seg.report();
        assert_eq!(r.kind, "nbd-client", "{r:?}");
        assert!(seg.awaits_replies(), "NBD's writes wait for their replies");
        assert_eq!(r.gave_up, None, "{r:?}");
        let blocks = blocks(&segs);
        assert_eq!(blocks, pages, "exactly the aligned 4 KiB pieces, in order");
        assert!(r.counters.contains(&("writes", 2)), "{r:?}");
    }
}

/// An NBD server stream: greeting, option replies (structured replies acknowledged,
/// GO answered with INFO then ACK), then a simple reply, structured READ data at an
/// aligned and at an unaligned disk offset, a hole chunk, and an extended reply.
/// Returns the stream and the aligned 4 KiB pieces of READ data, in order.
fn nbd_server_stream(structured: bool) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut s = b"NBDMAGICIHAVEOPT\0\x03".to_vec();
    let rep = |s: &mut Vec<u8>, opt: u32, ty: u32, data: &[u8]| {
        s.extend_from_slice(&0x0003_E889_0455_65A9u64.to_be_bytes());
        s.extend_from_slice(&opt.to_be_bytes());
        s.extend_from_slice(&ty.to_be_bytes());
        s.extend_from_slice(&(data.len() as u32).to_be_bytes());
        s.extend_from_slice(data);
    };
    if structured {
        rep(&mut s, 8, 1, b""); // STRUCTURED_REPLY: ACK
    } else {
        rep(&mut s, 8, (1 << 31) | 1, b"unsupported"); // an error reply
    }
    rep(&mut s, 7, 3, b"\0\0\0\0\0\0\x40\0\0\0\x01\x0d"); // GO: INFO_EXPORT
    rep(&mut s, 7, 1, b""); // GO: ACK, transmission begins
    s.extend_from_slice(&0x6744_6698u32.to_be_bytes()); // simple reply (a FLUSH's)
    s.extend_from_slice(&[0; 12]);
    let page = |i: u8| vec![i; 4096];
    let mut pages = Vec::new();
    let chunk = |s: &mut Vec<u8>, ext: bool, ty: u16, payload: &[u8]| {
        if ext {
            s.extend_from_slice(&0x6E8A_278Cu32.to_be_bytes());
        } else {
            s.extend_from_slice(&0x668E_33EFu32.to_be_bytes());
        }
        s.extend_from_slice(&1u16.to_be_bytes()); // DONE
        s.extend_from_slice(&ty.to_be_bytes());
        s.extend_from_slice(&9u64.to_be_bytes()); // cookie
        if ext {
            s.extend_from_slice(&0u64.to_be_bytes());
            s.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        } else {
            s.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        }
        s.extend_from_slice(payload);
    };
    let data = |off: u64, body: &[u8]| {
        let mut p = off.to_be_bytes().to_vec();
        p.extend_from_slice(body);
        p
    };
    let body: Vec<u8> = (0..3).flat_map(|i| page(i + 1)).collect();
    chunk(&mut s, false, 1, &data(1 << 20, &body));
    pages.extend((0..3).map(|i| page(i + 1)));
    chunk(&mut s, false, 2, &data(0, &4096u32.to_be_bytes())); // OFFSET_HOLE
    let mut body = vec![7u8; 1000];
    body.extend(page(30));
    body.extend(vec![6u8; 10]);
    chunk(&mut s, false, 1, &data(3 * 4096 - 1000, &body));
    pages.push(page(30));
    chunk(&mut s, true, 1, &data(8192, &page(40)));
    pages.push(page(40));
    (s, pages)
}

#[test]
fn nbd_read_replies_become_aligned_blocks() {
    let (stream, pages) = nbd_server_stream(true);
    for sizes in [&[1usize << 20][..], &[1, 3, 20, 4096], &[7]] {
        let (segs, seg) = run(&stream, sizes, false);
        assert!(concat(&segs) == stream);
        let r = seg.report();
        assert_eq!(r.kind, "nbd-server", "{r:?}");
        assert!(seg.awaits_replies(), "NBD's replies answer requests");
        assert_eq!(r.gave_up, None, "{r:?}");
        let blocks = blocks(&segs);
        assert_eq!(blocks, pages, "exactly the aligned 4 KiB pieces, in order");
        assert!(r.counters.contains(&("data_chunks", 3)), "{r:?}");
        assert!(r.counters.contains(&("replies", 5)), "{r:?}");
    }
}

#[test]
fn nbd_simple_replies_without_structured_ones_are_not_followed() {
    // Without structured replies a READ's data follows a simple reply, and only the
    // client's request says how long it is: the parser stops at the first reply.
    let (stream, _) = nbd_server_stream(false);
    let (segs, seg) = run(&stream, &[1 << 20], false);
    assert!(concat(&segs) == stream);
    let r = seg.report();
    assert_eq!(r.kind, "nbd-server", "{r:?}");
    let (at, why) = r.gave_up.clone().expect("gave up");
    assert!(why.contains("simple replies"), "{why}");
    assert_eq!(at, 18 + 3 * 20 + 11 + 12, "{r:?}");
}

#[test]
fn nbd_offsets_at_the_end_of_the_range_yield_no_blocks() {
    // A WRITE (client) and READ data (server) claiming disk offsets where offset +
    // length passes 2^64: no real disk, so no blocks, no overflow, bytes exact.
    let mut client = vec![0, 0, 0, 3];
    client.extend_from_slice(b"IHAVEOPT\0\0\0\x07\0\0\0\0");
    client.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    client.extend_from_slice(&[0, 0, 0, 1]); // flags, WRITE
    client.extend_from_slice(&1u64.to_be_bytes());
    client.extend_from_slice(&(u64::MAX - 100).to_be_bytes());
    client.extend_from_slice(&8192u32.to_be_bytes());
    client.extend_from_slice(&[5; 8192]);
    let mut server = b"NBDMAGICIHAVEOPT\0\x03".to_vec();
    for (opt, ty) in [(8u32, 1u32), (7, 1)] {
        server.extend_from_slice(&0x0003_E889_0455_65A9u64.to_be_bytes());
        server.extend_from_slice(&opt.to_be_bytes());
        server.extend_from_slice(&ty.to_be_bytes());
        server.extend_from_slice(&0u32.to_be_bytes());
    }
    server.extend_from_slice(&0x668E_33EFu32.to_be_bytes());
    server.extend_from_slice(&[0, 1, 0, 1]); // DONE, OFFSET_DATA
    server.extend_from_slice(&1u64.to_be_bytes());
    server.extend_from_slice(&(8 + 8192u32).to_be_bytes());
    server.extend_from_slice(&(u64::MAX - 4000).to_be_bytes());
    server.extend_from_slice(&[6; 8192]);
    for (stream, kind) in [(client, "nbd-client"), (server, "nbd-server")] {
        let (segs, seg) = run(&stream, &[1 << 20], false);
        assert!(concat(&segs) == stream);
        let r = seg.report();
        assert_eq!(
            (r.kind, r.blocks, r.gave_up.clone()),
            (kind, 0, None),
            "{r:?}"
        );
    }
}

/// A main channel reopened by postcopy recovery: no header, RECV_BITMAP commands,
/// POSTCOPY_RESUME, then parts of the RAM section started on the lost connection.
#[test]
fn resumed_postcopy_channel_pages_found() {
    let cmd = |s: &mut Vec<u8>, cmd: u16, data: &[u8]| {
        s.push(0x08);
        s.extend_from_slice(&cmd.to_be_bytes());
        s.extend_from_slice(&(data.len() as u16).to_be_bytes());
        s.extend_from_slice(data);
    };
    let mut s = Vec::new();
    cmd(&mut s, 10, b"\x06pc.ram");
    cmd(&mut s, 10, b"\x14/rom@etc/acpi/tables");
    cmd(&mut s, 9, b""); // POSTCOPY_RESUME
    let page = |i: u8| vec![i; 4096];
    let mut pages = Vec::new();
    // A dirty-bitmap section's part (its own record format), skipped to its footer.
    s.push(0x02);
    s.extend_from_slice(&5u32.to_be_bytes());
    s.extend_from_slice(&[0x00, 0x00, 0x00, 0x24, 0x02, b'd', b'0']);
    s.extend_from_slice(&[0x55; 100]);
    s.extend_from_slice(&[0x7E, 0, 0, 0, 5]);
    s.push(0x02); // SECTION_PART of section 2 (the RAM section, started long ago)
    s.extend_from_slice(&2u32.to_be_bytes());
    s.extend_from_slice(&(0x0010_0000u64 | 0x08).to_be_bytes()); // PAGE, named block
    s.extend_from_slice(b"\x06pc.ram");
    s.extend(page(1));
    pages.push(page(1));
    s.extend_from_slice(&(0x0010_1000u64 | 0x08 | 0x20).to_be_bytes()); // PAGE, CONTINUE
    s.extend(page(2));
    pages.push(page(2));
    s.extend_from_slice(&(0x0010_2000u64 | 0x02 | 0x20).to_be_bytes()); // ZERO
    s.push(0);
    s.extend_from_slice(&0x10u64.to_be_bytes()); // EOS
    s.extend_from_slice(&[0x7E, 0, 0, 0, 2]); // footer
    s.push(0x03); // SECTION_END
    s.extend_from_slice(&2u32.to_be_bytes());
    s.extend_from_slice(&(0x0020_0000u64 | 0x08 | 0x20).to_be_bytes());
    s.extend(page(3));
    pages.push(page(3));
    s.extend_from_slice(&0x10u64.to_be_bytes());
    s.extend_from_slice(&[0x7E, 0, 0, 0, 2]);
    s.push(0x00); // EOF
    for sizes in [&[1usize << 20][..], &[1, 5, 13, 4096], &[3]] {
        let (segs, seg) = run(&s, sizes, false);
        assert!(concat(&segs) == s);
        let r = seg.report();
        assert_eq!(r.kind, "qemu-main", "{r:?}");
        assert_eq!(r.gave_up, None, "{r:?}");
        assert!(r.counters.contains(&("device_sections", 1)), "{r:?}");
        let blocks = blocks(&segs);
        assert_eq!(blocks, pages);
    }
}
