//! When to compress a batch of data frames.
//!
//! Compression must never become the bottleneck: zstd-1 runs at ~0.3-0.4 GB/s per core
//! on this class of machine, slower than a LAN and than a fast WAN. In `Auto` mode the
//! driver says whether the link is the bottleneck (`link_limited`: the tunnel's send
//! queue is backed up *and* it drains slower than compression runs), and the policy
//! backs off exponentially while compression does not pay (already-compressed or
//! random data).

/// User-facing compression setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompressMode {
    /// Never compress.
    Off,
    /// Compress when the link is the bottleneck and it pays.
    #[default]
    Auto,
    /// Compress every batch where it pays.
    Always,
}

impl std::str::FromStr for CompressMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(CompressMode::Off),
            "auto" => Ok(CompressMode::Auto),
            "always" => Ok(CompressMode::Always),
            other => Err(format!(
                "unknown compression mode {other:?}: use off, auto or always"
            )),
        }
    }
}

/// A batch pays when compression saves at least 1/16 of it.
const PAYS_NUMERATOR: usize = 15;
const PAYS_DENOMINATOR: usize = 16;
/// Longest back-off, in batches, after compression kept not paying.
const MAX_SKIP: u32 = 256;

/// Decides per batch whether to try compression.
#[derive(Clone, Debug)]
pub struct CompressPolicy {
    mode: CompressMode,
    skip: u32,
    next_skip: u32,
}

impl CompressPolicy {
    /// A policy for `mode`.
    pub fn new(mode: CompressMode) -> Self {
        CompressPolicy {
            mode,
            skip: 0,
            next_skip: 1,
        }
    }

    /// The configured mode.
    pub fn mode(&self) -> CompressMode {
        self.mode
    }

    /// Whether to try compressing the next batch; `link_limited` says the link, not the
    /// CPU, is what limits throughput now.
    pub fn should_try(&mut self, link_limited: bool) -> bool {
        if !self.wanted(link_limited) {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// Like [`CompressPolicy::should_try`], but ignoring (and forgetting) the back-off:
    /// for a link so slow that a batch that did not pay cost only idle CPU. Forgetting
    /// matters: failures recorded meanwhile would otherwise pile up a back-off that
    /// sends the batches after raw once the link looks faster (164 raw batches, 1.9 ×
    /// the WAN bytes, on four Linux guests with `--compress always`).
    pub fn should_try_persistently(&mut self, link_limited: bool) -> bool {
        self.skip = 0;
        self.next_skip = 1;
        self.wanted(link_limited)
    }

    /// Whether the mode asks for compression at all, back-off aside.
    fn wanted(&self, link_limited: bool) -> bool {
        match self.mode {
            CompressMode::Off => false,
            CompressMode::Auto => link_limited,
            CompressMode::Always => true,
        }
    }

    /// Whether `compressed` bytes for `raw` bytes is worth sending compressed.
    pub fn pays(raw: usize, compressed: usize) -> bool {
        compressed * PAYS_DENOMINATOR < raw * PAYS_NUMERATOR
    }

    /// Records the outcome of a compression attempt.
    pub fn record(&mut self, paid: bool) {
        if paid {
            self.next_skip = 1;
        } else {
            self.skip = self.next_skip;
            self.next_skip = (self.next_skip * 2).min(MAX_SKIP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_and_recovers() {
        let mut p = CompressPolicy::new(CompressMode::Always);
        assert!(p.should_try(false));
        p.record(false);
        assert!(!p.should_try(false));
        assert!(p.should_try(false));
        p.record(false);
        assert!(!p.should_try(false) && !p.should_try(false));
        assert!(p.should_try(false));
        p.record(true);
        assert!(p.should_try(false));
        let mut auto = CompressPolicy::new(CompressMode::Auto);
        assert!(!auto.should_try(false));
        assert!(auto.should_try(true));
        assert!(!CompressPolicy::new(CompressMode::Off).should_try(true));
        assert!(CompressPolicy::pays(1000, 900) && !CompressPolicy::pays(1000, 950));
    }

    #[test]
    fn persistent_tries_leave_no_back_off_behind() {
        let mut p = CompressPolicy::new(CompressMode::Always);
        for _ in 0..20 {
            assert!(p.should_try_persistently(true));
            p.record(false);
        }
        // Twenty failures on a slow link: the next ordinary decision skips at most
        // one batch, not the doubled-up back-off of twenty.
        let skipped = (0..10).filter(|_| !p.should_try(false)).count();
        assert!(skipped <= 1, "{skipped} batches skipped");
        assert!(!CompressPolicy::new(CompressMode::Off).should_try_persistently(true));
    }
}
