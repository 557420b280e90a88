//! Zstd compression contexts shared by everything in the process that compresses one
//! piece at a time (batches on their own, zstd deltas).
//!
//! A context keeps its match tables after use (1–3 MiB at the levels an edge uses).
//! Held one per connection, they grew the sending edge's heap by ~127 MiB at 256
//! concurrent connections (heaptrack, `shrinker-bench pair --streams 256
//! --concurrent`), although only as many compress at once as there are threads doing
//! it. So a context is taken for one call and given back, and at most [`KEEP`] idle
//! ones are kept. Context-keeping streams (`zstream`) hold their own: their history is
//! the point.

use std::sync::{Mutex, MutexGuard};

use zstd::zstd_safe::{self, CCtx};

/// Idle contexts kept for the next calls; more are dropped when given back.
pub const KEEP: usize = 4;

static IDLE: Mutex<Vec<CCtx<'static>>> = Mutex::new(Vec::new());

fn idle() -> MutexGuard<'static, Vec<CCtx<'static>>> {
    // A panic while the lock was held cannot leave the list inconsistent.
    IDLE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` with a context from the pool (a new one if none is idle); `None` if zstd
/// could not create one.
fn with_context<R>(f: impl FnOnce(&mut CCtx<'static>) -> R) -> Option<R> {
    let taken = idle().pop();
    let mut cctx = match taken {
        Some(c) => c,
        None => CCtx::try_create()?,
    };
    let out = f(&mut cctx);
    let mut idle = idle();
    if idle.len() < KEEP {
        idle.push(cctx);
    }
    Some(out)
}

/// `src` as one zstd frame at `level`, with `dict` as its dictionary when given;
/// `None` if zstd failed.
pub fn compress(src: &[u8], dict: Option<&[u8]>, level: i32) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(src.len()));
    let done = with_context(|cctx| {
        // Parameters and a dictionary stay in a context that goes back to the pool:
        // the reset clears both, so no call depends on what a previous user left.
        cctx.reset(zstd_safe::ResetDirective::SessionAndParameters)?;
        crate::zlevel::set(cctx, level)?;
        if let Some(d) = dict {
            cctx.load_dictionary(d)?;
        }
        cctx.compress2(&mut out, src)
    })?;
    done.ok().map(|_| out)
}

/// Idle contexts now kept.
#[cfg(test)]
fn idle_contexts() -> usize {
    idle().len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes that compress, at least in part: runs of a few values and copies of a
    /// short pattern, with random bytes between them.
    fn compressible(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec((0u8..4, any::<u8>(), 1usize..64), 0..max / 16).prop_map(
            |pieces| {
                let mut out = Vec::new();
                for (kind, byte, len) in pieces {
                    match kind {
                        0 => out.extend(std::iter::repeat_n(byte, len)),
                        1 => out.extend((0..len).map(|i| (i as u8).wrapping_mul(byte))),
                        _ => out.push(byte),
                    }
                }
                out
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any target, with or without any dictionary, at any level the edge uses:
        /// the frame decodes to the target (with the same dictionary), whatever the
        /// pooled context compressed before (its parameters and dictionary are reset).
        #[test]
        fn any_frame_decodes_to_its_source(
            calls in proptest::collection::vec(
                (compressible(16 << 10), proptest::option::of(compressible(8 << 10)), 1i32..=9),
                1..6,
            ),
        ) {
            for (src, dict, level) in calls {
                let z = compress(&src, dict.as_deref(), level).expect("compresses");
                let mut out = Vec::with_capacity(src.len());
                let mut dctx = zstd_safe::DCtx::create();
                match &dict {
                    Some(d) => dctx.decompress_using_dict(&mut out, &z, d),
                    None => dctx.decompress(&mut out, &z),
                }
                .expect("decodes");
                prop_assert_eq!(&out, &src);
            }
        }
    }

    #[test]
    fn frames_decode_and_idle_contexts_stay_bounded() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let z = compress(&data, None, 3).unwrap();
        assert!(z.len() < data.len() / 4);
        assert_eq!(zstd::bulk::decompress(&z, data.len()).unwrap(), data);

        let base = vec![7u8; 4096];
        let mut target = base.clone();
        target[100] = 1;
        let z = compress(&target, Some(&base), 6).unwrap();
        let mut out = Vec::with_capacity(4096);
        zstd_safe::DCtx::create()
            .decompress_using_dict(&mut out, &z, &base)
            .unwrap();
        assert_eq!(out, target);
        // A dictionary does not stay behind: the same context compresses without it.
        let plain = compress(&target, None, 6).unwrap();
        assert_eq!(zstd::bulk::decompress(&plain, 4096).unwrap(), target);

        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    for _ in 0..20 {
                        compress(&data, None, 1).unwrap();
                    }
                });
            }
        });
        assert!(idle_contexts() <= KEEP);
    }
}
