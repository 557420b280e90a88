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

use std::ffi::{OsStr, OsString};

/// The tunables an edge runs with: one malloc arena, its heap grown 8 MiB at a time,
/// allocations below 32 MiB (glibc's largest threshold) served from it.
pub const EDGE_TUNABLES: &str =
    "glibc.malloc.arena_max=1:glibc.malloc.top_pad=8388608:glibc.malloc.mmap_threshold=33554432";

/// The `GLIBC_TUNABLES` value to re-execute with, given the current one: `None` when
/// the variable is set already (by the user, or by this function's re-execution).
pub fn tunables_to_set(current: Option<&OsStr>) -> Option<&'static str> {
    current.is_none().then_some(EDGE_TUNABLES)
}

/// Re-executes this process with [`EDGE_TUNABLES`] in `GLIBC_TUNABLES` (same program,
/// arguments and process id), or returns at once where that does not apply (not
/// glibc, or the variable is set). Returns, with a warning on stderr, if the
/// re-execution fails: the edge then runs with glibc's defaults, only slower.
pub fn reexec_with_edge_tunables() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let Some(tunables) = tunables_to_set(std::env::var_os("GLIBC_TUNABLES").as_deref()) else {
        return;
    };
    let err = match std::env::current_exe() {
        Ok(exe) => exec(exe.as_os_str(), tunables),
        Err(e) => e,
    };
    eprintln!(
        "shrinker: could not re-execute with malloc tunables ({err}); running with glibc's defaults (set GLIBC_TUNABLES={EDGE_TUNABLES} to apply them)"
    );
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
        assert_eq!(tunables_to_set(None), Some(EDGE_TUNABLES));
        assert_eq!(tunables_to_set(Some(OsStr::new(""))), None);
        assert_eq!(
            tunables_to_set(Some(OsStr::new("glibc.malloc.arena_max=4"))),
            None
        );
    }
}
