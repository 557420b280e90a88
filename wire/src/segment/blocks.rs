//! The bridge between a protocol parser that *finds* 4 KiB blocks and the segment
//! stream the encoder consumes.
//!
//! A [`BlockFinder`] sees every byte once, in order, and reports the absolute stream
//! offsets where 4 KiB blocks start. It never owns bytes. [`BlockSegmenter`] holds the
//! connection's read buffer and cuts it at those offsets: bytes before a block are
//! opaque, a block whose 4096 bytes are all still buffered becomes a `Block`, anything
//! else stays opaque. When the finder gives up, the rest of the stream goes through
//! content-defined chunking. Whatever the finder says, the segments concatenate to
//! exactly the input: a wrong finder only costs dedup.

use std::collections::VecDeque;

use bytes::BytesMut;

use super::{Segment, Segmenter, SegmenterReport, MIN_BLOCK};
use crate::chunk::Chunker;

/// Bytes per block.
pub const BLOCK: usize = 4096;

/// Opaque runs at least this long (device state, JSON descriptions) are cut by content
/// so their repeats across VMs deduplicate too; shorter ones (record headers) travel
/// as literals.
const CDC_OPAQUE_MIN: usize = 2048;

/// A protocol parser that reports where blocks start.
pub trait BlockFinder: Send {
    /// Parses the next bytes of the stream, appending the absolute offsets of blocks
    /// that start in them (or later, once their header is complete) to `out`, in
    /// increasing order.
    fn feed(&mut self, data: &[u8], out: &mut VecDeque<u64>);

    /// Where the parser lost track of the stream, and why.
    fn gave_up(&self) -> Option<(u64, &str)>;

    /// A short name for logs and stats.
    fn kind(&self) -> &'static str;

    /// Protocol-specific counters as `(name, value)`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// Whether the stream's sender waits for the peer's reply to each request (NBD's
    /// requests and replies): then the link's speed sets its pace even when nothing
    /// waits for the link, and fewer bytes on the link mean sooner replies.
    fn awaits_replies(&self) -> bool {
        false
    }
}

/// Cuts the stream at the blocks a [`BlockFinder`] reports.
pub struct BlockSegmenter<F> {
    finder: F,
    /// Absolute offset of `input[0]`.
    head: u64,
    /// Absolute offset up to which the finder has been fed.
    fed: u64,
    blocks: VecDeque<u64>,
    cdc: Chunker,
    report: SegmenterReport,
}

impl<F: BlockFinder> BlockSegmenter<F> {
    /// Wraps `finder`; `cdc` cuts opaque runs and the stream after a give-up.
    pub fn new(finder: F, cdc: Chunker) -> Self {
        BlockSegmenter {
            finder,
            head: 0,
            fed: 0,
            blocks: VecDeque::new(),
            cdc,
            report: SegmenterReport::default(),
        }
    }

    /// The finder.
    pub fn finder(&self) -> &F {
        &self.finder
    }

    fn emit_opaque(&mut self, input: &mut BytesMut, len: usize, out: &mut Vec<Segment>) {
        if len == 0 {
            return;
        }
        let mut run = input.split_to(len);
        self.head += len as u64;
        self.report.opaque_bytes += len as u64;
        if len < CDC_OPAQUE_MIN {
            out.push(Segment::Opaque(run.freeze()));
            return;
        }
        while let Some(piece) = self.cdc.next(&mut run, true) {
            if piece.len() < MIN_BLOCK {
                out.push(Segment::Opaque(piece));
            } else {
                out.push(Segment::Block(piece));
            }
        }
    }
}

impl<F: BlockFinder> Segmenter for BlockSegmenter<F> {
    fn segment(&mut self, input: &mut BytesMut, flush: bool, out: &mut Vec<Segment>) {
        let fed_rel = (self.fed - self.head) as usize;
        if fed_rel < input.len() {
            self.finder.feed(&input[fed_rel..], &mut self.blocks);
            self.fed = self.head + input.len() as u64;
        }
        let give_up = self.finder.gave_up().map(|(at, _)| at);
        loop {
            // A block that started before `head` was already sent (partly) as opaque.
            while self.blocks.front().is_some_and(|&b| b < self.head) {
                self.blocks.pop_front();
                self.report.blocks_lost += 1;
            }
            let limit = input.len() as u64;
            match self.blocks.front().copied() {
                Some(start) if give_up.is_none_or(|g| start + BLOCK as u64 <= g) => {
                    let rel = start - self.head;
                    if rel >= limit {
                        // The block starts beyond what we hold: all we hold is before it.
                        let all = input.len();
                        self.emit_opaque(input, all, out);
                        return;
                    }
                    self.emit_opaque(input, rel as usize, out);
                    if input.len() >= BLOCK {
                        out.push(Segment::Block(input.split_to(BLOCK).freeze()));
                        self.head += BLOCK as u64;
                        self.report.blocks += 1;
                        self.blocks.pop_front();
                        continue;
                    }
                    if flush {
                        let all = input.len();
                        self.emit_opaque(input, all, out);
                    }
                    return;
                }
                _ => {}
            }
            // No block ahead.
            match give_up {
                Some(g) if g <= self.head => {
                    // Lost track: content-defined chunks, as for an unknown stream.
                    while let Some(chunk) = self.cdc.next(input, flush) {
                        self.head += chunk.len() as u64;
                        self.report.fallback_bytes += chunk.len() as u64;
                        if chunk.len() < MIN_BLOCK {
                            out.push(Segment::Opaque(chunk));
                        } else {
                            out.push(Segment::Block(chunk));
                        }
                    }
                    return;
                }
                Some(g) => {
                    let upto = ((g - self.head) as usize).min(input.len());
                    self.emit_opaque(input, upto, out);
                    if upto == 0 || input.is_empty() {
                        return;
                    }
                }
                None => {
                    // Every byte held precedes any block still to be announced.
                    let all = input.len();
                    self.emit_opaque(input, all, out);
                    return;
                }
            }
        }
    }

    fn kind(&self) -> &'static str {
        self.finder.kind()
    }

    fn awaits_replies(&self) -> bool {
        self.finder.awaits_replies()
    }

    fn report(&self) -> SegmenterReport {
        let mut r = self.report.clone();
        r.kind = self.finder.kind();
        r.gave_up = self.finder.gave_up().map(|(at, why)| (at, why.to_string()));
        r.counters = self.finder.counters();
        r
    }
}

/// What a grammar made of the bytes in view (see [`StreamCursor::feed`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The first `n` bytes are one element, parsed (the grammar's state moved on).
    Consumed(usize),
    /// More bytes are needed to decide.
    Need,
    /// The stream does not follow the grammar: stop parsing, for this reason.
    GiveUp(String),
}

/// Grammars written as `Ok(Some(consumed))` / `Ok(None)` (need more) / `Err(why)`.
impl From<Result<Option<usize>, String>> for Step {
    fn from(r: Result<Option<usize>, String>) -> Self {
        match r {
            Ok(Some(n)) => Step::Consumed(n),
            Ok(None) => Step::Need,
            Err(why) => Step::GiveUp(why),
        }
    }
}

/// Drives an incremental grammar over a byte stream that arrives in arbitrary pieces:
/// skips payloads by count (never copying them), parses an element in place when it
/// is complete in the piece at hand, and through a small carry buffer when it
/// straddles pieces. One implementation for every protocol parser, so the subtle part
/// (what is consumed, what is carried, what a give-up covers) is written once.
#[derive(Debug, Default)]
pub struct StreamCursor {
    /// Absolute offset of the next byte to parse (the first carried byte, if any).
    pos: u64,
    /// Payload bytes still to pass without parsing.
    skip: u64,
    carry: Vec<u8>,
    gave_up: Option<(u64, String)>,
}

impl StreamCursor {
    /// Where parsing stopped, and why.
    pub fn gave_up(&self) -> Option<(u64, &str)> {
        self.gave_up.as_ref().map(|(at, why)| (*at, why.as_str()))
    }

    /// Feeds the next bytes of the stream. `step(view, at, skip)` parses one element
    /// at the front of `view` (which starts at absolute offset `at`) and may set
    /// `skip` to a payload length to pass after it. An element may need at most
    /// `max_element` bytes in view; a grammar that asks for more gives up.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        max_element: usize,
        mut step: impl FnMut(&[u8], u64, &mut u64) -> Step,
    ) {
        while !data.is_empty() {
            if self.skip > 0 {
                let k = self.skip.min(data.len() as u64) as usize;
                self.skip -= k as u64;
                self.pos += k as u64;
                data = &data[k..];
                continue;
            }
            if self.gave_up.is_some() {
                self.pos += data.len() as u64;
                return;
            }
            if self.carry.is_empty() {
                match step(data, self.pos, &mut self.skip) {
                    Step::Consumed(n) => {
                        self.pos += n as u64;
                        data = &data[n..];
                    }
                    Step::Need if data.len() < max_element => {
                        self.carry.extend_from_slice(data);
                        return;
                    }
                    Step::Need => {
                        self.give_up("grammar element larger than the lookahead limit".into())
                    }
                    Step::GiveUp(why) => self.give_up(why),
                }
            } else {
                let old = self.carry.len();
                let take = data.len().min(max_element.saturating_sub(old));
                let mut view = std::mem::take(&mut self.carry);
                view.extend_from_slice(&data[..take]);
                match step(&view, self.pos, &mut self.skip) {
                    Step::Consumed(n) if n >= old => {
                        self.pos += n as u64;
                        data = &data[n - old..];
                    }
                    Step::Consumed(n) => {
                        // The element ended inside the carried bytes: keep the rest of
                        // them carried; `data` is still unread.
                        self.pos += n as u64;
                        view.truncate(old);
                        view.drain(..n);
                        self.carry = view;
                    }
                    Step::Need if take == data.len() => {
                        self.carry = view;
                        return;
                    }
                    Step::Need => {
                        self.give_up("grammar element larger than the lookahead limit".into())
                    }
                    Step::GiveUp(why) => self.give_up(why),
                }
            }
        }
    }

    fn give_up(&mut self, why: String) {
        self.gave_up = Some((self.pos, why));
        self.carry.clear();
        self.skip = 0;
    }
}
