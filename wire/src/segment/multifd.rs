//! QEMU multifd channels (7.2 … 10.x): a 64-byte init record, then packets of a fixed
//! 1344-byte header (x86) and, uncompressed, `normal_pages × 4096` page bytes, each at
//! a known offset. Compressed payloads and 10.0+ device-state packets are opaque
//! (skipped by their length). Anything unexpected: give up, content-chunk the rest.

use std::collections::VecDeque;

use super::blocks::{BlockFinder, Step, StreamCursor, BLOCK};

/// Multifd magic, at the start of the init record and of every packet.
pub const MAGIC: u32 = 0x1122_3344;
const VERSION: u32 = 1;
const INIT_LEN: usize = 64;
/// 320 + 8 × (512 KiB / 4 KiB): fixed on x86 whatever the packet holds.
const PACKET_HEADER: usize = 320 + 8 * 128;
const MAX_PAGES: u32 = 128;
const FLAG_SYNC: u32 = 0x01;
const FLAG_COMPRESSION: u32 = 0x3E;
const FLAG_DEVICE_STATE: u32 = 0x40;
const DEVICE_STATE_HEADER: usize = 276;
/// Largest opaque payload accepted (a compressed packet of 128 pages, or device state).
const MAX_OPAQUE: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Init,
    Packet,
}

/// Finds page payloads in a multifd channel.
#[derive(Debug)]
pub struct MultifdFinder {
    state: State,
    cursor: StreamCursor,
    /// Absolute offset of the view the current step parses.
    at: u64,
    /// Payload length the current step asks to pass.
    next_skip: u64,
    pages: u64,
    packets: u64,
    opaque_packets: u64,
}

impl Default for MultifdFinder {
    fn default() -> Self {
        Self::new()
    }
}

impl MultifdFinder {
    /// A parser at the start of a channel.
    pub fn new() -> Self {
        MultifdFinder {
            state: State::Init,
            cursor: StreamCursor::default(),
            at: 0,
            next_skip: 0,
            pages: 0,
            packets: 0,
            opaque_packets: 0,
        }
    }

    /// Whether `first` starts a multifd channel.
    pub fn matches(first: &[u8]) -> bool {
        first.len() >= 8
            && first[..4] == MAGIC.to_be_bytes()
            && first[4..8] == VERSION.to_be_bytes()
    }

    /// Parses one element at the front of `b`: `Ok(Some(n))` consumed, `Ok(None)` need
    /// more, `Err` give up.
    fn step(&mut self, b: &[u8], out: &mut VecDeque<u64>) -> Result<Option<usize>, String> {
        match self.state {
            State::Init => {
                let Some(h) = b.get(..INIT_LEN) else {
                    return Ok(None);
                };
                if !Self::matches(h) {
                    return Err("not a multifd channel".into());
                }
                self.state = State::Packet;
                Ok(Some(INIT_LEN))
            }
            State::Packet => {
                let Some(h) = b.get(..12) else {
                    return Ok(None);
                };
                if h[..8] != [0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1] {
                    return Err("multifd packet magic or version mismatch".into());
                }
                let flags = be32(h, 8);
                if flags & !(FLAG_SYNC | FLAG_COMPRESSION | FLAG_DEVICE_STATE) != 0 {
                    return Err(format!("unknown multifd packet flags 0x{flags:x}"));
                }
                self.packets += 1;
                if flags & FLAG_DEVICE_STATE != 0 {
                    let Some(h) = b.get(..DEVICE_STATE_HEADER) else {
                        return Ok(None);
                    };
                    let size = u64::from(be32(h, 272));
                    if size > MAX_OPAQUE {
                        return Err(format!("device-state packet of {size} bytes"));
                    }
                    self.opaque_packets += 1;
                    self.next_skip = size;
                    return Ok(Some(DEVICE_STATE_HEADER));
                }
                let Some(h) = b.get(..PACKET_HEADER) else {
                    return Ok(None);
                };
                let (alloc, normal, next_size) = (be32(h, 12), be32(h, 16), be32(h, 20));
                if alloc > MAX_PAGES || normal > MAX_PAGES {
                    return Err(format!("multifd packet of {normal}/{alloc} pages"));
                }
                if flags & FLAG_COMPRESSION != 0 {
                    // zlib/zstd/qpl/uadk/qatzip: opaque, length from the header.
                    if u64::from(next_size) > MAX_OPAQUE {
                        return Err(format!("compressed multifd payload of {next_size} bytes"));
                    }
                    self.opaque_packets += 1;
                    self.next_skip = u64::from(next_size);
                    return Ok(Some(PACKET_HEADER));
                }
                // Uncompressed: the receiver reads exactly `normal` pages (7.2 SYNC packets
                // carry a stale next_packet_size and no payload).
                let start = self.at + PACKET_HEADER as u64;
                for i in 0..u64::from(normal) {
                    out.push_back(start + i * BLOCK as u64);
                }
                self.pages += u64::from(normal);
                self.next_skip = u64::from(normal) * BLOCK as u64;
                Ok(Some(PACKET_HEADER))
            }
        }
    }
}

impl BlockFinder for MultifdFinder {
    fn feed(&mut self, data: &[u8], out: &mut VecDeque<u64>) {
        let mut cursor = std::mem::take(&mut self.cursor);
        cursor.feed(data, PACKET_HEADER, |view, at, skip| {
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
        "qemu-multifd"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("pages", self.pages),
            ("packets", self.packets),
            ("opaque_packets", self.opaque_packets),
        ]
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
