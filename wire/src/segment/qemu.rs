//! QEMU live-migration main channel (QEMU 7.2 … 10.x): finds every RAM `PAGE` payload
//! and every legacy block-migration `DEVICE_BLOCK` payload (256 disk blocks of 4 KiB).
//!
//! Grammar (see the project's qemu-migration-format reference): file header
//! `QEVM 00000003`, an optional CONFIGURATION record, then top-level records. Device
//! sections other than `ram` and `block` carry unframed vmstate: the parser skips them
//! by finding their footer (`7E` + section id) followed by a plausible next record,
//! which is a hint, not proof — a wrong guess shows up as a grammar error later and
//! the parser gives up. Everything it is unsure of ends parsing ("give up"): the rest
//! of the stream is content-defined chunked. The parser never decides content.

use std::collections::{HashMap, VecDeque};

use super::blocks::{BlockFinder, StreamCursor, BLOCK};

/// `QEVM`.
pub const MAGIC: u32 = 0x5145_564D;
/// File format version 3.
pub const VERSION: u32 = 3;

const REC_EOF: u8 = 0x00;
const REC_START: u8 = 0x01;
const REC_PART: u8 = 0x02;
const REC_END: u8 = 0x03;
const REC_FULL: u8 = 0x04;
const REC_SUBSECTION: u8 = 0x05;
const REC_VMDESC: u8 = 0x06;
const REC_CONFIG: u8 = 0x07;
const REC_COMMAND: u8 = 0x08;
const REC_FOOTER: u8 = 0x7E;

const RAM_ZERO: u64 = 0x002;
const RAM_MEM_SIZE: u64 = 0x004;
const RAM_PAGE: u64 = 0x008;
const RAM_EOS: u64 = 0x010;
const RAM_CONTINUE: u64 = 0x020;
const RAM_XBZRLE: u64 = 0x040;
const RAM_COMPRESS: u64 = 0x100;
const RAM_MULTIFD_FLUSH: u64 = 0x200;

const BLK_DEVICE_BLOCK: u64 = 0x01;
const BLK_EOS: u64 = 0x02;
const BLK_PROGRESS: u64 = 0x04;
const BLK_ZERO_BLOCK: u64 = 0x08;
/// Legacy block migration sends 1 MiB per DEVICE_BLOCK.
const BLK_CHUNK: usize = 1 << 20;

const CMD_POSTCOPY_ADVISE: u16 = 3;
const CMD_PACKAGED: u16 = 7;
const CMD_RECV_BITMAP: u16 = 10;
const CMD_MAX: u16 = 11;

/// The most bytes one grammar element may need in view at once (a capability list of
/// the configuration record is the largest).
const MAX_LOOKAHEAD: usize = 64 * 1024;
/// Unframed device sections larger than this are not searched for their footer.
const MAX_UNKNOWN_SECTION: u64 = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SectionKind {
    Ram,
    Block,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Header,
    Config,
    ConfigSub,
    Records,
    Ram { section: u32 },
    MemSize { section: u32, remaining: u64 },
    Block { section: u32 },
    Footer { section: u32 },
    Unknown { section: u32, scanned: u64 },
    Tail,
}

use super::blocks::Step;
use Step::{Consumed, GiveUp, Need};

/// Counters of what the parser recognised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuStats {
    /// RAM PAGE records.
    pub pages: u64,
    /// RAM ZERO records.
    pub zero_pages: u64,
    /// XBZRLE and compressed pages (opaque).
    pub encoded_pages: u64,
    /// Disk blocks in legacy block-migration chunks.
    pub disk_blocks: u64,
    /// Device sections skipped by footer search.
    pub device_sections: u64,
}

/// Finds page payloads in a QEMU main migration channel.
#[derive(Debug)]
pub struct QemuMainFinder {
    state: State,
    cursor: StreamCursor,
    /// Absolute offset of the view the current step parses.
    at: u64,
    /// Payload length the current step asks to pass.
    next_skip: u64,
    sections: HashMap<u32, SectionKind>,
    have_block: bool,
    postcopy: bool,
    ignore_shared: bool,
    x86: bool,
    page_bits_seen: Option<u32>,
    /// Parsing a postcopy preempt channel: bare RAM records, no header or sections.
    preempt: bool,
    /// Parsing a main channel resumed by postcopy recovery: no header, and sections
    /// that were started on the lost connection (see [`QemuMainFinder::resumed`]).
    resumed: bool,
    stats: QemuStats,
}

impl Default for QemuMainFinder {
    fn default() -> Self {
        Self::new()
    }
}

impl QemuMainFinder {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        QemuMainFinder {
            state: State::Header,
            cursor: StreamCursor::default(),
            at: 0,
            next_skip: 0,
            sections: HashMap::new(),
            have_block: false,
            postcopy: false,
            ignore_shared: false,
            x86: true,
            page_bits_seen: None,
            preempt: false,
            resumed: false,
            stats: QemuStats::default(),
        }
    }

    /// A parser for a main channel that postcopy recovery opened (`migrate` with
    /// `resume`): QEMU sends no header or configuration on it, only records: the
    /// RECV_BITMAP commands, POSTCOPY_RESUME, then parts of the sections it started on
    /// the lost connection. In postcopy only RAM and dirty bitmaps still iterate: a
    /// section first seen continued is parsed as RAM when its first record reads as
    /// one, else skipped to its footer like any device section; a wrong guess ends in
    /// a give-up, never in wrong bytes.
    pub fn resumed() -> Self {
        QemuMainFinder {
            state: State::Records,
            resumed: true,
            postcopy: true,
            ..Self::new()
        }
    }

    /// Whether `first` looks like the start of a resumed main channel: a RECV_BITMAP
    /// command naming a RAM block (length byte, then printable characters).
    pub fn matches_resumed(first: &[u8]) -> bool {
        if first.len() < 12 || first[0] != REC_COMMAND {
            return false;
        }
        let name = first[5] as usize;
        be16(first, 1) == Some(CMD_RECV_BITMAP)
            && name > 0
            && be16(first, 3) == Some(name as u16 + 1)
            && first[6..12.min(6 + name)]
                .iter()
                .all(|c| c.is_ascii_graphic())
    }

    /// A parser for a postcopy preempt channel: it carries only RAM records (the
    /// `ram` section's grammar, with its own CONTINUE state), no header, no sections.
    pub fn preempt() -> Self {
        QemuMainFinder {
            state: State::Ram { section: u32::MAX },
            preempt: true,
            ..Self::new()
        }
    }

    /// Whether `first` looks like the start of a postcopy preempt channel: a PAGE or
    /// ZERO record without CONTINUE (so a RAM block name follows) whose name starts
    /// with printable characters. A hint: a wrong guess ends in a give-up, never in
    /// wrong bytes.
    pub fn matches_preempt(first: &[u8]) -> bool {
        if first.len() < 12 {
            return false;
        }
        let v = u64::from_be_bytes(first[..8].try_into().expect("8 bytes"));
        let flags = v & (BLOCK as u64 - 1);
        let len = first[8] as usize;
        (flags == RAM_PAGE || flags == RAM_ZERO)
            && len > 0
            && first[9..12.min(9 + len)]
                .iter()
                .all(|c| c.is_ascii_graphic())
    }

    /// Whether `first` (the first bytes of a connection) start a QEMU main channel.
    pub fn matches(first: &[u8]) -> bool {
        first.len() >= 8
            && first[..4] == MAGIC.to_be_bytes()
            && first[4..8] == VERSION.to_be_bytes()
    }

    /// What the parser recognised so far.
    pub fn stats(&self) -> &QemuStats {
        &self.stats
    }

    fn step(&mut self, b: &[u8], out: &mut VecDeque<u64>) -> Step {
        let st = self.state.clone();
        match st {
            State::Header => {
                let Some(h) = b.get(..8) else { return Need };
                if !Self::matches(h) {
                    return GiveUp("not a QEMU migration stream (no QEVM v3 header)".into());
                }
                self.state = State::Config;
                Consumed(8)
            }
            State::Config => {
                let Some(&t) = b.first() else { return Need };
                if t != REC_CONFIG {
                    // Machine types <= 2.3 send no configuration.
                    self.state = State::Records;
                    return Consumed(0);
                }
                let Some(len) = be32(b, 1) else { return Need };
                if len == 0 || len > 256 {
                    return GiveUp(format!("configuration name length {len}"));
                }
                let end = 5 + len as usize;
                let Some(name) = b.get(5..end) else {
                    return Need;
                };
                self.x86 = is_x86_machine(name);
                self.state = State::ConfigSub;
                Consumed(end)
            }
            State::ConfigSub => self.config_subsection(b),
            State::Records => self.record(b),
            State::Ram { section } => self.ram_record(b, section, out),
            State::MemSize { section, remaining } => self.mem_size_entry(b, section, remaining),
            State::Block { section } => self.block_record(b, section, out),
            State::Footer { section } => {
                let Some(id) = be32(b, 1) else { return Need };
                if b[0] != REC_FOOTER || id != section {
                    return GiveUp(format!("section {section} footer missing"));
                }
                self.state = State::Records;
                Consumed(5)
            }
            State::Unknown { section, scanned } => self.scan_footer(b, section, scanned),
            State::Tail => Consumed(b.len()),
        }
    }

    fn config_subsection(&mut self, b: &[u8]) -> Step {
        let Some(&t) = b.first() else { return Need };
        if t != REC_SUBSECTION {
            if !self.x86 && self.page_bits_seen.is_none() {
                return GiveUp(
                    "not an x86 machine type and no target page size: page size unknown".into(),
                );
            }
            self.state = State::Records;
            return Consumed(0);
        }
        let Some(&nl) = b.get(1) else { return Need };
        let name_end = 2 + nl as usize;
        let Some(name) = b.get(2..name_end) else {
            return Need;
        };
        let Some(_version) = be32(b, name_end) else {
            return Need;
        };
        let mut at = name_end + 4;
        match name {
            b"configuration/target-page-bits" => {
                let Some(bits) = be32(b, at) else { return Need };
                if bits != 12 {
                    return GiveUp(format!("target page size 2^{bits}, not 4 KiB"));
                }
                self.page_bits_seen = Some(bits);
                at += 4;
            }
            b"configuration/capabilities" => {
                let Some(count) = be32(b, at) else {
                    return Need;
                };
                if count > 1024 {
                    return GiveUp(format!("{count} capabilities"));
                }
                at += 4;
                for _ in 0..count {
                    let Some(&l) = b.get(at) else { return Need };
                    let Some(cap) = b.get(at + 1..at + 1 + l as usize) else {
                        return Need;
                    };
                    match cap {
                        b"x-ignore-shared" => self.ignore_shared = true,
                        b"mapped-ram" => return GiveUp("mapped-ram stream".into()),
                        _ => {}
                    }
                    at += 1 + l as usize;
                }
            }
            b"configuration/uuid" => {
                if b.len() < at + 16 {
                    return Need;
                }
                at += 16;
            }
            other => {
                return GiveUp(format!(
                    "unknown configuration subsection {:?}",
                    String::from_utf8_lossy(other)
                ));
            }
        }
        Consumed(at)
    }

    fn record(&mut self, b: &[u8]) -> Step {
        let Some(&t) = b.first() else { return Need };
        match t {
            REC_EOF | REC_VMDESC => {
                // Nothing but device state, EOF and the JSON description remain.
                self.state = State::Tail;
                Consumed(0)
            }
            REC_START | REC_FULL => {
                let Some(id) = be32(b, 1) else { return Need };
                let Some(&l) = b.get(5) else { return Need };
                let idstr_end = 6 + l as usize;
                if b.len() < idstr_end + 8 {
                    return Need;
                }
                let kind = match &b[6..idstr_end] {
                    b"ram" => SectionKind::Ram,
                    b"block" => SectionKind::Block,
                    _ => SectionKind::Other,
                };
                self.sections.insert(id, kind);
                self.enter_section(id, kind);
                Consumed(idstr_end + 8)
            }
            REC_PART | REC_END => {
                let Some(id) = be32(b, 1) else { return Need };
                let kind = match self.sections.get(&id) {
                    Some(&kind) => kind,
                    None if self.resumed => {
                        // Started on the lost connection: RAM if its first record
                        // reads as one (dirty bitmaps also iterate in postcopy).
                        let Some(ram) = starts_ram_record(&b[5..]) else {
                            return Need;
                        };
                        let kind = if ram {
                            SectionKind::Ram
                        } else {
                            SectionKind::Other
                        };
                        self.sections.insert(id, kind);
                        kind
                    }
                    None => return GiveUp(format!("section {id} continued but never started")),
                };
                self.enter_section(id, kind);
                Consumed(5)
            }
            REC_COMMAND => {
                let (Some(cmd), Some(len)) = (be16(b, 1), be16(b, 3)) else {
                    return Need;
                };
                if cmd > CMD_MAX {
                    return GiveUp(format!("unknown command {cmd}"));
                }
                let len = len as usize;
                match cmd {
                    CMD_POSTCOPY_ADVISE if len == 16 => {
                        let Some(page) = be64(b, 13) else { return Need };
                        if page != BLOCK as u64 {
                            return GiveUp(format!("target page size {page}"));
                        }
                        self.postcopy = true;
                        Consumed(5 + 16)
                    }
                    CMD_PACKAGED if len == 4 => {
                        // A nested record stream (device state, no RAM pages): opaque.
                        let Some(n) = be32(b, 5) else { return Need };
                        self.next_skip = u64::from(n);
                        Consumed(9)
                    }
                    _ => {
                        self.next_skip = len as u64;
                        Consumed(5)
                    }
                }
            }
            other => GiveUp(format!("unexpected record type 0x{other:02x}")),
        }
    }

    fn enter_section(&mut self, section: u32, kind: SectionKind) {
        self.state = match kind {
            SectionKind::Ram => State::Ram { section },
            SectionKind::Block => State::Block { section },
            SectionKind::Other => {
                self.stats.device_sections += 1;
                State::Unknown {
                    section,
                    scanned: 0,
                }
            }
        };
    }

    fn ram_record(&mut self, b: &[u8], section: u32, out: &mut VecDeque<u64>) -> Step {
        let Some(v) = be64(b, 0) else { return Need };
        let flags = v & (BLOCK as u64 - 1);
        let ty = flags & !RAM_CONTINUE;
        match ty {
            RAM_MEM_SIZE => {
                self.state = State::MemSize {
                    section,
                    remaining: v & !(BLOCK as u64 - 1),
                };
                Consumed(8)
            }
            RAM_EOS if self.preempt => {
                // The postcopy preempt channel ends with EOS (7.2) or just closes.
                self.state = State::Tail;
                Consumed(8)
            }
            RAM_EOS => {
                self.state = State::Footer { section };
                Consumed(8)
            }
            RAM_MULTIFD_FLUSH => Consumed(8),
            RAM_ZERO | RAM_PAGE | RAM_XBZRLE | RAM_COMPRESS => {
                let mut n = 8;
                if flags & RAM_CONTINUE == 0 {
                    let Some(&l) = b.get(8) else { return Need };
                    if l == 0 {
                        return GiveUp("empty RAM block name".into());
                    }
                    n += 1 + l as usize;
                } else if !self.have_block {
                    return GiveUp("CONTINUE without a previous block".into());
                }
                let step = match ty {
                    RAM_ZERO => {
                        if b.len() < n + 1 {
                            return Need;
                        }
                        self.stats.zero_pages += 1;
                        Consumed(n + 1)
                    }
                    RAM_PAGE => {
                        if b.len() < n {
                            return Need;
                        }
                        out.push_back(self.at + n as u64);
                        self.next_skip = BLOCK as u64;
                        self.stats.pages += 1;
                        Consumed(n)
                    }
                    RAM_XBZRLE => {
                        let (Some(&enc), Some(len)) = (b.get(n), be16(b, n + 1)) else {
                            return Need;
                        };
                        if enc != 1 || len as usize > BLOCK {
                            return GiveUp(format!("XBZRLE header {enc}/{len}"));
                        }
                        self.next_skip = u64::from(len);
                        self.stats.encoded_pages += 1;
                        Consumed(n + 3)
                    }
                    _ => {
                        let Some(len) = be32(b, n) else { return Need };
                        if len as usize > BLOCK + 1024 {
                            return GiveUp(format!("compressed page of {len} bytes"));
                        }
                        self.next_skip = u64::from(len);
                        self.stats.encoded_pages += 1;
                        Consumed(n + 4)
                    }
                };
                self.have_block = true;
                step
            }
            _ => GiveUp(format!("unknown RAM record flags 0x{flags:03x}")),
        }
    }

    fn mem_size_entry(&mut self, b: &[u8], section: u32, remaining: u64) -> Step {
        if remaining == 0 {
            // Optional trailing page size of the last block (postcopy + hugepages).
            if self.postcopy {
                let Some(v) = be64(b, 0) else { return Need };
                if v != 0 && v & (BLOCK as u64 - 1) == 0 {
                    self.state = State::Ram { section };
                    return Consumed(8);
                }
            }
            self.state = State::Ram { section };
            return Consumed(0);
        }
        let Some(&l) = b.first() else { return Need };
        if l == 0 {
            return GiveUp("empty RAM block name in block list".into());
        }
        let mut n = 1 + l as usize;
        let Some(used) = be64(b, n) else { return Need };
        n += 8;
        if used > remaining {
            return GiveUp("RAM block list longer than announced".into());
        }
        let left = remaining - used;
        if self.postcopy {
            // page_size is present iff the block's page size differs from the host's;
            // a name length byte is never 0, a page size's first byte always is.
            if left > 0 {
                let Some(&next) = b.get(n) else { return Need };
                if next == 0 {
                    n += 8;
                }
            } else {
                // Decided by the next state (a page size has no flag bits).
            }
        }
        if self.ignore_shared {
            n += 8;
        }
        if b.len() < n {
            return Need;
        }
        self.state = State::MemSize {
            section,
            remaining: left,
        };
        Consumed(n)
    }

    fn block_record(&mut self, b: &[u8], section: u32, out: &mut VecDeque<u64>) -> Step {
        let Some(v) = be64(b, 0) else { return Need };
        let flags = v & 0x1FF;
        if flags & BLK_DEVICE_BLOCK != 0 {
            let Some(&l) = b.get(8) else { return Need };
            let n = 9 + l as usize;
            if b.len() < n {
                return Need;
            }
            if flags & BLK_ZERO_BLOCK == 0 {
                for i in 0..(BLK_CHUNK / BLOCK) as u64 {
                    out.push_back(self.at + n as u64 + i * BLOCK as u64);
                }
                self.next_skip = BLK_CHUNK as u64;
                self.stats.disk_blocks += (BLK_CHUNK / BLOCK) as u64;
            }
            return Consumed(n);
        }
        match flags {
            BLK_EOS => {
                self.state = State::Footer { section };
                Consumed(8)
            }
            BLK_PROGRESS => Consumed(8),
            _ => GiveUp(format!("unknown block-migration flags 0x{flags:03x}")),
        }
    }

    /// Skips an unframed device section by finding `7E <id>` followed by a valid record.
    fn scan_footer(&mut self, b: &[u8], section: u32, scanned: u64) -> Step {
        if scanned > MAX_UNKNOWN_SECTION {
            return GiveUp(format!(
                "device section {section} longer than {MAX_UNKNOWN_SECTION} bytes"
            ));
        }
        let pat = footer_bytes(section);
        let Some(i) = b.windows(5).position(|w| w == pat) else {
            // Keep the last 4 bytes: they may start the pattern.
            let keep = b.len().min(4);
            let n = b.len() - keep;
            if n == 0 {
                return Need;
            }
            self.state = State::Unknown {
                section,
                scanned: scanned + n as u64,
            };
            return Consumed(n);
        };
        if i > 0 {
            self.state = State::Unknown {
                section,
                scanned: scanned + i as u64,
            };
            return Consumed(i);
        }
        match self.plausible_record(&b[5..]) {
            None => Need,
            Some(true) => {
                self.state = State::Records;
                Consumed(5)
            }
            Some(false) => {
                self.state = State::Unknown {
                    section,
                    scanned: scanned + 1,
                };
                Consumed(1)
            }
        }
    }

    /// Whether `b` starts with a record that can follow a section footer (`None`: not
    /// enough bytes to tell).
    fn plausible_record(&self, b: &[u8]) -> Option<bool> {
        let &t = b.first()?;
        Some(match t {
            REC_EOF => true,
            REC_START | REC_FULL => {
                let _id = be32(b, 1)?;
                let l = *b.get(5)? as usize;
                let name = b.get(6..6 + l)?;
                let _ = be32(b, 6 + l + 4)?;
                l > 0 && name.iter().all(|c| c.is_ascii_graphic())
            }
            // A resumed channel continues sections it never saw start.
            REC_PART | REC_END => self.resumed || self.sections.contains_key(&be32(b, 1)?),
            REC_COMMAND => be16(b, 1)? <= CMD_MAX && be16(b, 3)? <= 4096,
            _ => false,
        })
    }
}

impl BlockFinder for QemuMainFinder {
    fn feed(&mut self, data: &[u8], out: &mut VecDeque<u64>) {
        let mut cursor = std::mem::take(&mut self.cursor);
        cursor.feed(data, MAX_LOOKAHEAD, |view, at, skip| {
            self.at = at;
            self.next_skip = 0;
            let step = self.step(view, out);
            *skip = self.next_skip;
            step
        });
        self.cursor = cursor;
    }

    fn gave_up(&self) -> Option<(u64, &str)> {
        self.cursor.gave_up()
    }

    fn kind(&self) -> &'static str {
        if self.preempt {
            "qemu-preempt"
        } else {
            "qemu-main"
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("pages", self.stats.pages),
            ("zero_pages", self.stats.zero_pages),
            ("encoded_pages", self.stats.encoded_pages),
            ("disk_blocks", self.stats.disk_blocks),
            ("device_sections", self.stats.device_sections),
        ]
    }
}

fn footer_bytes(section: u32) -> [u8; 5] {
    let id = section.to_be_bytes();
    [REC_FOOTER, id[0], id[1], id[2], id[3]]
}

fn is_x86_machine(name: &[u8]) -> bool {
    let n = String::from_utf8_lossy(name);
    [
        "pc", "q35", "microvm", "isapc", "xenfv", "xenpv", "x-remote", "none",
    ]
    .iter()
    .any(|p| n == *p || n.starts_with(&format!("{p}-")))
}

/// Whether `r` starts with what a resumed RAM section sends first: a PAGE or ZERO
/// record naming its block (QEMU forgets the last block on resume, so no CONTINUE),
/// or an empty iteration's EOS. `None`: more bytes needed to tell.
fn starts_ram_record(r: &[u8]) -> Option<bool> {
    let flags = be64(r, 0)? & (BLOCK as u64 - 1);
    Some(match flags {
        RAM_EOS => true,
        RAM_PAGE | RAM_ZERO => {
            let len = *r.get(8)? as usize;
            len > 0
                && r.get(9..9 + len.min(4))?
                    .iter()
                    .all(|c| c.is_ascii_graphic())
        }
        _ => false,
    })
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
