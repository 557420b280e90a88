//! NBD server-to-client stream (fixed newstyle): the greeting, option replies, then
//! transmission replies. READ data travels in this direction when a disk is *pulled*
//! over NBD (`qemu-img convert nbd://…`, a backup or stream job reading a remote
//! export, nbdcopy): every `OFFSET_DATA` chunk names its disk offset, so its data is
//! cut into 4 KiB blocks at 4 KiB-aligned disk offsets, as WRITE payloads are in the
//! client's direction ([`super::nbd`]).
//!
//! Only structured and extended replies are self-delimiting. A simple reply to a READ
//! carries data whose length only the client's request states, so unless the server
//! acknowledged `NBD_OPT_STRUCTURED_REPLY` or `NBD_OPT_EXTENDED_HEADERS` (after which a
//! simple reply never carries data), a simple reply ends parsing. So do STARTTLS, the
//! old `NBD_OPT_EXPORT_NAME` ending (no reply header) and oldstyle negotiation.

use std::collections::VecDeque;

use super::blocks::{BlockFinder, Step, StreamCursor};
use super::nbd::{be16, be32, be64, disk_blocks, IHAVEOPT};

/// `NBDMAGIC`, the first 8 bytes a newstyle server sends.
pub const NBDMAGIC: [u8; 8] = *b"NBDMAGIC";
const OPTION_REPLY_MAGIC: u64 = 0x0003_E889_0455_65A9;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668E_33EF;
const EXTENDED_REPLY_MAGIC: u32 = 0x6E8A_278C;
const REP_ACK: u32 = 1;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_EXTENDED_HEADERS: u32 = 11;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Greeting: `NBDMAGIC`, `IHAVEOPT`, 16 bits of handshake flags.
const GREETING_LEN: usize = 18;
const OPTION_REPLY_LEN: usize = 20;
const SIMPLE_REPLY_LEN: usize = 16;
const STRUCTURED_HEADER_LEN: usize = 20;
const EXTENDED_HEADER_LEN: usize = 32;
/// Largest option reply payload followed (export names and info: a few hundred bytes).
const MAX_OPTION: u32 = 1 << 20;
/// Largest reply payload followed (QEMU caps requests at 32 MiB).
const MAX_PAYLOAD: u64 = 64 << 20;
/// Longest element parsed in place: an extended header and a data chunk's offset.
const MAX_ELEMENT: usize = EXTENDED_HEADER_LEN + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Options,
    Transmission,
}

/// Finds disk blocks in the READ replies of an NBD server stream.
#[derive(Debug)]
pub struct NbdServerFinder {
    state: State,
    cursor: StreamCursor,
    /// Absolute offset of the view the current step parses.
    at: u64,
    /// Payload length the current step asks to pass.
    next_skip: u64,
    /// The server acknowledged structured replies or extended headers: simple replies
    /// carry no data.
    self_delimiting: bool,
    replies: u64,
    /// Of the replies, those with extended headers (`NBD_OPT_EXTENDED_HEADERS`).
    extended_replies: u64,
    data_chunks: u64,
    data_bytes: u64,
    blocks: u64,
}

impl Default for NbdServerFinder {
    fn default() -> Self {
        Self::new()
    }
}

impl NbdServerFinder {
    /// A parser at the start of the server's stream (before its greeting).
    pub fn new() -> Self {
        NbdServerFinder {
            state: State::Greeting,
            cursor: StreamCursor::default(),
            at: 0,
            next_skip: 0,
            self_delimiting: false,
            replies: 0,
            extended_replies: 0,
            data_chunks: 0,
            data_bytes: 0,
            blocks: 0,
        }
    }

    /// Whether `first` starts a newstyle NBD server stream (`NBDMAGIC` then the start
    /// of `IHAVEOPT`).
    pub fn matches(first: &[u8]) -> bool {
        first.len() >= 12 && first[..8] == NBDMAGIC && first[8..12] == IHAVEOPT[..4]
    }

    fn step(&mut self, b: &[u8], out: &mut VecDeque<u64>) -> Result<Option<usize>, String> {
        match self.state {
            State::Greeting => {
                let Some(g) = b.get(..GREETING_LEN) else {
                    return Ok(None);
                };
                if g[..8] != NBDMAGIC || g[8..16] != IHAVEOPT {
                    return Err("not a newstyle NBD server greeting".into());
                }
                self.state = State::Options;
                Ok(Some(GREETING_LEN))
            }
            State::Options => {
                let Some(h) = b.get(..OPTION_REPLY_LEN) else {
                    return Ok(None);
                };
                if be64(h, 0) != OPTION_REPLY_MAGIC {
                    // NBD_OPT_EXPORT_NAME is answered without a reply header.
                    return Err("no option reply header (export-name negotiation)".into());
                }
                let (opt, ty, len) = (be32(h, 8), be32(h, 12), be32(h, 16));
                if len > MAX_OPTION {
                    return Err(format!("NBD option reply {ty:#x} with {len} bytes"));
                }
                if ty == REP_ACK {
                    match opt {
                        OPT_STARTTLS => return Err("STARTTLS: the rest is TLS".into()),
                        OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
                            self.self_delimiting = true;
                        }
                        OPT_GO => self.state = State::Transmission,
                        _ => {}
                    }
                }
                self.next_skip = u64::from(len);
                Ok(Some(OPTION_REPLY_LEN))
            }
            State::Transmission => {
                let Some(m) = b.get(..4) else { return Ok(None) };
                let (header, ty, length) = match be32(m, 0) {
                    SIMPLE_REPLY_MAGIC => {
                        if !self.self_delimiting {
                            return Err("simple replies: READ lengths are only in the \
                                        client's requests"
                                .into());
                        }
                        if b.len() < SIMPLE_REPLY_LEN {
                            return Ok(None);
                        }
                        self.replies += 1;
                        return Ok(Some(SIMPLE_REPLY_LEN));
                    }
                    STRUCTURED_REPLY_MAGIC => {
                        let Some(h) = b.get(..STRUCTURED_HEADER_LEN) else {
                            return Ok(None);
                        };
                        (STRUCTURED_HEADER_LEN, be16(h, 6), u64::from(be32(h, 16)))
                    }
                    EXTENDED_REPLY_MAGIC => {
                        let Some(h) = b.get(..EXTENDED_HEADER_LEN) else {
                            return Ok(None);
                        };
                        (EXTENDED_HEADER_LEN, be16(h, 6), be64(h, 24))
                    }
                    other => return Err(format!("not an NBD reply (magic 0x{other:08x})")),
                };
                if length > MAX_PAYLOAD {
                    return Err(format!("NBD reply payload of {length} bytes"));
                }
                if ty != REPLY_TYPE_OFFSET_DATA {
                    self.count_reply(header);
                    self.next_skip = length;
                    return Ok(Some(header));
                }
                // OFFSET_DATA: the disk offset, then the data.
                if length < 8 {
                    return Err(format!("NBD data chunk of {length} bytes"));
                }
                let Some(o) = b.get(header..header + 8) else {
                    return Ok(None);
                };
                let offset = be64(o, 0);
                let data = length - 8;
                self.count_reply(header);
                self.data_chunks += 1;
                self.data_bytes += data;
                let start = self.at + header as u64 + 8;
                self.blocks += disk_blocks(out, start, offset, data);
                self.next_skip = data;
                Ok(Some(header + 8))
            }
        }
    }
}

impl NbdServerFinder {
    fn count_reply(&mut self, header: usize) {
        self.replies += 1;
        if header == EXTENDED_HEADER_LEN {
            self.extended_replies += 1;
        }
    }
}

impl BlockFinder for NbdServerFinder {
    fn feed(&mut self, data: &[u8], out: &mut VecDeque<u64>) {
        let mut cursor = std::mem::take(&mut self.cursor);
        cursor.feed(data, MAX_ELEMENT, |view, at, skip| {
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
        "nbd-server"
    }

    fn awaits_replies(&self) -> bool {
        true
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("replies", self.replies),
            ("extended_replies", self.extended_replies),
            ("data_chunks", self.data_chunks),
            ("data_bytes", self.data_bytes),
            ("disk_blocks", self.blocks),
        ]
    }
}
