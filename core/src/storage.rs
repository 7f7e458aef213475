//! Where an engine's tables live: memory the caller hands in (no `std`), or the heap.

use crate::account::AccountSlot;
use crate::error::{Error, SnapshotError, Table};
use crate::model::ModelSlot;
use crate::permit::PermitSlot;
use crate::scope::{MAX_ACCOUNTS, MAX_MODELS, MAX_PERMITS, ScopeAdaptation, ScopeSlot};

/// How many of each thing an engine can hold. Fixed at construction; nothing grows later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Capacity {
    /// Scopes (account, model, variant). Keep about 25% spare: keys live near their home slot.
    pub scopes: usize,
    /// Accounts (at most 2^24).
    pub accounts: usize,
    /// Models (at most 4096).
    pub models: usize,
    /// Permits outstanding at once (at most 2^23 − 1). A permit takes the first free entry of a
    /// 64-entry window, so keep a third spare: a ledger more than ~90% full can refuse.
    pub permits: usize,
}

impl Capacity {
    /// Room for `scopes` scopes, as many accounts, a quarter as many models (at least 256, at
    /// most 4096) and as many outstanding permits (at least 1024).
    ///
    /// Made-up model names are reclaimed a tick or two after their last use, and models an
    /// operator configured (prices, capacity, load) or that have scopes are never reclaimed; so
    /// a flood of names can delay only models new to the engine, and only while it lasts.
    pub const fn scopes(scopes: usize) -> Self {
        let accounts = if scopes < MAX_ACCOUNTS { scopes } else { MAX_ACCOUNTS };
        let permits = if scopes < 1024 {
            1024
        } else if scopes > MAX_PERMITS {
            MAX_PERMITS
        } else {
            scopes
        };
        let models = if scopes / 4 < 256 {
            256
        } else if scopes / 4 > MAX_MODELS {
            MAX_MODELS
        } else {
            scopes / 4
        };
        Capacity { scopes, accounts, models, permits }
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        let bad = |n: usize, max: usize, t: Table| {
            if n == 0 || n > max { Err(Error::BadCapacity(t)) } else { Ok(()) }
        };
        bad(self.scopes, u32::MAX as usize, Table::Scopes)?;
        bad(self.accounts, MAX_ACCOUNTS, Table::Accounts)?;
        bad(self.models, MAX_MODELS, Table::Models)?;
        bad(self.permits, MAX_PERMITS, Table::Permits)
    }
}

/// The tables of an engine, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Tables<'a> {
    pub(crate) scopes: &'a [ScopeSlot],
    pub(crate) adaptation: &'a [ScopeAdaptation],
    pub(crate) accounts: &'a [AccountSlot],
    pub(crate) models: &'a [ModelSlot],
    pub(crate) permits: &'a [PermitSlot],
}

impl Tables<'_> {
    /// The capacity these tables give.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            scopes: self.scopes.len(),
            accounts: self.accounts.len(),
            models: self.models.len(),
            permits: self.permits.len(),
        }
    }
}

/// The hash seed and permit incarnation of an engine's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Seeds the key hashes.
    pub seed: u64,
    /// Stamped on every permit: permits of other tables (or of the state before a restore)
    /// are stale.
    pub incarnation: u32,
}

impl Identity {
    /// Tables made with `seed`: the incarnation is mixed from it.
    pub fn from_seed(seed: u64) -> Self {
        // Another mixing operator only mixes worse: an equivalent mutant (.cargo/mutants.toml).
        let mixed = crate::locate::scope_hash(seed, 0x1ca2_7a71_0000_0001);
        Identity { seed, incarnation: (mixed ^ (mixed >> 32)) as u32 | 1 }
    }

    /// Tables of this process only: engines made with one seed still refuse each other's permits.
    pub(crate) fn local(seed: u64) -> Self {
        static ENGINES: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
        let n = ENGINES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        let incarnation = Self::from_seed(seed ^ u64::from(n)).incarnation;
        Identity { seed, incarnation }
    }
}

/// A hash seed from the operating system's randomness, different in every process (an attacker
/// who cannot guess it cannot aim keys at one neighbourhood of the tables).
#[cfg(feature = "std")]
pub fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::hash::RandomState::new().hash_one(0x5eed_u64)
}

/// Anything that holds an engine's tables.
pub trait Storage {
    /// The tables.
    fn tables(&self) -> Tables<'_>;

    /// The seed and incarnation the tables were made with, when they are shared with other
    /// processes (which must use the same); `None` lets the engine pick its own.
    fn identity(&self) -> Option<Identity> {
        None
    }

    /// A restore is about to replace the tables: shared storage refuses while other processes
    /// use it, and marks itself as being replaced.
    fn begin_restore(&mut self) -> Result<(), SnapshotError> {
        Ok(())
    }

    /// The restore is done; these are the tables' seed and incarnation from now on.
    fn end_restore(&mut self, _identity: Identity) {}
}

/// Memory the caller owns, e.g. `static` arrays on a target without a heap.
///
/// ```
/// use sluicegate_core::{AccountSlot, Borrowed, Engine, ModelSlot, PermitSlot, Policy, ScopeAdaptation, ScopeSlot};
/// let mut scopes: [ScopeSlot; 8] = core::array::from_fn(|_| ScopeSlot::new());
/// let mut adaptation: [ScopeAdaptation; 8] = core::array::from_fn(|_| ScopeAdaptation::new());
/// let mut accounts: [AccountSlot; 4] = core::array::from_fn(|_| AccountSlot::new());
/// let mut models: [ModelSlot; 2] = core::array::from_fn(|_| ModelSlot::new());
/// let mut permits: [PermitSlot; 16] = core::array::from_fn(|_| PermitSlot::new());
/// let memory = Borrowed::new(&mut scopes, &mut adaptation, &mut accounts, &mut models, &mut permits).unwrap();
/// let engine = Engine::with_storage(Policy::fixed(), memory, 0x5eed).unwrap();
/// assert_eq!(engine.capacity().scopes, 8);
/// ```
#[derive(Debug)]
pub struct Borrowed<'a>(Tables<'a>);

impl<'a> Borrowed<'a> {
    /// Takes the slots (resetting them) for one engine. `adaptation` must be as long as `scopes`.
    pub fn new(
        scopes: &'a mut [ScopeSlot],
        adaptation: &'a mut [ScopeAdaptation],
        accounts: &'a mut [AccountSlot],
        models: &'a mut [ModelSlot],
        permits: &'a mut [PermitSlot],
    ) -> Result<Self, Error> {
        if adaptation.len() != scopes.len() {
            return Err(Error::BadCapacity(Table::Scopes));
        }
        scopes.iter_mut().for_each(|s| *s = ScopeSlot::new());
        adaptation.iter_mut().for_each(|s| *s = ScopeAdaptation::new());
        accounts.iter_mut().for_each(|s| *s = AccountSlot::new());
        models.iter_mut().for_each(|s| *s = ModelSlot::new());
        permits.iter_mut().for_each(|s| *s = PermitSlot::new());
        let tables = Tables { scopes, adaptation, accounts, models, permits };
        tables.capacity().check()?;
        Ok(Borrowed(tables))
    }
}

impl Storage for Borrowed<'_> {
    fn tables(&self) -> Tables<'_> {
        self.0
    }
}

/// Tables allocated once, at construction, on the heap.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct Heap {
    scopes: alloc::boxed::Box<[ScopeSlot]>,
    adaptation: alloc::boxed::Box<[ScopeAdaptation]>,
    accounts: alloc::boxed::Box<[AccountSlot]>,
    models: alloc::boxed::Box<[ModelSlot]>,
    permits: alloc::boxed::Box<[PermitSlot]>,
}

#[cfg(feature = "std")]
impl Heap {
    /// Allocates tables of `capacity`.
    pub fn new(capacity: Capacity) -> Result<Self, Error> {
        capacity.check()?;
        // Fallible allocation: a capacity the machine cannot hold is an error, not an abort.
        fn filled<T>(n: usize, f: fn() -> T, table: Table) -> Result<alloc::boxed::Box<[T]>, Error> {
            let mut v = alloc::vec::Vec::new();
            v.try_reserve_exact(n).map_err(|_| Error::BadCapacity(table))?;
            v.extend((0..n).map(|_| f()));
            Ok(v.into_boxed_slice())
        }
        Ok(Heap {
            scopes: filled(capacity.scopes, ScopeSlot::new, Table::Scopes)?,
            adaptation: filled(capacity.scopes, ScopeAdaptation::new, Table::Scopes)?,
            accounts: filled(capacity.accounts, AccountSlot::new, Table::Accounts)?,
            models: filled(capacity.models, ModelSlot::new, Table::Models)?,
            permits: filled(capacity.permits, PermitSlot::new, Table::Permits)?,
        })
    }
}

#[cfg(feature = "std")]
impl Storage for Heap {
    fn tables(&self) -> Tables<'_> {
        Tables {
            scopes: &self.scopes,
            adaptation: &self.adaptation,
            accounts: &self.accounts,
            models: &self.models,
            permits: &self.permits,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::Capacity;
    use crate::scope::{MAX_ACCOUNTS, MAX_MODELS, MAX_PERMITS};

    /// What `Capacity::scopes` documents, on each side of every bound.
    #[test]
    fn capacity_for_scopes_keeps_each_table_within_its_bounds() {
        let shape = |scopes| {
            let c = Capacity::scopes(scopes);
            assert_eq!(c.scopes, scopes);
            (c.accounts, c.permits, c.models)
        };
        assert_eq!(shape(16), (16, 1024, 256), "small: the floors");
        assert_eq!(shape(100), (100, 1024, 256));
        assert_eq!(shape(2_000), (2_000, 2_000, 500), "between: as many, a quarter as many models");
        assert_eq!(shape(5_000), (5_000, 5_000, 1_250));
        assert_eq!(shape(4 * MAX_MODELS + 4), (4 * MAX_MODELS + 4, 4 * MAX_MODELS + 4, MAX_MODELS));
        assert_eq!(shape(MAX_PERMITS + 1), (MAX_PERMITS + 1, MAX_PERMITS, MAX_MODELS));
        assert_eq!(shape(MAX_ACCOUNTS + 1), (MAX_ACCOUNTS, MAX_PERMITS, MAX_MODELS));
    }
}
