//! Each scope's lease on this replica, kept per slot of the local engine's scope table: units
//! per metric taken on the hot path with one compare-exchange, filled and emptied by the lease
//! thread (`crate::replica`).

use std::cell::Cell;
use std::sync::Mutex;

use portable_atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU128, Ordering};
use sluicegate_core::lease::{Grant, Lease, LeasedScope};
use sluicegate_core::{Band, Levels, Metric, PerMetric, RateLimited, ScopeKey, Variant};

use crate::functions::LeaseAnswer;

const ACCOUNT_MAX: usize = sluicegate_core::key::ACCOUNT_KEY_MAX;
const MODEL_MAX: usize = sluicegate_core::key::MODEL_KEY_MAX;
const KEY_WORDS: usize = (ACCOUNT_MAX + MODEL_MAX) / 8;

/// A slot's owner word: the scope id in the low half, its state in the high half.
const FREE: u128 = 0;
const WRITING: u128 = 1;
const READY: u128 = 2;
const EVICTING: u128 = 3;

fn owner(id: u64, state: u128) -> u128 {
    (state << 64) | u128::from(id)
}

/// A lease's units left, four 32-bit counts in one word.
fn unpack(w: u128) -> [u64; 4] {
    [0, 1, 2, 3].map(|m| ((w >> (32 * m)) & u128::from(u32::MAX)) as u64)
}

fn pack(units: [u64; 4]) -> u128 {
    units.iter().enumerate().fold(0, |w, (m, u)| w | (u128::from((*u).min(u64::from(u32::MAX))) << (32 * m)))
}

thread_local! {
    /// The scope this thread was last refused for because it had no lease yet: the replica
    /// fetches one at once instead of answering 429 to a scope's first request.
    static COLD: Cell<Option<LeasedScope>> = const { Cell::new(None) };
}

/// Takes the scope this thread was last refused for for want of any lease.
pub(crate) fn take_cold() -> Option<LeasedScope> {
    COLD.with(Cell::take)
}

/// One scope's lease.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    owner: AtomicU128,
    /// Units left per metric.
    left: AtomicU128,
    /// Which metrics the lease limits (bit per metric); the others are not limited globally.
    limited: AtomicU64,
    /// Units owed to Redis per metric: positive charges, negative gives back.
    delta: [AtomicI64; 4],
    /// Units ever put into the lease and taken out of it other than by requests, per metric:
    /// with what is left they tell the lease thread what requests took, so the hot path counts
    /// nothing.
    supplied: [AtomicU64; 4],
    removed: [AtomicU64; 4],
    /// The largest request refused since the lease thread last looked, per metric.
    need: [AtomicU64; 4],
    /// The global buckets at the last answer: debt µs and interval ns per unit, per metric, and when.
    debt_us: [AtomicU64; 4],
    interval_ns: [AtomicU64; 4],
    answered_ns: AtomicU64,
    /// The lease can be used until this time (caller's clock, ns).
    expires_ns: AtomicU64,
    /// What was granted runs over its limit.
    over: AtomicBool,
    /// The engine gave this slot to another scope while it held a lease: the lease thread
    /// gives the old lease back, then frees the slot.
    evict: AtomicBool,
    /// Which lease of this replica the slot holds: a new one each time a scope claims it.
    epoch: AtomicU64,
    /// The lease's side of the exactly-once protocol with Redis, held across each call.
    caller: Mutex<Caller>,
    /// Account bytes, then model bytes, in words; `shape` holds their lengths and the variant.
    key: [AtomicU64; KEY_WORDS],
    shape: AtomicU64,
}

/// One lease's running sums with Redis (`lua/sluicegate.lua`): a call that timed out is made
/// good by the next one, and nothing counts twice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The lease this is for.
    pub(crate) epoch: u64,
    /// Calls made.
    pub(crate) seq: u64,
    /// Corrections sent, summed.
    pub(crate) sent: [i64; 4],
    /// Units received in answers, summed.
    pub(crate) received: [u64; 4],
    /// Redis has answered a call of this caller.
    pub(crate) answered: bool,
    /// Times Redis forgot this lease's sums (its name changes with each).
    pub(crate) renamed: u64,
}

impl Caller {
    /// Starts again under a new name after Redis forgot the sums: only `delta`, the corrections
    /// of the call Redis refused, is owed. Corrections of calls that timed out since the last
    /// answer may have been applied before the sums were forgotten; they are not sent again,
    /// so a give-back is never applied twice.
    pub(crate) fn rename(&mut self, delta: [i64; 4]) {
        *self = Caller { epoch: self.epoch, sent: delta, renamed: self.renamed + 1, ..Caller::default() };
    }
}

/// A slot's key, as the lease thread reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OwnedKey {
    pub(crate) account: Vec<u8>,
    pub(crate) model: Vec<u8>,
    pub(crate) variant: Variant,
}

impl Slot {
    fn write_key(&self, key: ScopeKey<'_>) {
        let mut bytes = [0u8; ACCOUNT_MAX + MODEL_MAX];
        bytes.iter_mut().zip(key.account.iter().chain(key.model)).for_each(|(d, s)| *d = *s);
        for (word, chunk) in self.key.iter().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            word.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        let variant = u64::from(key.variant == Variant::Fast);
        let shape = key.account.len() as u64 | (key.model.len() as u64) << 16 | variant << 32;
        self.shape.store(shape, Ordering::Relaxed);
    }

    /// The slot's key, as `write_key` wrote it.
    pub(crate) fn key(&self) -> OwnedKey {
        let mut bytes = Vec::with_capacity(ACCOUNT_MAX + MODEL_MAX);
        self.key.iter().for_each(|w| bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes()));
        let shape = self.shape.load(Ordering::Relaxed);
        let account_len = (shape & 0xffff) as usize;
        let model_len = ((shape >> 16) & 0xffff) as usize;
        let model = bytes.get(account_len..account_len + model_len).unwrap_or_default().to_vec();
        bytes.truncate(account_len);
        let variant = if shape >> 32 & 1 == 1 { Variant::Fast } else { Variant::Regular };
        OwnedKey { account: bytes, model, variant }
    }

    /// The scope id this slot's lease is for, once its key is written.
    pub(crate) fn ready_id(&self) -> Option<u64> {
        let o = self.owner.load(Ordering::Acquire);
        (o >> 64 == READY).then_some(o as u64)
    }

    /// The slot's lease's caller state, held for the duration of one call; a new lease starts
    /// its sums afresh.
    pub(crate) fn caller(&self) -> std::sync::MutexGuard<'_, Caller> {
        let mut caller = self.caller.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let epoch = self.epoch.load(Ordering::Acquire);
        if caller.epoch != epoch {
            *caller = Caller { epoch, ..Caller::default() };
        }
        caller
    }

    /// Takes the largest request refused since last asked, per metric.
    pub(crate) fn drain_need(&self) -> [u64; 4] {
        self.need.each_ref().map(|n| n.swap(0, Ordering::AcqRel))
    }

    /// Units requests have taken from the lease since it started, per metric: what was put in,
    /// less what was taken back out and what is left. Read while another thread changes the
    /// lease it may lag by that change, never run ahead (additions are counted after they land,
    /// removals before; this reads in the order that keeps it so), and the next read catches up.
    pub(crate) fn taken_ever(&self) -> [u64; 4] {
        let supplied = self.supplied.each_ref().map(|s| s.load(Ordering::Acquire));
        let left = self.left();
        let removed = self.removed.each_ref().map(|r| r.load(Ordering::Acquire));
        std::array::from_fn(|m| supplied[m].saturating_sub(removed[m]).saturating_sub(left[m]))
    }

    fn record(counters: &[AtomicU64; 4], units: [u64; 4]) {
        counters.iter().zip(units).for_each(|(c, u)| {
            c.fetch_add(u, Ordering::AcqRel);
        });
    }

    fn unrecord(counters: &[AtomicU64; 4], units: [u64; 4]) {
        counters.iter().zip(units).for_each(|(c, u)| {
            c.fetch_sub(u, Ordering::AcqRel);
        });
    }

    /// Takes the corrections owed to Redis.
    pub(crate) fn drain_delta(&self) -> [i64; 4] {
        self.delta.each_ref().map(|d| d.swap(0, Ordering::AcqRel))
    }

    /// Owes Redis more corrections (units of an expired lease, given back once it answers).
    pub(crate) fn add_delta(&self, delta: [i64; 4]) {
        self.delta.iter().zip(delta).for_each(|(d, v)| {
            d.fetch_add(v, Ordering::AcqRel);
        });
    }

    /// Takes every unit left (the lease expired, or its scope went idle or moved).
    pub(crate) fn drain_left(&self) -> [u64; 4] {
        self.trim([0; 4])
    }

    pub(crate) fn left(&self) -> [u64; 4] {
        unpack(self.left.load(Ordering::Acquire))
    }

    /// Takes units beyond `keep` per metric back out of the lease.
    pub(crate) fn trim(&self, keep: [u64; 4]) -> [u64; 4] {
        let mut w = self.left.load(Ordering::Acquire);
        loop {
            let left = unpack(w);
            let kept: [u64; 4] = std::array::from_fn(|m| left[m].min(keep[m]));
            let trimmed = std::array::from_fn(|m| left[m] - kept[m]);
            // Counted before it lands, so `taken_ever` never runs ahead.
            Self::record(&self.removed, trimmed);
            match self.left.compare_exchange(w, pack(kept), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return trimmed,
                Err(cur) => {
                    Self::unrecord(&self.removed, trimmed);
                    w = cur;
                }
            }
        }
    }

    /// Adds granted units and records the global buckets the answer saw.
    pub(crate) fn fill(&self, answer: &LeaseAnswer, now_ns: u64, expires_ns: u64) {
        let mut limited = 0;
        for (m, g) in answer.metrics.iter().enumerate() {
            self.debt_us[m].store(g.debt_us, Ordering::Relaxed);
            self.interval_ns[m].store(g.interval_ns, Ordering::Relaxed);
            if g.interval_ns > 0 {
                limited |= 1 << m;
            }
        }
        self.add(answer.metrics.map(|g| g.grant));
        self.limited.store(limited, Ordering::Relaxed);
        self.over.store(answer.over, Ordering::Relaxed);
        self.answered_ns.store(now_ns, Ordering::Relaxed);
        self.expires_ns.store(expires_ns, Ordering::Release);
    }

    /// Adds units to the lease (an answer's grant, or an outage share).
    pub(crate) fn add(&self, units: [u64; 4]) {
        let mut w = self.left.load(Ordering::Acquire);
        loop {
            let left = unpack(w);
            let sum = pack(std::array::from_fn(|m| left[m].saturating_add(units[m])));
            match self.left.compare_exchange(w, sum, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // Counted after it landed, so `taken_ever` never runs ahead.
                    let after = unpack(sum);
                    Self::record(&self.supplied, std::array::from_fn(|m| after[m] - left[m]));
                    return;
                }
                Err(cur) => w = cur,
            }
        }
    }

    /// Adds an outage share: units Redis did not grant, of the metrics `limited` limits, usable
    /// until `expires_ns`.
    pub(crate) fn share(&self, units: [u64; 4], limited: u64, expires_ns: u64) {
        self.limited.store(limited, Ordering::Relaxed);
        self.add(units);
        self.expires_ns.store(expires_ns, Ordering::Release);
    }

    /// Whether Redis ever answered for this slot's lease.
    pub(crate) fn answered(&self) -> bool {
        self.answered_ns.load(Ordering::Relaxed) != 0
    }

    /// Which metrics are limited, and their global levels (ns per unit) at the last answer.
    pub(crate) fn levels(&self) -> (u64, [u64; 4]) {
        (self.limited.load(Ordering::Relaxed), self.interval_ns.each_ref().map(|i| i.load(Ordering::Relaxed)))
    }

    pub(crate) fn expires_ns(&self) -> u64 {
        self.expires_ns.load(Ordering::Acquire)
    }

    pub(crate) fn evicting(&self) -> bool {
        self.evict.load(Ordering::Acquire)
    }

    /// Starts giving back the lease of scope `id` for another key: no request adopts it from
    /// now on. False if one did meanwhile (the engine brought the key back into the slot).
    pub(crate) fn begin_eviction(&self, id: u64) -> bool {
        let won = self
            .owner
            .compare_exchange(owner(id, READY), owner(id, EVICTING), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !won {
            self.evict.store(false, Ordering::Release);
        }
        won
    }

    /// The give-back failed: the slot keeps its lease, still to be evicted.
    pub(crate) fn abort_eviction(&self, id: u64) {
        self.owner.store(owner(id, READY), Ordering::Release);
    }

    /// Whether the slot's key is `key`.
    fn key_equals(&self, key: ScopeKey<'_>) -> bool {
        let shape = self.shape.load(Ordering::Relaxed);
        let variant = u64::from(key.variant == Variant::Fast);
        if shape != key.account.len() as u64 | (key.model.len() as u64) << 16 | variant << 32 {
            return false;
        }
        let mut bytes = key.account.iter().chain(key.model);
        self.key.iter().all(|w| {
            let stored = w.load(Ordering::Relaxed).to_le_bytes();
            stored.iter().all(|b| *b == bytes.next().copied().unwrap_or(0))
        })
    }

    /// Frees the slot for the next scope; the caller gave back what it held.
    pub(crate) fn free(&self) {
        self.left.store(0, Ordering::Release);
        self.supplied.iter().chain(&self.removed).for_each(|c| c.store(0, Ordering::Release));
        self.answered_ns.store(0, Ordering::Relaxed);
        self.limited.store(0, Ordering::Relaxed);
        self.expires_ns.store(0, Ordering::Release);
        self.evict.store(false, Ordering::Release);
        self.owner.store(FREE, Ordering::Release);
    }

    /// The headers' view: the global buckets at the last answer, drained since.
    fn header_levels(&self, now_ns: u64) -> Levels {
        let elapsed_us = now_ns.saturating_sub(self.answered_ns.load(Ordering::Relaxed)) / 1_000;
        let debt = self.debt_us.each_ref().map(|d| d.load(Ordering::Relaxed).saturating_sub(elapsed_us));
        let interval = self
            .interval_ns
            .each_ref()
            .map(|i| ((u128::from(i.load(Ordering::Relaxed)) << 32) / 1_000) as u64);
        Levels::from_raw(debt, interval)
    }
}

/// The leases of every scope slot of a replica's engine.
#[derive(Debug)]
pub(crate) struct Leases {
    slots: Box<[Slot]>,
    /// µs of use a global bucket holds at all (window × hard factor).
    hard_us: u64,
    /// A refusal's shortest `retry_after`: about when the lease thread brings more.
    retry_floor_ns: u64,
    /// Leases started: each slot claim takes the next number.
    epochs: AtomicU64,
}

impl Leases {
    pub(crate) fn new(scopes: usize, hard_us: u64, retry_floor_ns: u64) -> Self {
        let slots = (0..scopes).map(|_| Slot::default()).collect();
        Leases { slots, hard_us, retry_floor_ns, epochs: AtomicU64::new(0) }
    }

    /// Units held in leases, per metric, over every slot.
    pub(crate) fn held(&self) -> [u64; 4] {
        self.slots.iter().fold([0; 4], |sum, s| {
            let left = s.left();
            std::array::from_fn(|m| sum[m].saturating_add(left[m]))
        })
    }

    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub(crate) fn slot(&self, index: usize) -> Option<&Slot> {
        self.slots.get(index)
    }

    fn refuse(
        &self,
        slot: Option<&Slot>,
        cost: PerMetric<u64>,
        short: Metric,
        now_ns: u64,
    ) -> (Grant, Levels) {
        let levels = slot.map_or_else(Levels::default, |s| s.header_levels(now_ns));
        let (debt, interval) = levels.to_raw();
        let m = short as usize;
        let cost_us = (u128::from(cost.0[m]) * u128::from(interval[m])) >> 32;
        let too_large = interval[m] != 0 && cost_us > u128::from(self.hard_us);
        let wait_us = (u128::from(debt[m]) + cost_us).saturating_sub(u128::from(self.hard_us));
        let retry_after_ns = u64::try_from(wait_us * 1_000).unwrap_or(u64::MAX).max(self.retry_floor_ns);
        (Grant::Refused(RateLimited { metric: short, retry_after_ns, too_large }), levels)
    }

    fn cold(&self, scope: LeasedScope, cost: PerMetric<u64>, now_ns: u64) -> (Grant, Levels) {
        COLD.with(|c| c.set(Some(scope)));
        self.refuse(None, cost, Metric::Requests, now_ns)
    }
}

impl Lease for Leases {
    fn take(
        &self,
        scope: LeasedScope,
        key: ScopeKey<'_>,
        cost: PerMetric<u64>,
        now_ns: u64,
    ) -> (Grant, Levels) {
        let Some(slot) = self.slots.get(scope.slot) else {
            return self.refuse(None, cost, Metric::Requests, now_ns);
        };
        let o = slot.owner.load(Ordering::Acquire);
        if o != owner(scope.id, READY) {
            if o == FREE
                && slot
                    .owner
                    .compare_exchange(FREE, owner(scope.id, WRITING), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                slot.write_key(key);
                slot.epoch.store(self.epochs.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Release);
                slot.owner.store(owner(scope.id, READY), Ordering::Release);
                return self.cold(scope, cost, now_ns);
            }
            // The engine forgot an idle scope and made it again (a new id) in the same slot: the
            // lease is the key's, so it carries on. Another key's lease is given back first.
            let adopted = o >> 64 == READY
                && !slot.evicting()
                && slot.key_equals(key)
                && slot
                    .owner
                    .compare_exchange(o, owner(scope.id, READY), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            if !adopted {
                if o >> 64 == READY {
                    slot.evict.store(true, Ordering::Release);
                }
                return self.refuse(None, cost, Metric::Requests, now_ns);
            }
        }
        if now_ns >= slot.expires_ns() {
            let short = Metric::Requests;
            slot.need[short as usize].fetch_max(cost.0[short as usize], Ordering::AcqRel);
            return self.refuse(Some(slot), cost, short, now_ns);
        }
        let limited = slot.limited.load(Ordering::Relaxed);
        let charged = cost.0.map(|c| c.min(u64::from(u32::MAX)));
        let mut w = slot.left.load(Ordering::Acquire);
        loop {
            let left = unpack(w);
            let short = (0..4).find(|m| limited >> m & 1 == 1 && (left[*m] < cost.0[*m]));
            if let Some(m) = short {
                slot.need.iter().zip(cost.0).for_each(|(n, c)| {
                    n.fetch_max(c, Ordering::AcqRel);
                });
                return self.refuse(Some(slot), cost, Metric::ALL[m], now_ns);
            }
            let after =
                std::array::from_fn(|m| if limited >> m & 1 == 1 { left[m] - charged[m] } else { left[m] });
            match slot.left.compare_exchange_weak(w, pack(after), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(cur) => w = cur,
            }
        }
        let band = if slot.over.load(Ordering::Relaxed) { Band::OverLimit } else { Band::Normal };
        (Grant::Taken(band), slot.header_levels(now_ns))
    }

    fn adjust(&self, scope: LeasedScope, delta: [i128; 4], _now_ns: u64) {
        let Some(slot) = self.slots.get(scope.slot) else { return };
        if slot.owner.load(Ordering::Acquire) != owner(scope.id, READY) {
            return;
        }
        slot.delta.iter().zip(delta).for_each(|(d, v)| {
            d.fetch_add(
                i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX }),
                Ordering::AcqRel,
            );
        });
    }
}
