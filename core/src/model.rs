//! The model table: one slot per model id, holding the load signal of each variant (SPEC §6).

use crate::key::{KeyBytes, MODEL_KEY_MAX, Variant};
use crate::metrics::Counters;
use crate::price::Price;
use crate::refs::Refs;
use crate::shed::LoadPermille;
use crate::sync::{AtomicU64, Ordering};
use crate::table::{Keyed, Slot};

/// One model: its id bytes and, per variant, the load signal.
#[derive(Debug)]
pub struct ModelSlot {
    id: AtomicU64,
    pub(crate) key: KeyBytes<{ MODEL_KEY_MAX / 8 }>,
    /// Load set by the gateway from backend metrics, ‰ of capacity.
    pub(crate) reported: [AtomicU64; 2],
    /// Permits outstanding, counted only while `capacity` is set.
    pub(crate) in_flight: [AtomicU64; 2],
    /// In-flight requests the variant serves at full load; 0 leaves load to the gateway.
    pub(crate) capacity: [AtomicU64; 2],
    /// Prices per variant: uncached prompt, cached prompt, generated (µ$ per million tokens).
    pub(crate) price: [[AtomicU64; 3]; 2],
    /// Scopes and operator calls using the model: while any is held it is never reclaimed.
    pub(crate) refs: Refs,
    /// What its requests met (SPEC §12); restarted when the slot takes another model.
    pub(crate) counters: Counters,
}

impl Default for ModelSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelSlot {
    /// An empty slot.
    pub fn new() -> Self {
        ModelSlot {
            id: AtomicU64::new(0),
            key: KeyBytes::new(),
            reported: core::array::from_fn(|_| AtomicU64::new(0)),
            in_flight: core::array::from_fn(|_| AtomicU64::new(0)),
            capacity: core::array::from_fn(|_| AtomicU64::new(0)),
            price: core::array::from_fn(|_| core::array::from_fn(|_| AtomicU64::new(0))),
            refs: Refs::new(),
            counters: Counters::new(),
        }
    }

    /// Empties the slot (restore, which has the engine to itself).
    pub(crate) fn clear(&self) {
        self.refs.clear();
        self.id.store(0, Ordering::Relaxed);
        self.init(&[]);
    }

    pub(crate) fn init(&self, key: &[u8]) {
        self.key.store(key);
        for a in self
            .reported
            .iter()
            .chain(&self.in_flight)
            .chain(&self.capacity)
            .chain(self.price.iter().flatten())
        {
            a.store(0, Ordering::Relaxed);
        }
        self.counters.clear();
    }

    /// Whether the model holds nothing worth keeping: no load, capacity or prices (SPEC §1).
    pub(crate) fn holds_nothing(&self) -> bool {
        let cells = self.reported.iter().chain(&self.in_flight).chain(&self.capacity);
        cells.chain(self.price.iter().flatten()).all(|a| a.load(Ordering::Acquire) == 0)
    }

    /// The variant's load: the larger of the reported value and in-flight / capacity.
    pub(crate) fn load(&self, variant: Variant) -> LoadPermille {
        let v = variant.index();
        let reported = self.reported.get(v).map_or(0, |a| a.load(Ordering::Relaxed));
        let capacity = self.capacity.get(v).map_or(0, |a| a.load(Ordering::Relaxed));
        let tracked = match capacity {
            0 => 0,
            c => self.in_flight.get(v).map_or(0, |a| a.load(Ordering::Relaxed)).saturating_mul(1000) / c,
        };
        u32::try_from(reported.max(tracked)).unwrap_or(u32::MAX)
    }

    pub(crate) fn report(&self, variant: Variant, load: LoadPermille) {
        if let Some(a) = self.reported.get(variant.index()) {
            a.store(u64::from(load), Ordering::Relaxed);
        }
    }

    pub(crate) fn price(&self, variant: Variant) -> Price {
        let [u, c, g] = self
            .price
            .get(variant.index())
            .map_or([0; 3], |p| p.each_ref().map(|a| a.load(Ordering::Relaxed)));
        Price { uncached_prompt: u, cached_prompt: c, generated: g }
    }

    pub(crate) fn set_price(&self, variant: Variant, price: Price) {
        if let Some(p) = self.price.get(variant.index()) {
            let values = [price.uncached_prompt, price.cached_prompt, price.generated];
            p.iter().zip(values).for_each(|(a, v)| a.store(v, Ordering::Relaxed));
        }
    }

    pub(crate) fn set_capacity(&self, variant: Variant, in_flight_capacity: u32) {
        if let Some(a) = self.capacity.get(variant.index()) {
            a.store(u64::from(in_flight_capacity), Ordering::Relaxed);
        }
    }

    /// Counts a new permit if the variant tracks in-flight load; says whether it did.
    pub(crate) fn enter(&self, variant: Variant) -> bool {
        let v = variant.index();
        let tracked = self.capacity.get(v).is_some_and(|a| a.load(Ordering::Relaxed) != 0);
        if tracked {
            if let Some(a) = self.in_flight.get(v) {
                a.fetch_add(1, Ordering::Relaxed);
            }
        }
        tracked
    }

    pub(crate) fn leave(&self, variant: Variant) {
        if let Some(a) = self.in_flight.get(variant.index()) {
            // Never below zero, even if capacity was switched off and on again meanwhile.
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
}

impl Slot for ModelSlot {
    fn id(&self) -> &AtomicU64 {
        &self.id
    }
}

impl Keyed for ModelSlot {
    fn key_equals(&self, key: &[u8]) -> bool {
        self.key.equals(key)
    }

    fn refs(&self) -> &Refs {
        &self.refs
    }

    fn holds_nothing(&self) -> bool {
        ModelSlot::holds_nothing(self)
    }
}
