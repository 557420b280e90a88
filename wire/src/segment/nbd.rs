//! NBD client-to-server stream (fixed newstyle, as QEMU's NBD client speaks it to a
//! disk-mirror target): client flags, option haggling, then requests. Every WRITE
//! payload is cut into 4 KiB blocks at 4 KiB-aligned *disk* offsets; an unaligned head
//! or tail stays opaque. Compact (28-byte) and extended (32-byte) request headers are
//! told apart by their magic, so the server's side of the haggling is not needed:
//! this direction is self-delimiting. QEMU 10.0 sends extended WRITEs without the
//! PAYLOAD_LEN flag yet with their data, so every WRITE carries `length` bytes. After
//! STARTTLS the stream is TLS: give up (relay opaque).

use std::collections::VecDeque;

use super::blocks::{BlockFinder, Step, StreamCursor, BLOCK};

/// `IHAVEOPT`, which opens every option request.
pub const IHAVEOPT: [u8; 8] = *b"IHAVEOPT";
const REQUEST_MAGIC: u32 = 0x2560_9513;
const EXTENDED_REQUEST_MAGIC: u32 = 0x21E4_1C71;
const CMD_WRITE: u16 = 1;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_PAYLOAD_LEN: u16 = 1 << 5;
const OPT_STARTTLS: u32 = 5;
/// Largest option payload we follow (QEMU sends a few hundred bytes at most).
const MAX_OPTION: u32 = 1 << 20;
/// Largest request payload we follow (QEMU caps NBD requests at 32 MiB).
const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientFlags,
    Stream,
}

/// Finds disk blocks in the WRITE requests of an NBD client stream.
#[derive(Debug)]
pub struct NbdClientFinder {
    state: State,
    cursor: StreamCursor,
    /// Absolute offset of the view the current step parses.
    at: u64,
    /// Payload length the current step asks to pass.
    next_skip: u64,
    requests: u64,
    writes: u64,
    write_bytes: u64,
    blocks: u64,
}

impl Default for NbdClientFinder {
    fn default() -> Self {
        Self::new()
    }
}

impl NbdClientFinder {
    /// A parser at the start of the client's stream (before its flags).
    pub fn new() -> Self {
        NbdClientFinder {
            state: State::ClientFlags,
            cursor: StreamCursor::default(),
            at: 0,
            next_skip: 0,
            requests: 0,
            writes: 0,
            write_bytes: 0,
            blocks: 0,
        }
    }

    /// Whether `first` starts an NBD client stream: 4 bytes of client flags (only the
    /// two defined bits) followed by the first option's `IHAVEOPT`.
    pub fn matches(first: &[u8]) -> bool {
        first.len() >= 12
            && first[..3] == [0, 0, 0]
            && first[3] & !0x03 == 0
            && first[4..12] == IHAVEOPT
    }

    fn step(&mut self, b: &[u8], out: &mut VecDeque<u64>) -> Result<Option<usize>, String> {
        match self.state {
            State::ClientFlags => {
                if b.len() < 4 {
                    return Ok(None);
                }
                self.state = State::Stream;
                Ok(Some(4))
            }
            State::Stream => {
                let Some(m) = b.get(..8) else { return Ok(None) };
                if m == IHAVEOPT {
                    let Some(h) = b.get(..16) else {
                        return Ok(None);
                    };
                    let (opt, len) = (be32(h, 8), be32(h, 12));
                    if len > MAX_OPTION {
                        return Err(format!("NBD option {opt} with {len} bytes"));
                    }
                    if opt == OPT_STARTTLS {
                        return Err("STARTTLS: the rest is TLS".into());
                    }
                    self.next_skip = u64::from(len);
                    return Ok(Some(16));
                }
                let (header, length) = match be32(m, 0) {
                    REQUEST_MAGIC => {
                        let Some(h) = b.get(..28) else {
                            return Ok(None);
                        };
                        (28, u64::from(be32(h, 24)))
                    }
                    EXTENDED_REQUEST_MAGIC => {
                        let Some(h) = b.get(..32) else {
                            return Ok(None);
                        };
                        (32, be64(h, 24))
                    }
                    other => return Err(format!("not an NBD request (magic 0x{other:08x})")),
                };
                let flags = be16(b, 4);
                let ty = be16(b, 6);
                let offset = be64(b, 16);
                self.requests += 1;
                let payload = match ty {
                    CMD_WRITE => true,
                    CMD_BLOCK_STATUS => flags & FLAG_PAYLOAD_LEN != 0,
                    _ => false,
                };
                if !payload {
                    return Ok(Some(header));
                }
                if length > MAX_PAYLOAD {
                    return Err(format!("NBD request payload of {length} bytes"));
                }
                if ty == CMD_WRITE {
                    self.writes += 1;
                    self.write_bytes += length;
                    self.blocks += disk_blocks(out, self.at + header as u64, offset, length);
                }
                self.next_skip = length;
                Ok(Some(header))
            }
        }
    }
}

impl BlockFinder for NbdClientFinder {
    fn feed(&mut self, data: &[u8], out: &mut VecDeque<u64>) {
        let mut cursor = std::mem::take(&mut self.cursor);
        cursor.feed(data, 32, |view, at, skip| {
            self.at = at;
            self.next_skip = 0;
            let step: Step = self.step(view, out).into();
            *skip = self.next_skip;
            step
        });
        self.cursor = cursor;
    }

    fn gave_up(&self) -> Option<(u64, &str)> {
        self.cursor.gave_up()
    }

    fn kind(&self) -> &'static str {
        "nbd-client"
    }

    fn awaits_replies(&self) -> bool {
        true
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("requests", self.requests),
            ("writes", self.writes),
            ("write_bytes", self.write_bytes),
            ("disk_blocks", self.blocks),
        ]
    }
}

/// Pushes the stream offsets of the 4 KiB blocks at 4 KiB-aligned *disk* offsets inside
/// `length` bytes of disk data that start at disk `offset` and at stream offset `start`
/// (a WRITE payload, a READ reply's data); returns how many. An unaligned head or tail
/// stays opaque. Offsets near the end of the 64-bit range (never a real disk) yield
/// nothing rather than overflow.
pub(super) fn disk_blocks(out: &mut VecDeque<u64>, start: u64, offset: u64, length: u64) -> u64 {
    let block = BLOCK as u64;
    let (Some(end), Some(first)) = (
        offset.checked_add(length),
        offset.div_ceil(block).checked_mul(block),
    ) else {
        return 0;
    };
    let mut n = 0;
    let mut disk = first;
    while disk.checked_add(block).is_some_and(|e| e <= end) {
        out.push_back(start + (disk - offset));
        n += 1;
        disk += block;
    }
    n
}

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
