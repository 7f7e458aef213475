//! The one place atomics come from, so that `--cfg loom` can swap in loom's model-checked types.
//!
//! Lock-freedom: on x86_64 (`cmpxchg16b`) and aarch64 (`casp`/`ldxp`) every atomic used here is
//! lock-free. On 32-bit targets without 64-bit atomics (e.g. `thumbv7em-none-eabihf`)
//! portable-atomic implements them by disabling interrupts, which is only sound on a single core
//! (`--cfg portable_atomic_unsafe_assume_single_core`) or with its `critical-section` feature.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{Ordering, fence};
#[cfg(not(loom))]
pub(crate) use portable_atomic::{AtomicU64, AtomicU128};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering, fence};

/// Lets another thread run while this one waits on it (loom must be told, to explore it).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(loom))]
    core::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// loom has no 128-bit atomic; a mutex-backed stand-in gives the same sequential semantics
/// (one indivisible load, store or compare-exchange) and lets loom explore every interleaving.
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct AtomicU128(loom::sync::Mutex<u128>);

#[cfg(loom)]
impl AtomicU128 {
    pub(crate) fn new(v: u128) -> Self {
        Self(loom::sync::Mutex::new(v))
    }

    /// The models check the engine's atomics, not a platform's: the stand-in counts as one.
    pub(crate) fn is_lock_free() -> bool {
        true
    }

    fn cell(&self) -> loom::sync::MutexGuard<'_, u128> {
        // A poisoned mutex can only follow a panic inside a model, which already failed it.
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub(crate) fn load(&self, _: Ordering) -> u128 {
        *self.cell()
    }

    pub(crate) fn store(&self, v: u128, _: Ordering) {
        *self.cell() = v;
    }

    pub(crate) fn swap(&self, v: u128, _: Ordering) -> u128 {
        core::mem::replace(&mut *self.cell(), v)
    }

    pub(crate) fn compare_exchange(
        &self,
        current: u128,
        new: u128,
        _: Ordering,
        _: Ordering,
    ) -> Result<u128, u128> {
        let mut g = self.cell();
        if *g == current {
            *g = new;
            Ok(current)
        } else {
            Err(*g)
        }
    }
}
