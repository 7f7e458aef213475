//! The atomic read-modify-writes an admit + settle through a resolved scope makes, and nothing
//! else: a floor under what any design with the engine's guarantees can cost, measured beside
//! governor's one compare-exchange (README, Performance).

use std::sync::atomic::{AtomicU64, Ordering};

use portable_atomic::AtomicU128;

/// One cache line pair, as the engine's tables give each slot its own.
#[repr(align(128))]
#[derive(Default)]
struct Line<T>(T);

/// Stand-ins for the words an admission and its settle write, each on its own line as in the
/// engine's tables.
#[derive(Default)]
pub struct AtomicFloor {
    /// The account's in-flight count (concurrency cap).
    account: Line<AtomicU64>,
    /// The scope's tick word, which holds its in-flight count (no reclaim while busy).
    scope_tick: Line<AtomicU64>,
    /// The scope's four buckets in one word.
    bucket: Line<AtomicU128>,
    /// The scope's usage since its last tick (adaptation).
    usage: Line<AtomicU128>,
    /// The permit's ledger entry (double-settle detection, expiry).
    ledger: Line<AtomicU128>,
    /// The model's outcome counter (metrics).
    counter: Line<AtomicU64>,
}

impl AtomicFloor {
    /// The twelve read-modify-writes of one admit + settle in the order the engine makes them:
    /// five 16-byte compare-exchanges and seven 8-byte ones.
    pub fn admit_settle(&self) {
        let cas = |a: &AtomicU64, f: fn(u64) -> u64| {
            let cur = a.load(Ordering::Acquire);
            let _ = a.compare_exchange(cur, f(cur), Ordering::AcqRel, Ordering::Acquire);
        };
        let cas_wide = |a: &AtomicU128, f: fn(u128) -> u128| {
            let cur = a.load(Ordering::Acquire);
            let _ = a.compare_exchange(cur, f(cur), Ordering::AcqRel, Ordering::Acquire);
        };
        // Admit: enter the account, count the scope busy, take a ledger entry, charge the
        // buckets, count the outcome; the entry is then published with a plain store.
        cas(&self.account.0, |n| n + 1);
        self.scope_tick.0.fetch_add(1, Ordering::AcqRel);
        cas_wide(&self.ledger.0, |e| e | 1);
        cas_wide(&self.bucket.0, |w| w.wrapping_add(3));
        self.counter.0.fetch_add(1, Ordering::Relaxed);
        self.ledger.0.store(self.ledger.0.load(Ordering::Relaxed) | 2, Ordering::Release);
        // Settle: free the entry, correct the buckets, add the usage, leave the account and the
        // scope, count the settle.
        cas_wide(&self.ledger.0, |e| e & !3);
        cas_wide(&self.bucket.0, |w| w.wrapping_sub(1));
        cas_wide(&self.usage.0, |u| u.wrapping_add(1));
        cas(&self.account.0, |n| n - 1);
        self.scope_tick.0.fetch_sub(1, Ordering::AcqRel);
        self.counter.0.fetch_add(1, Ordering::Relaxed);
    }
}
