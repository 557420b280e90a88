//! Cross-module tests: property tests against a reference model and multi-threaded use.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread;

use bytes::Bytes;
use proptest::prelude::*;
use wire::{ChunkId, ContentStore, PeerHoldings, VerifiedChunk};

use crate::{ChunkStore, PeerIndex, ENTRY_OVERHEAD};

/// The bytes of test chunk `key`; `salt` varies the sizes between test cases. A given
/// `(key, salt)` always gives the same bytes, hence the same id; different keys never
/// share an id (at least one byte, every byte equal to the key).
fn data(key: u8, salt: usize) -> Bytes {
    let len = 1 + (usize::from(key) * salt + salt) % 1200;
    Bytes::from(vec![key; len])
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u8),
    Get(u8),
    Contains(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..40).prop_map(Op::Insert),
        2 => (0u8..40).prop_map(Op::Get),
        1 => (0u8..40).prop_map(Op::Contains),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens, the budget holds, the bookkeeping is exact, and a hit returns
    /// exactly the bytes inserted under that id.
    #[test]
    fn budget_holds_and_hits_are_exact(
        cap in prop_oneof![Just(0u64), 0u64..20_000],
        shards in prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        salt in 1usize..500,
        ops in proptest::collection::vec(op(), 0..300),
    ) {
        let s = ChunkStore::with_shards(cap, shards);
        let shard_budget = cap / shards as u64;
        let (mut gets, mut hits) = (0, 0);
        for op in ops {
            match op {
                Op::Insert(k) => {
                    let d = data(k, salt);
                    let fits = d.len() as u64 + ENTRY_OVERHEAD <= shard_budget;
                    let c = VerifiedChunk::from_local(d);
                    let id = *c.id();
                    s.insert(c);
                    // The newest entry is never its own eviction victim.
                    prop_assert_eq!(s.contains(&id), fits);
                }
                Op::Get(k) => {
                    let d = data(k, salt);
                    gets += 1;
                    if let Some(got) = s.get(&ChunkId::of(&d)) {
                        hits += 1;
                        prop_assert_eq!(got, d);
                    }
                }
                Op::Contains(k) => {
                    s.contains(&ChunkId::of(&data(k, salt)));
                }
            }
            prop_assert!(s.bytes() <= cap);
            s.check_invariants();
        }
        let st = s.stats();
        prop_assert_eq!(st.hits, hits);
        prop_assert_eq!(st.hits + st.misses, gets);
        prop_assert_eq!(st.inserts - st.evictions, st.entries as u64);
        if cap == 0 {
            prop_assert_eq!(st.entries, 0);
        }
    }

    /// With one shard the store is exactly an LRU list bounded in bytes: compare it
    /// with a naive model after every operation.
    #[test]
    fn single_shard_matches_reference_lru(
        cap in 0u64..8_000,
        salt in 1usize..500,
        ops in proptest::collection::vec(op(), 0..300),
    ) {
        let s = ChunkStore::with_shards(cap, 1);
        // Front = least recently used.
        let mut model: VecDeque<(u8, u64)> = VecDeque::new();
        let touch = |model: &mut VecDeque<(u8, u64)>, k: u8| -> bool {
            match model.iter().position(|&(m, _)| m == k) {
                Some(i) => {
                    let e = model.remove(i).expect("index from position");
                    model.push_back(e);
                    true
                }
                None => false,
            }
        };
        for op in ops {
            match op {
                Op::Insert(k) => {
                    let d = data(k, salt);
                    let w = d.len() as u64 + ENTRY_OVERHEAD;
                    s.insert(VerifiedChunk::from_local(d));
                    if w <= cap && !touch(&mut model, k) {
                        while model.iter().map(|&(_, w)| w).sum::<u64>() + w > cap {
                            model.pop_front();
                        }
                        model.push_back((k, w));
                    }
                }
                Op::Get(k) => {
                    let d = data(k, salt);
                    let got = s.get(&ChunkId::of(&d));
                    prop_assert_eq!(got.is_some(), touch(&mut model, k));
                    if let Some(got) = got {
                        prop_assert_eq!(got, d);
                    }
                }
                Op::Contains(k) => {
                    let held = s.contains(&ChunkId::of(&data(k, salt)));
                    prop_assert_eq!(held, model.iter().any(|&(m, _)| m == k));
                }
            }
            for k in 0..40u8 {
                let held = s.contains(&ChunkId::of(&data(k, salt)));
                prop_assert_eq!(held, model.iter().any(|&(m, _)| m == k), "key {}", k);
            }
            prop_assert_eq!(s.bytes(), model.iter().map(|&(_, w)| w).sum::<u64>());
        }
    }
}

/// A tiny deterministic generator so the threads need no `rand`.
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *state >> 33
}

#[test]
fn concurrent_store_stays_within_budget_and_consistent() {
    const THREADS: u64 = 8;
    const OPS: usize = 4000;
    // 300 chunks of up to ~2 KiB, about 300 KiB in all, into a 48 KiB store: constant
    // eviction and heavy overlap between threads.
    let pool: Arc<Vec<VerifiedChunk>> = Arc::new(
        (0..300u32)
            .map(|n| {
                let len = (n as usize * 97) % 2000;
                let mut v = vec![0u8; len];
                v.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = (i as u32 ^ n) as u8);
                v.extend_from_slice(&n.to_le_bytes());
                VerifiedChunk::from_local(Bytes::from(v))
            })
            .collect(),
    );
    let cap = 48 << 10;
    let store = ChunkStore::with_shards(cap, 8);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                let mut rng = t + 1;
                let mut gets = 0u64;
                for _ in 0..OPS {
                    let c = &pool[lcg(&mut rng) as usize % pool.len()];
                    if lcg(&mut rng) % 2 == 0 {
                        store.insert(c.clone());
                    } else {
                        gets += 1;
                        if let Some(got) = store.get(c.id()) {
                            assert_eq!(&got, c.data(), "hit returned other bytes");
                        }
                    }
                }
                gets
            })
        })
        .collect();
    let gets: u64 = handles.into_iter().map(|h| h.join().expect("thread")).sum();

    store.check_invariants();
    let st = store.stats();
    assert!(st.bytes <= cap, "{st:?}");
    assert_eq!(st.hits + st.misses, gets);
    assert_eq!(st.inserts - st.evictions, st.entries as u64);
    assert!(st.evictions > 0, "test should exercise eviction: {st:?}");
    assert!(st.hits > 0, "test should exercise hits: {st:?}");
    // Everything still held returns its own bytes.
    for c in pool.iter() {
        if store.contains(c.id()) {
            assert_eq!(store.get(c.id()).as_ref(), Some(c.data()));
        }
    }
}

#[test]
fn concurrent_peer_index_marks_each_id_once() {
    const THREADS: u64 = 8;
    const IDS: u32 = 500;
    // Room for everything: each id must be marked by exactly one thread, every other
    // call on it must be a hit.
    let index = Arc::new(PeerIndex::new(1 << 30));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let index = Arc::clone(&index);
            thread::spawn(move || {
                let mut marked = 0u64;
                for i in 0..IDS {
                    // Each thread walks the ids from a different starting point.
                    let n = (i + t as u32 * 61) % IDS;
                    if !index
                        .check_and_mark(&ChunkId::of(&n.to_le_bytes()), 100)
                        .is_held()
                    {
                        marked += 1;
                    }
                }
                marked
            })
        })
        .collect();
    let marked: u64 = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(marked, u64::from(IDS));
    let st = index.stats();
    assert_eq!(st.marks, u64::from(IDS));
    assert_eq!(st.hits, THREADS * u64::from(IDS) - u64::from(IDS));
    assert_eq!(st.entries, IDS as usize);
    index.check_invariants();
}

#[test]
fn concurrent_peer_index_small_budget() {
    let cap = 20 * (500 + ENTRY_OVERHEAD);
    let index = Arc::new(PeerIndex::with_shards(cap, 4));
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let index = Arc::clone(&index);
            thread::spawn(move || {
                let mut rng = t + 100;
                for _ in 0..3000 {
                    let n = (lcg(&mut rng) % 200) as u32;
                    let id = ChunkId::of(&n.to_le_bytes());
                    if lcg(&mut rng) % 8 == 0 {
                        index.forget(&id);
                    } else {
                        index.check_and_mark(&id, 100 + n as usize * 2).is_held();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    index.check_invariants();
    assert!(index.bytes() <= cap);
    assert!(index.stats().evictions > 0);
}

#[test]
fn a_peek_neither_refreshes_nor_counts() {
    // Room for two 1000-byte chunks in one shard.
    let s = ChunkStore::with_shards(2 * (1000 + ENTRY_OVERHEAD), 1);
    let chunk = |n: u8| VerifiedChunk::from_local(Bytes::from(vec![n; 1000]));
    let (first, second) = (chunk(1), chunk(2));
    let (first_id, second_id) = (*first.id(), *second.id());
    s.insert(first);
    s.insert(second);
    let before = s.stats();
    // The same bytes as stored (a reference count, no copy), ...
    let peeked = s.peek(&first_id).expect("held");
    assert_eq!(peeked, Bytes::from(vec![1u8; 1000]));
    assert!(s.peek(&ChunkId::of(b"absent")).is_none());
    // ... no hit or miss counted, and the oldest stays the oldest: a third chunk
    // evicts it, not the second.
    let after = s.stats();
    assert_eq!((after.hits, after.misses), (before.hits, before.misses));
    s.insert(chunk(3));
    assert!(!s.contains(&first_id));
    assert!(s.contains(&second_id));
    // A pin that shares the peeked bytes keeps them alive past the eviction.
    assert_eq!(peeked.len(), 1000);
}
