//! Branch targets: a reversible transform for chunks of x86 machine code, so that
//! compression sees the calls and jumps that go to the same place.
//!
//! A near CALL (`E8`) or JMP (`E9`) names its target as a 32-bit displacement from the
//! end of the instruction, so two calls of the same function from different places
//! carry different bytes. Made absolute (the displacement plus the instruction's
//! position), every call of that function carries the same four bytes, which an LZ
//! coder takes as a repeat. Guest memory that is new to the peer holds much code (the
//! kernel's text, the binaries and libraries in the page cache): on four real Linux
//! guests, a quarter of the first guest's new chunks went this way, and the cluster's
//! WAN bytes dropped 0.9% (docs/BENCHMARKS.md §3 "Branch targets"). xz's x86 filter
//! does the same for files.
//!
//! # Format
//! A scan from the chunk's start: at a byte `E8` or `E9` with four more bytes after
//! it, those four (little-endian) are its operand and the scan resumes after them,
//! whatever it did with them; any other byte is passed. An operand that is a 25-bit
//! signed value (in −2^24..2^24: a displacement within 16 MiB, where code lives)
//! becomes `operand + position` modulo 2^25, sign-extended from 25 bits, where
//! position is the offset just after it in the chunk; other operands stay. The
//! transform maps 25-bit signed values onto themselves and never touches an opcode
//! byte or a byte the scan passes, so the inverse ([`relative`]) makes the same scan
//! and the same choices: both directions are bijections for every input, and a
//! BRANCHES frame can only ever rebuild the bytes it was made from (the receiver
//! hashes the result as it hashes any CHUNK).
//!
//! Positions are offsets in the chunk, not addresses: the chunk's place in the guest
//! is not known at this layer. Calls between pages of one chunk still match.

/// Smallest chunk considered (the delta search's minimum: smaller pieces are rarely
/// code, and carry few branches).
const MIN_CHUNK: usize = 1024;

/// Branches with a near operand per 4 KiB that make a chunk worth transforming.
/// Measured with the encoder on four Linux guests at level 6 (`bench encode`): 12 per
/// page 37.70 MB, 16 37.68, 24 37.67, 32 37.67, 48 37.67, none 38.00. Data pages
/// (random bytes hold one `E8`/`E9` in 128, and few with a near operand) stay below it.
const MIN_BRANCHES_PER_4K: usize = 24;

/// 2^25: operands are taken modulo this.
const SPAN: u32 = 1 << 25;

/// The chunk with its branch targets made absolute, and how many it converted.
pub fn absolute(chunk: &[u8]) -> (Vec<u8>, usize) {
    let mut out = chunk.to_vec();
    let n = convert(&mut out, |operand, position| operand.wrapping_add(position));
    (out, n)
}

/// The chunk whose [`absolute`] form is `data` (the inverse, for any bytes).
pub fn relative(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    convert(&mut out, |operand, position| operand.wrapping_sub(position));
    out
}

/// The chunk's absolute form, when it holds enough branches to pay; `None` keeps it
/// as it is.
pub fn choose(chunk: &[u8]) -> Option<Vec<u8>> {
    if chunk.len() < MIN_CHUNK {
        return None;
    }
    // Counted first: most chunks are not code, and counting allocates nothing.
    if near_branches(chunk) * 4096 < MIN_BRANCHES_PER_4K * chunk.len() {
        return None;
    }
    Some(absolute(chunk).0)
}

/// The scan of the module docs, applying `map` to every near operand in place.
fn convert(bytes: &mut [u8], map: impl Fn(u32, u32) -> u32) -> usize {
    let mut n = 0;
    let mut from = 0;
    while let Some((op, operand)) = next_operand(bytes, from) {
        if is_near(operand) {
            // Positions beyond 2^32 wrap; only the low 25 bits matter anyway.
            let position = (op + 5) as u32;
            let mapped = sign_extend(map(operand, position) % SPAN);
            bytes[op + 1..op + 5].copy_from_slice(&mapped.to_le_bytes());
            n += 1;
        }
        from = op + 5;
    }
    n
}

/// How many near operands the scan finds in `chunk`.
fn near_branches(chunk: &[u8]) -> usize {
    let mut n = 0;
    let mut from = 0;
    while let Some((op, operand)) = next_operand(chunk, from) {
        n += usize::from(is_near(operand));
        from = op + 5;
    }
    n
}

/// The scan's next opcode at or after `from` with four bytes after it, and those
/// four as its operand. The scan resumes after the operand, converted or not.
fn next_operand(bytes: &[u8], from: usize) -> Option<(usize, u32)> {
    let op = from + memchr::memchr2(0xE8, 0xE9, bytes.get(from..)?)?;
    let operand = bytes.get(op + 1..op + 5)?;
    Some((op, u32::from_le_bytes(operand.try_into().expect("4 bytes"))))
}

/// Whether `operand` is a 25-bit signed value (its top 8 bits copies of bit 24).
fn is_near(operand: u32) -> bool {
    sign_extend(operand % SPAN) == operand
}

/// The low 25 bits of `v` as a signed value, in 32 bits.
fn sign_extend(v: u32) -> u32 {
    (((v << 7) as i32) >> 7) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_page(seed: u64) -> Vec<u8> {
        crate::fuzzing::code(4096, seed)
    }

    #[test]
    fn calls_of_one_function_carry_the_same_bytes_once_absolute() {
        let page = code_page(7);
        let made = choose(&page).expect("a page of calls is code");
        // Every call operand now names one of four targets.
        let mut operands = std::collections::HashSet::new();
        let mut from = 0;
        while let Some((op, operand)) = next_operand(&made, from) {
            operands.insert(operand);
            from = op + 5;
        }
        assert_eq!(operands.len(), 4, "{operands:x?}");
        assert_eq!(relative(&made), page);
        let level = 3;
        assert!(
            crate::delta::zstd_alone(&made, level) < crate::delta::zstd_alone(&page, level),
            "absolute targets compress better"
        );
    }

    #[test]
    fn data_and_small_chunks_stay_as_they_are() {
        assert_eq!(choose(&crate::fuzzing::noise(4096, 3)), None);
        assert_eq!(choose(&[0u8; 4096]), None);
        assert_eq!(choose(&[0xE8u8; 4096]), None, "operands E8E8E8E8 are far");
        assert_eq!(
            choose(&code_page(1)[..512]),
            None,
            "below the smallest chunk"
        );
    }

    #[test]
    fn both_directions_undo_each_other_on_any_bytes() {
        // Operands at every boundary, opcodes at the chunk's end, runs of opcodes.
        let mut tricky = vec![0xE8, 0xff, 0xff, 0xff, 0x00, 0xE9, 0x00, 0x00, 0x00, 0x01];
        tricky.extend_from_slice(&[0xE8, 0xff, 0xff, 0xff, 0xfe, 0xE8, 0xE8, 0xE9, 0xE8]);
        tricky.extend_from_slice(&[0xE9, 0xff, 0xff, 0xff, 0xff, 0xE8, 0x01, 0x02]);
        for data in [
            tricky,
            crate::fuzzing::noise(5000, 9),
            code_page(3),
            vec![0xE8; 777],
            vec![],
        ] {
            assert_eq!(relative(&absolute(&data).0), data);
            assert_eq!(absolute(&relative(&data)).0, data);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_go_both_ways(data in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just(0xE8u8),
                proptest::strategy::Just(0xE9u8),
                proptest::strategy::Just(0x00u8),
                proptest::strategy::Just(0xffu8),
                proptest::arbitrary::any::<u8>(),
            ],
            0..3000,
        )) {
            let (made, _) = absolute(&data);
            proptest::prop_assert_eq!(made.len(), data.len());
            proptest::prop_assert_eq!(&relative(&made), &data);
            proptest::prop_assert_eq!(&absolute(&relative(&data)).0, &data);
        }
    }

    #[test]
    fn near_operands_are_exactly_the_25_bit_signed_ones() {
        for (v, near) in [
            (0u32, true),
            (0x00ff_ffff, true),
            (0x0100_0000, false),
            (0xff00_0000, true),
            (0xfeff_ffff, false),
            (0xffff_ffff, true),
            (0x7fff_ffff, false),
        ] {
            assert_eq!(is_near(v), near, "{v:#x}");
        }
    }
}
