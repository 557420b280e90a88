//! The C allocator's settings for an edge process (glibc only).
//!
//! glibc's malloc gives each thread an arena of its own, and a thread's arena (other
//! than the main one) grows by one `mprotect` system call for every page it adds: no
//! padding, unlike the main arena's `brk`. An edge copies every chunk it keeps into
//! its stores (4 KiB pages, a fresh allocation each) from tokio worker threads, so
//! while its stores fill, a page copied cost a system call that rewrote the arena's
//! mapping as well as the page fault: the sending edge made 23,256 `mprotect` calls
//! over the four-VM cluster at 100 Mbit/s, and profiled during a later guest, `malloc`
//! growing its heap was 16% of its samples, more than the delta sketch. With one
//! arena (the main one; a few threads contend for its lock) grown 8 MiB at a time,
//! and buffers up to 32 MiB kept in it rather than mapped and unmapped each time
//! (which the one arena otherwise did 150 times, each mapping faulted in afresh), the
//! same run makes 4 `mprotect` and 4 `mmap` calls and 36 `brk`: the edges' CPU time
//! fell from a median of 3.35 to 3.02 s over four alternating runs, the migration
//! within the machine's noise (docs/BENCHMARKS.md §4 "The allocator's arenas").
//!
//! glibc reads these settings only from the `GLIBC_TUNABLES` environment variable when
//! a process starts (`mallopt` would need unsafe code, which this project forbids),
//! so an edge re-executes itself once with them set, unless the variable is already
//! set: a user's own tunables are kept as they are, and the re-executed edge sees its
//! own.
//!
//! The stores of a fresh edge still grow page by page: each page a chunk is copied
//! into is faulted in and cleared by the kernel the first time, ~80 thousand faults
//! for both edges over a four-VM cluster at ~2 µs each, 9% of the receiving edge's
//! samples. An edge that touches its heap before it serves ([`prefault_heap`],
//! `--prefault-mem`) moves that work out of its first migrations: the memory is
//! freed to malloc, and glibc's `trim_threshold`, raised above it in the tunables,
//! keeps it mapped at the top of the heap the stores are then carved from. Over the
//! four-VM cluster at 1 Gbit/s the edges' CPU fell by 0.14-0.25 s and the migration
//! by 7-10% (docs/BENCHMARKS.md §4 "A heap touched before serving").

use std::ffi::{OsStr, OsString};
use std::time::{Duration, Instant};

/// The tunables an edge runs with: one malloc arena, its heap grown 8 MiB at a time,
/// allocations below 32 MiB (glibc's largest threshold) served from it.
pub const EDGE_TUNABLES: &str =
    "glibc.malloc.arena_max=1:glibc.malloc.top_pad=8388608:glibc.malloc.mmap_threshold=33554432";

/// The tunable that keeps freed memory at the top of the heap mapped (glibc returns
/// it to the system beyond this much).
const TRIM_TUNABLE: &str = "glibc.malloc.trim_threshold";

/// Heap is touched in pieces of this size: below [`EDGE_TUNABLES`]' mmap threshold,
/// so they come from (and return to) the heap itself.
const TOUCH_PIECE: usize = 8 << 20;
/// The page size the kernel faults in (a write per page touches it).
const PAGE: usize = 4096;

/// The `GLIBC_TUNABLES` value for an edge that touches `prefault` bytes of heap at
/// start-up: [`EDGE_TUNABLES`], and with a prefault a trim threshold above it, so the
/// touched memory stays mapped once freed.
pub fn edge_tunables(prefault: u64) -> String {
    if prefault == 0 {
        EDGE_TUNABLES.to_string()
    } else {
        let keep = prefault.saturating_add(TOUCH_PIECE as u64 * 2);
        format!("{EDGE_TUNABLES}:{TRIM_TUNABLE}={keep}")
    }
}

/// The `GLIBC_TUNABLES` value to re-execute with, given the current one: `None` when
/// the variable is set already (by the user, or by this function's re-execution).
pub fn tunables_to_set(current: Option<&OsStr>, prefault: u64) -> Option<String> {
    current.is_none().then(|| edge_tunables(prefault))
}

/// Re-executes this process with [`edge_tunables`] in `GLIBC_TUNABLES` (same program,
/// arguments and process id), or returns at once where that does not apply (not
/// glibc, or the variable is set). Returns, with a warning on stderr, if the
/// re-execution fails: the edge then runs with glibc's defaults, only slower.
pub fn reexec_with_edge_tunables(prefault: u64) {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let Some(tunables) = tunables_to_set(std::env::var_os("GLIBC_TUNABLES").as_deref(), prefault)
    else {
        return;
    };
    let err = match std::env::current_exe() {
        Ok(exe) => exec(exe.as_os_str(), &tunables),
        Err(e) => e,
    };
    eprintln!(
        "shrinker: could not re-execute with malloc tunables ({err}); running with glibc's defaults (set GLIBC_TUNABLES={tunables} to apply them)"
    );
}

/// What [`prefault_heap`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefault {
    /// Touched this many bytes in this long.
    Touched(u64, Duration),
    /// Nothing to touch (a prefault of 0).
    Off,
    /// Not glibc: its allocator's settings do not apply, touching would be wasted.
    NotGlibc,
    /// `GLIBC_TUNABLES` has no `trim_threshold`: glibc would hand the touched memory
    /// straight back to the system when it is freed.
    NoTrimThreshold,
}

impl std::fmt::Display for Prefault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prefault::Touched(bytes, took) => write!(
                f,
                "touched {} MiB of heap in {:.2} s",
                bytes >> 20,
                took.as_secs_f64()
            ),
            Prefault::Off => write!(f, "heap not touched (--prefault-mem 0)"),
            Prefault::NotGlibc => write!(
                f,
                "heap not touched: --prefault-mem applies to glibc's allocator only"
            ),
            Prefault::NoTrimThreshold => write!(
                f,
                "heap not touched: GLIBC_TUNABLES is set without {TRIM_TUNABLE}, so glibc would return the memory at once (add {TRIM_TUNABLE}=BYTES above --prefault-mem, or unset GLIBC_TUNABLES)"
            ),
        }
    }
}

/// Touches `bytes` of heap (a write per page, in [`TOUCH_PIECE`]s) and frees it
/// again, so the stores fill memory already mapped (module notes). Call it before the
/// edge serves, in the process [`reexec_with_edge_tunables`] made, whose
/// `GLIBC_TUNABLES` (read here) says whether the memory stays mapped.
pub fn prefault_heap(bytes: u64) -> Prefault {
    if bytes == 0 {
        return Prefault::Off;
    }
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return Prefault::NotGlibc;
    }
    let keeps = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains(TRIM_TUNABLE));
    if !keeps {
        return Prefault::NoTrimThreshold;
    }
    let started = Instant::now();
    let touched = touch(bytes);
    Prefault::Touched(touched, started.elapsed())
}

/// Allocates `bytes` (rounded up to whole pieces), writes a byte in each page, frees
/// it all; returns the bytes touched.
fn touch(bytes: u64) -> u64 {
    let pieces = bytes.div_ceil(TOUCH_PIECE as u64) as usize;
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(pieces);
    for _ in 0..pieces {
        let mut piece = vec![0u8; TOUCH_PIECE];
        for page in piece.chunks_mut(PAGE) {
            page[0] = 1;
        }
        // The writes must happen though nothing reads them.
        std::hint::black_box(&mut piece);
        held.push(piece);
    }
    // Freed together, the pieces merge into the free top of the heap.
    (pieces * TOUCH_PIECE) as u64
}

/// Replaces this process image; returns only the error if that failed.
fn exec(exe: &OsStr, tunables: &str) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from(exe));
    std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_tunables_are_kept() {
        assert_eq!(tunables_to_set(None, 0).as_deref(), Some(EDGE_TUNABLES));
        assert_eq!(tunables_to_set(Some(OsStr::new("")), 0), None);
        assert_eq!(
            tunables_to_set(Some(OsStr::new("glibc.malloc.arena_max=4")), 1 << 30),
            None
        );
    }

    #[test]
    fn a_prefault_keeps_its_memory_mapped_above_what_it_touches() {
        assert_eq!(edge_tunables(0), EDGE_TUNABLES);
        let with = edge_tunables(1 << 30);
        let keep: u64 = with
            .strip_prefix(&format!("{EDGE_TUNABLES}:{TRIM_TUNABLE}="))
            .expect("the edge's tunables, then the trim threshold")
            .parse()
            .unwrap();
        assert!(keep > 1 << 30, "{with}");
        assert_eq!(prefault_heap(0), Prefault::Off);
    }

    #[test]
    fn touching_rounds_up_to_whole_pieces() {
        assert_eq!(touch(1), TOUCH_PIECE as u64);
        assert_eq!(touch(TOUCH_PIECE as u64 + 1), 2 * TOUCH_PIECE as u64);
    }
}
