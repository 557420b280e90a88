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
//! four-VM cluster at 1 Gbit/s (12 rounds, 256 MiB against none) the edges' CPU fell
//! from a median of 1.305 to 1.150 s and the migration from 1.490 to 1.405 s
//! (docs/BENCHMARKS.md §4 "A heap touched before serving").

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
    let cap = prefault_cap();
    let bytes = cap.map_or(bytes, |c| bytes.min(c));
    let started = Instant::now();
    let touched = touch(bytes);
    Prefault::Touched(touched, started.elapsed())
}

/// The most a prefault may touch here: half the memory the machine has available
/// (`MemAvailable`), and half the room left under this process's cgroup memory limit
/// (v2 or v1), whichever is less; `None` when neither can be read. A sidecar started
/// with a memory limit below `--prefault-mem` would otherwise be killed at start-up.
pub fn prefault_cap() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let machine = read("/proc/meminfo").and_then(|t| mem_available(&t));
    let cgroup = read("/proc/self/cgroup").and_then(|groups| {
        let rooms = cgroup_dirs(&groups).into_iter().filter_map(|(dir, v2)| {
            let (limit, usage) = if v2 {
                ("memory.max", "memory.current")
            } else {
                ("memory.limit_in_bytes", "memory.usage_in_bytes")
            };
            cgroup_room(
                &read(&format!("{dir}/{limit}"))?,
                &read(&format!("{dir}/{usage}"))?,
            )
        });
        rooms.min()
    });
    [machine, cgroup]
        .into_iter()
        .flatten()
        .min()
        .map(|room| room / 2)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The memory cgroup directories `/proc/self/cgroup` names, with whether each is
/// cgroup v2 (`0::PATH`) or v1 (`N:memory:PATH`); inside a container the path may be
/// `/`, which is the container's own group.
pub fn cgroup_dirs(groups: &str) -> Vec<(String, bool)> {
    groups
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_end_matches('/');
            if controllers.is_empty() {
                Some((format!("/sys/fs/cgroup{path}"), true))
            } else if controllers.split(',').any(|c| c == "memory") {
                Some((format!("/sys/fs/cgroup/memory{path}"), false))
            } else {
                None
            }
        })
        .collect()
}

/// Room left under a cgroup's memory limit given its limit and usage files' text;
/// `None` without a limit (`max`, or v1's huge stand-in for none).
fn cgroup_room(limit: &str, usage: &str) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok().filter(|&l| l < 1 << 60)?;
    let usage: u64 = usage.trim().parse().ok()?;
    Some(limit.saturating_sub(usage))
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
    fn the_cap_is_half_the_room_the_machine_and_the_cgroup_leave() {
        let meminfo = "MemTotal:       24684000 kB\nMemAvailable:   1048576 kB\n";
        assert_eq!(mem_available(meminfo), Some(1 << 30));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        let v2 = cgroup_dirs("0::/system.slice/edge.service\n");
        assert_eq!(
            v2,
            [("/sys/fs/cgroup/system.slice/edge.service".to_string(), true)]
        );
        let v1 = cgroup_dirs("5:devices:/\n4:memory:/docker/abc\n0::/\n");
        assert_eq!(
            v1,
            [
                ("/sys/fs/cgroup/memory/docker/abc".to_string(), false),
                ("/sys/fs/cgroup".to_string(), true)
            ]
        );
        assert_eq!(cgroup_room("268435456\n", "16777216\n"), Some(240 << 20));
        assert_eq!(cgroup_room("max\n", "16777216\n"), None);
        assert_eq!(cgroup_room("9223372036854771712\n", "1\n"), None);
        // Here: something readable (this machine's /proc/meminfo at least).
        assert!(prefault_cap().is_some_and(|c| c > 0));
    }

    #[test]
    fn touching_rounds_up_to_whole_pieces() {
        assert_eq!(touch(1), TOUCH_PIECE as u64);
        assert_eq!(touch(TOUCH_PIECE as u64 + 1), 2 * TOUCH_PIECE as u64);
    }
}
