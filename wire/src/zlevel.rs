//! Compression levels as this crate uses them: zstd's own, with the shortest match
//! each level looks for tuned to memory pages and disk blocks.
//!
//! zstd's defaults were tuned on text and general files. Guest memory is full of
//! 4- and 8-byte fields (pointers, counters, flags) that repeat with other bytes
//! between them, so shorter matches pay: the fast levels' 6-7 byte minimum misses
//! most of them. Measured on the batches an edge compresses for four booted Linux
//! guests (`zstd -b` over the raw batches of `shrinker-bench encode`, one core here):
//! level 1 with a 5-byte minimum emits 2.7% fewer bytes at ~4% less speed (its
//! default: 7); levels 3 and 6 with a 4-byte minimum 0.6% fewer at ~10% less speed
//! (their default: 5). Shorter still does not pay (level 1 with 4: fewer hits per
//! probe). Only the compressor's search changes: the frames are ordinary zstd, and a
//! receiver decodes them whatever the sender's parameters.

use zstd::zstd_safe::{CCtx, CParameter};

/// The shortest match a level looks for, where it differs from zstd's default.
pub fn min_match(level: i32) -> Option<u32> {
    match level {
        // zstd's fast strategy (levels 1-2) hashes 5..=8 bytes.
        1..=2 => Some(5),
        // The others down to 4 (3 is only valid for the optimal parsers, 16+).
        3..=15 => Some(4),
        _ => None,
    }
}

/// Sets `cctx` to compress at `level` (zstd's level with [`min_match`] tuned).
///
/// # Errors
/// zstd's error code when it refuses a parameter.
pub fn set(cctx: &mut CCtx<'_>, level: i32) -> Result<(), usize> {
    cctx.set_parameter(CParameter::CompressionLevel(level))?;
    if let Some(m) = min_match(level) {
        cctx.set_parameter(CParameter::MinMatch(m))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zstd::zstd_safe;

    /// 1 MiB of 64-bit fields whose top `tag` bytes come from a few values (the high
    /// bytes of pointers into a few regions) and whose other bytes are random: the
    /// only repeats are exactly `tag` bytes long.
    fn fields(tag: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut out = Vec::with_capacity(1 << 20);
        while out.len() < 1 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let region = 0xffff_8880_1234_5678u64.rotate_left(8 * (x % 5) as u32);
            let mask = u64::MAX << (8 * (8 - tag));
            let word = (region & mask) | ((x >> 3) & !mask);
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    fn compressed_len(data: &[u8], tuned: bool, level: i32) -> usize {
        let mut cctx = CCtx::create();
        if tuned {
            set(&mut cctx, level).unwrap();
        } else {
            cctx.set_parameter(CParameter::CompressionLevel(level))
                .unwrap();
        }
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
        cctx.compress2(&mut out, data).unwrap();
        let back = zstd::bulk::decompress(&out, data.len()).unwrap();
        assert_eq!(back, data, "level {level} tuned {tuned} must round-trip");
        out.len()
    }

    #[test]
    fn tuned_levels_find_the_short_matches_zstds_defaults_miss() {
        // (Level 6's lazy parser is better judged on real pages: see the module notes.
        // On these fields it takes the 4-byte matches where literals cost less.)
        for (level, tag) in [(1, 5), (2, 5), (3, 4), (4, 4)] {
            let data = fields(tag);
            let (plain, tuned) = (
                compressed_len(&data, false, level),
                compressed_len(&data, true, level),
            );
            assert!(
                tuned < plain,
                "level {level}: tuned {tuned} B, zstd's default {plain} B"
            );
        }
    }

    #[test]
    fn levels_outside_the_tuned_range_are_zstds_own() {
        assert_eq!(min_match(0), None);
        assert_eq!(min_match(-1), None);
        assert_eq!(min_match(19), None);
        let data = fields(4);
        assert_eq!(
            compressed_len(&data, true, 19),
            compressed_len(&data, false, 19)
        );
        // Every tuned level round-trips (checked inside `compressed_len`).
        for level in 1..=15 {
            compressed_len(&data[..64 << 10], true, level);
        }
    }
}
