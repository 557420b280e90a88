//! `shrinker inspect`: what captured migration streams hold and what the edge pair
//! would send for them, against the ideal.
//!
//! Each file is segmented exactly as the edge segments a connection, then encoded by
//! the same encoder with a peer that holds everything sent before (files are taken as
//! one cluster, in order). The **ideal** is every distinct block once plus every
//! non-block byte, compressed the same way the pair compresses (zstd-1 per batch, only
//! where it pays): what a perfect deduplicator with the same compressor would send.

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::BytesMut;
use serde::Serialize;
use wire::segment::{detecting_segmenter, Segment};
use wire::session::{CompressMode, CompressPolicy, Encoder, EncoderConfig, SendLedger};
use wire::{ChunkId, ChunkParams, GroupIndex, Holding, PeerHoldings};

/// Input bytes per encoder batch: what one read burst of the edge holds.
const BATCH: usize = 256 * 1024;

/// Options of `shrinker inspect`.
#[derive(Clone, Debug, clap::Args)]
pub struct InspectArgs {
    /// Captured streams (e.g. from `migrate "exec:cat > FILE"`), taken as one cluster
    /// in the order given.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Compression the pair would use on the WAN: off or always.
    #[arg(long, default_value = "always")]
    pub compress: CompressMode,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What one file holds and costs.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct FileReport {
    /// The file.
    pub file: String,
    /// Stream kind detected.
    pub kind: String,
    /// Bytes in the file.
    pub bytes: u64,
    /// RAM PAGE records (4 KiB payloads).
    pub pages: u64,
    /// RAM ZERO records (no payload).
    pub zero_pages: u64,
    /// Disk blocks (legacy block migration).
    pub disk_blocks: u64,
    /// Blocks sent as blocks (pages + disk blocks + content-defined chunks).
    pub blocks: u64,
    /// Bytes that are not block payloads.
    pub other_bytes: u64,
    /// Blocks whose content no earlier block (in any file) had.
    pub distinct_blocks: u64,
    /// Bytes of those blocks.
    pub distinct_block_bytes: u64,
    /// Where the parser gave up, if it did.
    pub gave_up: Option<String>,
    /// Bytes the pair would put on the WAN (tunnel frames, before TLS).
    pub wan_bytes: u64,
    /// The ideal: distinct blocks + other bytes, compressed the same way.
    pub ideal_bytes: u64,
}

/// A peer that keeps everything: the model of an edge whose store fits the cluster.
/// Everything is acknowledged as soon as it is encoded, so every id it holds is
/// confirmed (runs of references follow any group formed before).
#[derive(Default)]
struct HoldsAll(Mutex<HashSet<ChunkId>>);

impl PeerHoldings for HoldsAll {
    fn check_and_mark(&self, id: &ChunkId, _len: usize) -> Holding {
        if self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(*id) {
            Holding::Absent
        } else {
            Holding::Held
        }
    }
    fn forget(&self, id: &ChunkId) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
    fn confirmed(&self, id: &ChunkId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
}

/// Compresses the ideal payload batch by batch, like the encoder.
struct IdealCounter {
    batch: Vec<u8>,
    compress: bool,
    zstd: zstd::bulk::Compressor<'static>,
    bytes: u64,
}

impl IdealCounter {
    fn new(compress: bool) -> anyhow::Result<Self> {
        Ok(IdealCounter {
            batch: Vec::new(),
            compress,
            zstd: zstd::bulk::Compressor::new(1)?,
            bytes: 0,
        })
    }
    fn add(&mut self, data: &[u8]) {
        self.batch.extend_from_slice(data);
    }
    fn flush(&mut self) -> anyhow::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let raw = self.batch.len();
        let mut n = raw;
        if self.compress {
            let z = self.zstd.compress(&self.batch)?;
            if CompressPolicy::pays(raw, z.len()) {
                n = z.len();
            }
        }
        self.bytes += n as u64;
        self.batch.clear();
        Ok(())
    }
}

/// Analyses `files` as one cluster.
///
/// # Errors
/// A file that cannot be read.
pub fn inspect(args: &InspectArgs, progress: bool) -> anyhow::Result<Vec<FileReport>> {
    let peer: Arc<HoldsAll> = Arc::new(HoldsAll::default());
    // As an edge with the default budget: runs of references across the files.
    let groups: Arc<dyn GroupIndex> =
        Arc::new(cache::GroupMap::new(crate::config::DEFAULT_GROUP_MEM));
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let total: u64 = args
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = if progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut reports = Vec::new();
    for path in &args.files {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        bar.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let mut seg = detecting_segmenter(ChunkParams::DEFAULT);
        let mut enc = Encoder::new(
            peer.clone(),
            EncoderConfig {
                compress: args.compress,
                level: 1,
            },
        )
        .with_groups(groups.clone());
        let mut ledger = SendLedger::new();
        let mut ideal = IdealCounter::new(args.compress != CompressMode::Off)?;
        let mut rep = FileReport {
            file: path.display().to_string(),
            ..Default::default()
        };
        let mut input = BytesMut::with_capacity(BATCH);
        let mut segs = Vec::new();
        let mut wan = 0u64;
        let mut eof = false;
        while !eof {
            input.reserve(BATCH);
            let mut chunk = vec![0u8; BATCH];
            let n = file
                .read(&mut chunk)
                .with_context(|| format!("reading {}", path.display()))?;
            eof = n == 0;
            input.extend_from_slice(&chunk[..n]);
            rep.bytes += n as u64;
            bar.inc(n as u64);
            seg.segment(&mut input, eof, &mut segs);
            for s in segs.drain(..) {
                match &s {
                    Segment::Block(b) => {
                        rep.blocks += 1;
                        if seen.insert(ChunkId::of(b)) {
                            rep.distinct_blocks += 1;
                            rep.distinct_block_bytes += b.len() as u64;
                            ideal.add(b);
                        }
                    }
                    Segment::Opaque(b) => {
                        rep.other_bytes += b.len() as u64;
                        ideal.add(b);
                    }
                }
                enc.handle_segment(s, &mut ledger);
            }
            if eof {
                enc.handle_end();
            }
            if let Some(batch) = enc.take_batch(true) {
                wan += batch.len() as u64;
            }
            ideal.flush()?;
        }
        let r = seg.report();
        rep.kind = r.kind.to_string();
        let counter = |name| {
            r.counters
                .iter()
                .find(|(k, _)| *k == name)
                .map_or(0, |c| c.1)
        };
        rep.pages = counter("pages");
        rep.zero_pages = counter("zero_pages");
        rep.disk_blocks = counter("disk_blocks");
        rep.gave_up = r.gave_up.map(|(at, why)| format!("at byte {at}: {why}"));
        rep.wan_bytes = wan;
        rep.ideal_bytes = ideal.bytes;
        reports.push(rep);
    }
    bar.finish_and_clear();
    Ok(reports)
}

/// Runs `shrinker inspect`, printing a table or JSON.
///
/// # Errors
/// A file that cannot be read.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !args.json;
    let reports = inspect(&args, progress)?;
    let sum = |f: fn(&FileReport) -> u64| reports.iter().map(f).sum::<u64>();
    let totals = FileReport {
        file: "total".into(),
        kind: String::new(),
        bytes: sum(|r| r.bytes),
        pages: sum(|r| r.pages),
        zero_pages: sum(|r| r.zero_pages),
        disk_blocks: sum(|r| r.disk_blocks),
        blocks: sum(|r| r.blocks),
        other_bytes: sum(|r| r.other_bytes),
        distinct_blocks: sum(|r| r.distinct_blocks),
        distinct_block_bytes: sum(|r| r.distinct_block_bytes),
        gave_up: None,
        wan_bytes: sum(|r| r.wan_bytes),
        ideal_bytes: sum(|r| r.ideal_bytes),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "files": reports, "total": totals })
            )?
        );
        return Ok(());
    }
    println!(
        "{:<28} {:>9} {:>12} {:>9} {:>9} {:>11} {:>9} {:>12} {:>12} {:>7} {:>7}",
        "file",
        "kind",
        "bytes",
        "pages",
        "zero pg",
        "other B",
        "distinct",
        "pair WAN B",
        "ideal B",
        "WAN %",
        "/ideal"
    );
    for r in reports.iter().chain(std::iter::once(&totals)) {
        let name = r.file.rsplit('/').next().unwrap_or(&r.file);
        println!(
            "{:<28} {:>9} {:>12} {:>9} {:>9} {:>11} {:>9} {:>12} {:>12} {:>6.1}% {:>7.3}",
            name,
            r.kind,
            r.bytes,
            r.pages + r.disk_blocks,
            r.zero_pages,
            r.other_bytes,
            r.distinct_blocks,
            r.wan_bytes,
            r.ideal_bytes,
            100.0 * r.wan_bytes as f64 / r.bytes.max(1) as f64,
            r.wan_bytes as f64 / r.ideal_bytes.max(1) as f64
        );
        if let Some(g) = &r.gave_up {
            println!("    parser fell back to content-defined chunking {g}");
        }
    }
    println!("(pair WAN bytes are tunnel frames before TLS; ideal = distinct blocks once + all other bytes, compressed the same way)");
    Ok(())
}
