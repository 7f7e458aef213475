//! A scope's state: the hot slot every admit and settle touches, and the adaptive state a tick
//! touches once a minute.

use crate::adapt::MetricState;
use crate::bucket::{self, Word};
use crate::metric::PerMetric;
use crate::sync::{AtomicU64, AtomicU128, Ordering};
use crate::table::Slot;

// Tick word: bit 0 busy (an adaptation is being applied), bits 1..24 permits outstanding,
// bits 24..64 the last tick applied (wrapping; compared as a signed difference).
const BUSY: u64 = 1;
const IN_FLIGHT_SHIFT: u32 = 1;
const IN_FLIGHT_BITS: u32 = 23;
pub(crate) const IN_FLIGHT_ONE: u64 = 1 << IN_FLIGHT_SHIFT;
const IN_FLIGHT_MASK: u64 = ((1 << IN_FLIGHT_BITS) - 1) << IN_FLIGHT_SHIFT;
const TICK_SHIFT: u32 = IN_FLIGHT_SHIFT + IN_FLIGHT_BITS;
const TICK_MASK: u64 = (1 << (64 - TICK_SHIFT)) - 1;
/// Most permits one engine may have outstanding (the tick word's counter must not overflow).
pub(crate) const MAX_PERMITS: usize = (1 << IN_FLIGHT_BITS) - 1;

// Scope tag: bit 0 variant, 12 bits model, 24 bits account, 25 bits generation.
const MODEL_BITS: u32 = 12;
const ACCOUNT_BITS: u32 = 24;
const IDENTITY_BITS: u32 = 1 + MODEL_BITS + ACCOUNT_BITS;
/// Tag bits that identify a scope; the rest is its generation.
pub(crate) const IDENTITY_MASK: u64 = (1 << IDENTITY_BITS) - 1;
/// Most models and accounts the scope tag can name.
pub(crate) const MAX_MODELS: usize = 1 << MODEL_BITS;
pub(crate) const MAX_ACCOUNTS: usize = 1 << ACCOUNT_BITS;

/// The identity bits of a scope's tag.
pub(crate) fn identity(account: usize, model: usize, variant: usize) -> u64 {
    ((account as u64) << (1 + MODEL_BITS)) | ((model as u64) << 1) | variant as u64
}

/// Permits outstanding according to a tick word.
pub(crate) fn in_flight_of(tick_word: u64) -> u64 {
    (tick_word & IN_FLIGHT_MASK) >> IN_FLIGHT_SHIFT
}

/// The account index a scope id names.
pub(crate) fn account_of(id: u64) -> usize {
    ((crate::table::tag_of(id) >> (1 + MODEL_BITS)) & ((1 << ACCOUNT_BITS) - 1)) as usize
}

/// The model index and variant a scope id names.
pub(crate) fn model_and_variant(id: u64) -> (usize, crate::key::Variant) {
    let tag = crate::table::tag_of(id);
    let model = ((tag >> 1) & ((1 << MODEL_BITS) - 1)) as usize;
    let variant = if tag & 1 == 0 { crate::key::Variant::Regular } else { crate::key::Variant::Fast };
    (model, variant)
}

/// The tag of the next scope to live in a slot whose id was `old`: a new generation.
pub(crate) fn next_generation(old: u64, identity: u64) -> u64 {
    let generation = (crate::table::tag_of(old) >> IDENTITY_BITS).wrapping_add(1);
    ((generation << IDENTITY_BITS) & (u64::MAX >> 2)) | identity
}

/// The hot state of one scope: 128 bytes, aligned so two scopes never share a cache line pair.
#[derive(Debug)]
#[repr(C, align(128))]
pub struct ScopeSlot {
    pub(crate) id: AtomicU64,
    pub(crate) tick: AtomicU64,
    /// The four bucket debts, their epoch and interval version, in one CAS-able word.
    pub(crate) bucket: AtomicU128,
    /// Usage settled since the last tick: four saturating 32-bit counters, added in one CAS.
    pub(crate) usage: AtomicU128,
    /// Quanta per token (32.32) per metric, double-buffered by the bucket word's version.
    pub(crate) interval: [[AtomicU64; 4]; 2],
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<ScopeSlot>() <= 128);

impl Default for ScopeSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl ScopeSlot {
    /// An empty slot.
    pub fn new() -> Self {
        ScopeSlot {
            id: AtomicU64::new(0),
            tick: AtomicU64::new(0),
            bucket: AtomicU128::new(Word::fresh(0, 0).pack()),
            usage: AtomicU128::new(0),
            interval: core::array::from_fn(|_| core::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    #[inline]
    pub(crate) fn intervals(&self, buffer: usize) -> [u64; 4] {
        let set = self.interval.get(buffer).unwrap_or(&self.interval[0]);
        set.each_ref().map(|a| a.load(Ordering::Relaxed))
    }

    pub(crate) fn store_intervals(&self, buffer: usize, values: [u64; 4]) {
        if let Some(set) = self.interval.get(buffer) {
            set.iter().zip(values).for_each(|(a, v)| a.store(v, Ordering::Relaxed));
        }
    }

    /// Empties the slot (restore, which has the engine to itself).
    pub(crate) fn clear(&self) {
        self.id.store(0, Ordering::Relaxed);
        self.tick.store(0, Ordering::Relaxed);
        self.bucket.store(Word::fresh(0, 0).pack(), Ordering::Relaxed);
        self.usage.store(0, Ordering::Relaxed);
        self.interval.iter().flatten().for_each(|i| i.store(0, Ordering::Relaxed));
    }

    /// Resets a slot this thread has just claimed to a fresh scope, and releases the tick lock
    /// (which the caller holds, unless it has the engine to itself).
    pub(crate) fn init(&self, fresh_interval: [u64; 4], now_q: u64, now_tick: u64) {
        self.usage.store(0, Ordering::Relaxed);
        self.store_intervals(0, fresh_interval);
        self.store_intervals(1, fresh_interval);
        // A version other than the last incarnation's makes any stale compare-exchange fail.
        let old = self.bucket.load(Ordering::Acquire);
        let version = Word::unpack(old).version.wrapping_add(1);
        self.bucket.store(Word::fresh(now_q, version).pack(), Ordering::Release);
        // Keep the outstanding count: a stale admitter may be between its +1 and -1. The lock
        // bit is cleared.
        let mut t = self.tick.load(Ordering::Acquire);
        loop {
            let fresh = (t & IN_FLIGHT_MASK) | ((now_tick & TICK_MASK) << TICK_SHIFT);
            match self.tick.compare_exchange(t, fresh, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(cur) => t = cur,
            }
        }
    }

    /// Whether ticks up to `now_tick` remain to be applied (a cheap check before `begin_tick`).
    #[inline]
    pub(crate) fn tick_due(&self, now_tick: u64) -> bool {
        self.ticks_ahead(now_tick) != 0
    }

    /// How many ticks `now_tick` is past the last tick applied (0 if it is not past it).
    #[inline]
    pub(crate) fn ticks_ahead(&self, now_tick: u64) -> u64 {
        let ahead = (now_tick & TICK_MASK).wrapping_sub(self.last_tick()) & TICK_MASK;
        if ahead <= TICK_MASK / 2 { ahead } else { 0 }
    }

    /// The last tick applied (wrapping 40-bit index).
    #[inline]
    pub(crate) fn last_tick(&self) -> u64 {
        (self.tick.load(Ordering::Acquire) >> TICK_SHIFT) & TICK_MASK
    }

    /// How far `now_tick` is behind the last tick applied (0 if it is not behind).
    #[inline]
    pub(crate) fn ticks_behind(&self, now_tick: u64) -> u64 {
        let behind = self.last_tick().wrapping_sub(now_tick & TICK_MASK) & TICK_MASK;
        if behind <= TICK_MASK / 2 { behind } else { 0 }
    }

    /// Wins the right to apply ticks up to `now_tick` (the tick lock); returns how many are due.
    /// The last tick applied moves only at [`ScopeSlot::end_tick`], once the word is re-sealed.
    pub(crate) fn begin_tick(&self, now_tick: u64) -> Option<u64> {
        let now_tick = now_tick & TICK_MASK;
        let mut t = self.tick.load(Ordering::Acquire);
        loop {
            let last = (t >> TICK_SHIFT) & TICK_MASK;
            let ahead = now_tick.wrapping_sub(last) & TICK_MASK;
            if t & BUSY != 0 || ahead == 0 || ahead > TICK_MASK / 2 {
                return None;
            }
            match self.tick.compare_exchange(t, t | BUSY, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(ahead),
                Err(cur) => t = cur,
            }
        }
    }

    /// Releases the tick lock, recording `applied` as the last tick applied if given.
    pub(crate) fn end_tick(&self, applied: Option<u64>) {
        let mut t = self.tick.load(Ordering::Acquire);
        loop {
            let last = applied.map_or(t & (TICK_MASK << TICK_SHIFT), |a| (a & TICK_MASK) << TICK_SHIFT);
            let next = (t & IN_FLIGHT_MASK) | last;
            match self.tick.compare_exchange(t, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(cur) => t = cur,
            }
        }
    }

    /// Takes the adaptation lock whatever the tick, waiting out a tick being applied (for an
    /// operator's change of bounds); false if it was held for [`crate::table::PATIENCE`] rounds
    /// (by a process of a shared region killed while it held it).
    pub(crate) fn begin_exclusive(&self) -> bool {
        for _ in 0..crate::table::PATIENCE {
            let t = self.tick.load(Ordering::Acquire);
            if t & BUSY == 0
                && self.tick.compare_exchange(t, t | BUSY, Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                return true;
            }
            crate::sync::spin_hint();
        }
        false
    }

    /// Takes the adaptation lock of an idle slot with no permits outstanding (for reclaim).
    pub(crate) fn begin_reclaim(&self) -> bool {
        let t = self.tick.load(Ordering::Acquire);
        t & (BUSY | IN_FLIGHT_MASK) == 0
            && self.tick.compare_exchange(t, t | BUSY, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Sets the outstanding count and drops the tick lock, keeping the last tick applied (a
    /// repair, which has the tables to itself).
    pub(crate) fn reset_in_flight(&self, n: u64) {
        let t = self.tick.load(Ordering::Acquire);
        let kept = t & !(IN_FLIGHT_MASK | BUSY);
        self.tick.store(kept | ((n << IN_FLIGHT_SHIFT) & IN_FLIGHT_MASK), Ordering::Release);
    }

    pub(crate) fn in_flight(&self) -> u64 {
        in_flight_of(self.tick.load(Ordering::Acquire))
    }

    pub(crate) fn usage_is_zero(&self) -> bool {
        self.usage.load(Ordering::Acquire) == 0
    }

    /// Adds settled usage (each counter saturates at 2^32 − 1 per tick).
    pub(crate) fn add_usage(&self, amounts: [u64; 4]) {
        let mut cur = self.usage.load(Ordering::Acquire);
        loop {
            let next =
                pack_usage(unpack_usage(cur).into_iter().zip(amounts).map(|(u, a)| u.saturating_add(a)));
            match self.usage.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Takes the usage counted since the last tick, leaving zero.
    pub(crate) fn take_usage(&self) -> [u64; 4] {
        unpack_usage(self.usage.swap(0, Ordering::AcqRel))
    }

    /// The usage counted since the last tick.
    pub(crate) fn usage(&self) -> [u64; 4] {
        unpack_usage(self.usage.load(Ordering::Acquire))
    }

    /// Sets the usage counters (restore).
    pub(crate) fn set_usage(&self, amounts: [u64; 4]) {
        self.usage.store(pack_usage(amounts.into_iter()), Ordering::Relaxed);
    }

    /// Swaps the bucket word from a fresh `w` to the retired marker.
    pub(crate) fn retire(&self, w: u128) -> bool {
        let retired = bucket::retired(Word::unpack(w).version);
        self.bucket.compare_exchange(w, retired, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

fn unpack_usage(w: u128) -> [u64; 4] {
    [0u32, 32, 64, 96].map(|shift| ((w >> shift) as u64) & 0xFFFF_FFFF)
}

fn pack_usage(amounts: impl Iterator<Item = u64>) -> u128 {
    amounts.zip([0u32, 32, 64, 96]).fold(0, |w, (a, shift)| w | (u128::from(a.min(0xFFFF_FFFF)) << shift))
}

impl Slot for ScopeSlot {
    fn id(&self) -> &AtomicU64 {
        &self.id
    }
}

/// A scope's adaptive state (limit and usage memory per metric, as `f64` bits), kept apart from
/// the hot slot because only the once-a-tick adaptation reads it.
#[derive(Debug)]
pub struct ScopeAdaptation {
    limit: [AtomicU64; 4],
    memory: [AtomicU64; 4],
}

impl Default for ScopeAdaptation {
    fn default() -> Self {
        Self::new()
    }
}

impl ScopeAdaptation {
    /// Adaptive state of an empty slot.
    pub fn new() -> Self {
        ScopeAdaptation {
            limit: core::array::from_fn(|_| AtomicU64::new(0)),
            memory: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    pub(crate) fn load(&self) -> PerMetric<MetricState> {
        let mut i = self.limit.iter().zip(&self.memory);
        PerMetric::from_fn(|_| {
            i.next().map_or(MetricState { limit: 0.0, memory: 0.0 }, |(l, m)| MetricState {
                limit: f64::from_bits(l.load(Ordering::Relaxed)),
                memory: f64::from_bits(m.load(Ordering::Relaxed)),
            })
        })
    }

    pub(crate) fn store(&self, states: &PerMetric<MetricState>) {
        for ((l, m), (_, s)) in self.limit.iter().zip(&self.memory).zip(states.iter()) {
            l.store(s.limit.to_bits(), Ordering::Relaxed);
            m.store(s.memory.to_bits(), Ordering::Relaxed);
        }
    }
}

/// Intervals for a set of adaptive states.
pub(crate) fn intervals_of(states: &PerMetric<MetricState>) -> [u64; 4] {
    states.map(|_, s| bucket::interval(s.limit)).0
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{IDENTITY_BITS, IDENTITY_MASK, identity, next_generation};
    use crate::table::{emptied, ready, tag_of};

    /// Each scope a slot holds gets the next generation, with the identity it is for, so an id
    /// seen before the slot was emptied never matches the next scope there, even of the same
    /// key; the generation wraps within the tag's bits.
    #[test]
    fn each_scope_in_a_slot_gets_the_next_generation() {
        let key = identity(3, 5, 1);
        let first = next_generation(0, key);
        assert_eq!((first & IDENTITY_MASK, first >> IDENTITY_BITS), (key, 1));
        let second = next_generation(emptied(ready(first)), key);
        assert_eq!((second & IDENTITY_MASK, second >> IDENTITY_BITS), (key, 2));
        let other = identity(4, 5, 0);
        let third = next_generation(ready(second), other);
        assert_eq!((third & IDENTITY_MASK, third >> IDENTITY_BITS), (other, 3));
        let last = (u64::MAX >> 2) & !IDENTITY_MASK;
        assert_eq!(next_generation(ready(last | key), key), key, "wraps to generation 0");
        assert_eq!(tag_of(ready(first)), first);
    }
}
