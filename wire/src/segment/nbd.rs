//! NBD client-to-server stream (fixed newstyle, as QEMU's NBD client speaks it to a
//! disk-mirror target): client flags, option haggling, then requests. Every WRITE
//! payload is cut into 4 KiB blocks at 4 KiB-aligned *disk* offsets; an unaligned head
//! or tail stays opaque. Compact (28-byte) and extended (32-byte) request headers are
//! told apart by their magic, so the server's side of the haggling is not needed:
//! this direction is self-delimiting. QEMU 10.0 sends extended WRITEs without the
//! PAYLOAD_LEN flag yet with their data, so every WRITE carries `length` bytes. After
//! STARTTLS the stream is TLS: give up (relay opaque).

use std::collections::VecDeque;

use super::blocks::{BlockFinder, BLOCK};

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
    GaveUp,
}

/// Finds disk blocks in the WRITE requests of an NBD client stream.
#[derive(Debug)]
pub struct NbdClientFinder {
    state: State,
    pos: u64,
    skip: u64,
    buf: Vec<u8>,
    gave_up: Option<(u64, String)>,
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
            pos: 0,
            skip: 0,
            buf: Vec::new(),
            gave_up: None,
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
                    self.skip = u64::from(len);
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
                    // Blocks at 4 KiB-aligned disk offsets inside [offset, offset+length).
                    let block = BLOCK as u64;
                    let first = offset.div_ceil(block) * block;
                    let start = self.pos + header as u64;
                    let mut disk = first;
                    while disk
                        .checked_add(block)
                        .is_some_and(|end| end <= offset + length)
                    {
                        out.push_back(start + (disk - offset));
                        self.blocks += 1;
                        disk += block;
                    }
                }
                self.skip = length;
                Ok(Some(header))
            }
            State::GaveUp => Ok(Some(b.len())),
        }
    }

    fn give_up(&mut self, why: String) {
        self.gave_up = Some((self.pos, why));
        self.state = State::GaveUp;
        self.buf.clear();
        self.skip = 0;
    }
}

impl BlockFinder for NbdClientFinder {
    fn feed(&mut self, mut data: &[u8], out: &mut VecDeque<u64>) {
        while !data.is_empty() {
            if self.skip > 0 {
                let k = self.skip.min(data.len() as u64) as usize;
                self.skip -= k as u64;
                self.pos += k as u64;
                data = &data[k..];
                continue;
            }
            if self.state == State::GaveUp {
                self.pos += data.len() as u64;
                return;
            }
            if self.buf.is_empty() {
                match self.step(data, out) {
                    Ok(Some(n)) => {
                        self.pos += n as u64;
                        data = &data[n..];
                    }
                    Ok(None) => {
                        self.buf.extend_from_slice(data);
                        return;
                    }
                    Err(why) => self.give_up(why),
                }
            } else {
                // Headers are at most 32 bytes: carry until complete.
                let old = self.buf.len();
                let take = data.len().min(32usize.saturating_sub(old).max(1));
                let mut buf = std::mem::take(&mut self.buf);
                buf.extend_from_slice(&data[..take]);
                match self.step(&buf, out) {
                    Ok(Some(n)) => {
                        debug_assert!(n >= old);
                        self.pos += n as u64;
                        data = &data[n - old..];
                    }
                    Ok(None) => {
                        self.buf = buf;
                        data = &data[take..];
                    }
                    Err(why) => self.give_up(why),
                }
            }
        }
    }

    fn gave_up(&self) -> Option<(u64, &str)> {
        self.gave_up.as_ref().map(|(at, why)| (*at, why.as_str()))
    }

    fn kind(&self) -> &'static str {
        "nbd-client"
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

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
