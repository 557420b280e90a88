//! The calling thread's CPU time: what a piece of work cost the CPU, apart from the
//! time the thread waited for a core. On a busy host a compression can take three
//! times its CPU time in wall-clock time; the governor needs both (see
//! `governor::CompressGovernor::record`).

use std::time::Duration;

use rustix::time::{clock_gettime, ClockId};

/// CPU time the calling thread has used so far.
pub(crate) fn thread_cpu_time() -> Duration {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_work_and_not_sleep() {
        let start = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time() - start;
        assert!(slept < Duration::from_millis(15), "sleeping cost {slept:?}");
        // Busy work advances it (bounded in wall time for a very busy machine).
        let start = thread_cpu_time();
        let wall = std::time::Instant::now();
        let mut x = 0u64;
        while thread_cpu_time() - start < Duration::from_millis(10) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            assert!(
                wall.elapsed() < Duration::from_secs(20),
                "CPU time stands still"
            );
        }
    }
}
