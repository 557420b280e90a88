//! Speed of what the sending edge does with every new chunk while batches are
//! compressed, before compression: the delta search's sketch (`wire::delta::Sketch`),
//! the word-difference price (`wire::words::choose`) and the branch-target scan
//! (`wire::branches::choose`), on the 4 KiB pages of real
//! files (guest RAM images, or the new pages `scripts/new_pages.py` extracts), with
//! BLAKE3 side by side (`PageHasher`, what every page gets) as the yardstick.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::hash::median;
use wire::page_hash::{PageHasher, PAGE};

/// Arguments of `shrinker-bench analyse`.
#[derive(clap::Args, Debug)]
pub struct AnalyseArgs {
    /// Files whose 4 KiB pages are analysed (a partial last page is left out).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Runs over all pages (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// Runs each analysis over every page, `runs` times, and prints ns per byte.
pub fn run(a: AnalyseArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs > 0, "--runs must be positive");
    let mut data = Vec::new();
    for f in &a.files {
        data.extend(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
    }
    let pages: Vec<&[u8]> = data.chunks_exact(PAGE).collect();
    anyhow::ensure!(!pages.is_empty(), "no whole 4 KiB page in the files");
    let bytes = pages.len() * PAGE;
    let mut hasher = PageHasher::new();
    let mut ids = Vec::with_capacity(pages.len());
    let (mut hash, mut sketch, mut words, mut branches) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut sketched, mut chosen, mut code) = (0usize, 0usize, 0usize);
    for run in 0..a.runs {
        let t = Instant::now();
        ids.clear();
        for group in pages.chunks(64) {
            hasher.hash_all(group, &mut ids);
        }
        hash.push(ns_per_byte(bytes, t));
        // How many pages `keep` takes, and its time per byte.
        let timed = |keep: &dyn Fn(&[u8]) -> bool| {
            let t = Instant::now();
            let n = pages.iter().filter(|p| keep(p)).count();
            (n, ns_per_byte(bytes, t))
        };
        let (n, ns) = timed(&|p| wire::delta::Sketch::of(p).is_some());
        sketched = n;
        sketch.push(ns);
        let (n, ns) = timed(&|p| wire::words::choose(p).is_some());
        chosen = n;
        words.push(ns);
        let (n, ns) = timed(&|p| wire::branches::choose(p).is_some());
        code = n;
        branches.push(ns);
        eprintln!(
            "run {}: BLAKE3 {:.3}, sketch {:.3}, word price {:.3}, branch scan {:.3} ns/B",
            run + 1,
            hash[run],
            sketch[run],
            words[run],
            branches[run]
        );
    }
    println!(
        "{} pages, median of {}: BLAKE3 side by side {:.3} ns/B, sketch {:.3} ns/B ({sketched} with features), word price {:.3} ns/B ({chosen} as differences), branch scan {:.3} ns/B ({code} as code)",
        pages.len(),
        a.runs,
        median(&mut hash),
        median(&mut sketch),
        median(&mut words),
        median(&mut branches)
    );
    Ok(())
}

fn ns_per_byte(bytes: usize, since: Instant) -> f64 {
    since.elapsed().as_nanos() as f64 / bytes as f64
}
