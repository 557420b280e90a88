//! Offline encoding of guest RAM images: what the sending edge would put on the WAN
//! for migrations of these images, one after another to the same peer, without QEMU,
//! sockets or timing. Each image is framed like a QEMU precopy stream (an 8-byte page
//! header per page, zero pages as one byte, other pages as 4 KiB blocks) and goes
//! through the real encoder with the edge's shared peer model and delta index, batches
//! of 256 KiB, compression as on a link-limited connection. Prints the bytes by kind
//! and, with `--baseline`, one zstd -3 --long=30 stream over all images for
//! comparison. Use it to weigh encoder changes on real memory in seconds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cache::{GroupMap, PeerIndex, SimilarIndex};
use wire::segment::Segment;
use wire::session::{CompressMode, Encoder, EncoderConfig, EncoderStats, SendLedger};
use wire::{GroupIndex, PeerHoldings, SimilarChunks};

const PAGE: usize = 4096;
const BATCH: usize = 256 * 1024;

/// Arguments of `shrinker-bench encode`.
#[derive(clap::Args, Debug)]
pub struct EncodeArgs {
    /// Guest RAM images (e.g. from a `memory-backend-file`), migrated in this order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// zstd level of batches and deltas.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// History of the compression stream as a power of two (0: batches alone).
    #[arg(long, default_value_t = 23)]
    stream_window_log: u32,
    /// Memory for delta bases in MiB (0: no deltas).
    #[arg(long, default_value_t = 512)]
    delta_mib: u64,
    /// Memory for groups of block ids in MiB (0: references one by one).
    #[arg(long, default_value_t = 64)]
    group_mib: u64,
    /// Also compress all images as one zstd -3 --long=30 stream.
    #[arg(long)]
    baseline: bool,
    /// In-place deltas only: no zstd deltas (what the edge does below the strong
    /// level).
    #[arg(long)]
    no_zstd_deltas: bool,
    /// Send every new chunk as it is: no word differences (WORDS frames).
    #[arg(long)]
    no_words: bool,
    /// Send x86 code as it is: no absolute branch targets (BRANCHES frames).
    #[arg(long)]
    no_branches: bool,
    /// Also write every batch's frames, uncompressed, to this file (what zstd sees:
    /// e.g. `zstd -b1 -e9` on it compares levels and parameters).
    #[arg(long)]
    dump_batches: Option<PathBuf>,
}

/// Runs the encoding and prints the report.
pub fn run(a: EncodeArgs) -> anyhow::Result<()> {
    let peer: Arc<dyn PeerHoldings> = Arc::new(PeerIndex::new(u64::MAX / 2));
    let similar = (a.delta_mib > 0)
        .then(|| Arc::new(SimilarIndex::new(a.delta_mib << 20)) as Arc<dyn SimilarChunks>);
    let groups = (a.group_mib > 0)
        .then(|| Arc::new(GroupMap::new(a.group_mib << 20)) as Arc<dyn GroupIndex>);
    let mut total = 0usize;
    let mut images = Vec::new();
    let mut dump = match &a.dump_batches {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?,
        )),
        None => None,
    };
    for file in &a.files {
        let image = std::fs::read(file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
        let started = Instant::now();
        let (wire, s) = encode_image(
            &image,
            &a,
            (peer.clone(), similar.clone(), groups.clone()),
            &mut dump,
        )?;
        total += wire;
        println!(
            "{}: {} B -> {wire} B on the WAN in {:.1} s: {} refs ({} in runs, {} runs), {} deltas ({} at their run's place; {} B of pages as {} B, {} zstd), {} chunks ({} B, {} as word differences, {} with absolute branch targets), {} of {} batches streamed",
            file.display(),
            image.len(),
            started.elapsed().as_secs_f64(),
            s.refs,
            s.group_refs,
            s.follows,
            s.deltas,
            s.positional_deltas,
            s.delta_bytes,
            s.delta_patch_bytes,
            s.zstd_deltas,
            s.chunks,
            s.chunk_bytes,
            s.word_chunks,
            s.branch_chunks,
            s.compression.batches_streamed,
            s.compression.batches_compressed,
        );
        if a.baseline {
            images.push(image);
        }
    }
    if let Some(d) = dump.as_mut() {
        std::io::Write::flush(d)?;
    }
    println!("total: {total} B");
    if a.baseline {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3)?;
        enc.long_distance_matching(true)?;
        enc.window_log(30)?;
        for image in &images {
            std::io::Write::write_all(&mut enc, image)?;
        }
        let long30 = enc.finish()?.len();
        println!(
            "one zstd -3 --long=30 stream: {long30} B; encoder / long30 = {:.3}",
            total as f64 / long30 as f64
        );
    }
    Ok(())
}

/// Where `--dump-batches` writes.
type Dump = std::io::BufWriter<std::fs::File>;

/// The edge-wide state every image's connection shares: what the peer holds, delta
/// bases, groups.
type Shared = (
    Arc<dyn PeerHoldings>,
    Option<Arc<dyn SimilarChunks>>,
    Option<Arc<dyn GroupIndex>>,
);

/// Encodes one image as one connection; returns its wire bytes and counters. With
/// `dump`, every batch's uncompressed frames are written there too.
fn encode_image(
    image: &[u8],
    a: &EncodeArgs,
    (peer, similar, groups): Shared,
    dump: &mut Option<Dump>,
) -> anyhow::Result<(usize, EncoderStats)> {
    let config = EncoderConfig {
        compress: CompressMode::Always,
        level: a.level,
    };
    let peer_for_ledger = peer.clone();
    let mut enc = Encoder::new(peer, config);
    if let Some(similar) = similar {
        enc = enc.with_deltas(similar);
    }
    if let Some(groups) = groups {
        enc = enc.with_groups(groups);
    }
    enc.set_stream((a.stream_window_log > 0).then_some(a.stream_window_log));
    if a.no_zstd_deltas {
        enc.set_thorough(false);
    }
    enc.set_words(!a.no_words);
    enc.set_branches(!a.no_branches);
    let mut ledger = SendLedger::new().confirming(peer_for_ledger);
    let mut wire = 0usize;
    let mut segments = Vec::new();
    for (n, page) in image.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|&b| b == 0);
        // QEMU's page header: the page's offset with its flags in the low bits.
        let header = ((n * PAGE) as u64 | if zero { 0x2 } else { 0x8 }).to_be_bytes();
        segments.push(Segment::Opaque(Bytes::copy_from_slice(&header)));
        if zero {
            segments.push(Segment::Opaque(Bytes::from_static(&[0])));
        } else {
            segments.push(Segment::Block(Bytes::copy_from_slice(page)));
        }
        // As the edge does: the segments of one read (here 64 pages) together.
        if n % 64 == 63 {
            enc.handle_segments(&mut segments, &mut ledger);
        }
        if enc.batch_len() >= BATCH {
            wire += take_batch(&mut enc, dump)?.unwrap_or(0);
        }
        // Nothing is lost in this model: every byte counts as acknowledged at once.
        let sent = ledger.sent();
        ledger
            .handle_control(wire::Frame::Ack(sent))
            .expect("acknowledging what was sent");
    }
    enc.handle_segments(&mut segments, &mut ledger);
    enc.handle_end();
    while let Some(n) = take_batch(&mut enc, dump)? {
        wire += n;
    }
    Ok((wire, enc.stats().clone()))
}

/// The wire bytes of the next batch, if there is one, its frames written to `dump`
/// first.
fn take_batch(enc: &mut Encoder, dump: &mut Option<Dump>) -> anyhow::Result<Option<usize>> {
    let Some(batch) = enc.take_raw_batch() else {
        return Ok(None);
    };
    if let Some(d) = dump {
        std::io::Write::write_all(d, batch.frames())?;
    }
    Ok(Some(enc.compress_batch(batch, true).len()))
}
