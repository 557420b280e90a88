//! LEB128 unsigned integers (7 bits per byte, low group first), as used for every length
//! and offset in tunnel frames.

use bytes::BufMut;

/// The most bytes a `u64` can take.
pub const MAX_VARINT_LEN: usize = 10;

/// Appends `v`.
pub fn put(dst: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

/// Reads a varint from the front of `src`.
///
/// Returns `Ok(None)` when `src` ends inside the varint, `Ok(Some((value, len)))` on
/// success, and `Err(())` when it is longer than 10 bytes or overflows 64 bits.
#[allow(clippy::result_unit_err)]
pub fn get(src: &[u8]) -> Result<Option<(u64, usize)>, ()> {
    let mut v: u64 = 0;
    for (i, &b) in src.iter().enumerate() {
        if i >= MAX_VARINT_LEN {
            return Err(());
        }
        let part = u64::from(b & 0x7f);
        if i == MAX_VARINT_LEN - 1 && part > 1 {
            return Err(());
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((v, i + 1)));
        }
    }
    if src.len() >= MAX_VARINT_LEN {
        return Err(());
    }
    Ok(None)
}

/// How many bytes `v` takes.
pub fn len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_edges() {
        for v in [
            0,
            1,
            127,
            128,
            16383,
            16384,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put(&mut b, v);
            assert_eq!(b.len(), len(v), "len of {v}");
            assert_eq!(get(&b), Ok(Some((v, b.len()))));
            for cut in 0..b.len() {
                assert_eq!(get(&b[..cut]), Ok(None));
            }
        }
    }

    #[test]
    fn rejects_overlong() {
        assert_eq!(get(&[0x80; 11]), Err(()));
        assert_eq!(
            get(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            Err(())
        );
    }
}
