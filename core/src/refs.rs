//! What keeps an account or model slot from being reclaimed (SPEC §1, hostile keys): the scopes
//! that name it, and any operator call working on it, each hold a reference. A slot nobody
//! references, whose state is a new key's, may be taken for another key.

use crate::sync::{AtomicU64, Ordering};

/// Set while a reclaimer decides whether to take the slot: new references back off.
const RETIRING: u64 = 1 << 63;

/// A reference count with a "being reclaimed" flag, and a hint to one scope that holds it.
#[derive(Debug)]
pub(crate) struct Refs {
    count: AtomicU64,
    /// The scope slot (index + 1) created last for this key; 0 for none. When the table is
    /// full, a key held only by that idle scope can be freed with it.
    scope_hint: AtomicU64,
}

impl Refs {
    pub(crate) fn new() -> Self {
        Refs { count: AtomicU64::new(0), scope_hint: AtomicU64::new(0) }
    }

    /// Takes a reference; false if the slot is being reclaimed (then look the key up again).
    /// The caller must then check that the slot still holds its key.
    pub(crate) fn pin(&self) -> bool {
        if self.count.fetch_add(1, Ordering::SeqCst) & RETIRING == 0 {
            return true;
        }
        self.unpin();
        false
    }

    /// Drops a reference taken with [`Refs::pin`].
    pub(crate) fn unpin(&self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }

    /// How many references are held.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst) & !RETIRING
    }

    /// Starts reclaiming: succeeds only while nobody holds a reference, and keeps new ones out
    /// until [`Refs::end_retire`].
    pub(crate) fn begin_retire(&self) -> bool {
        self.count.compare_exchange(0, RETIRING, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// Ends reclaiming, whether or not the slot was taken (a pin that raced it backs out by
    /// itself, or finds the slot holding another key).
    pub(crate) fn end_retire(&self) {
        self.count.fetch_and(!RETIRING, Ordering::SeqCst);
    }

    pub(crate) fn set_scope_hint(&self, scope: usize) {
        self.scope_hint.store(scope as u64 + 1, Ordering::Relaxed);
    }

    pub(crate) fn scope_hint(&self) -> Option<usize> {
        usize::try_from(self.scope_hint.load(Ordering::Relaxed)).ok()?.checked_sub(1)
    }

    /// Sets the count (a repair, which has the tables to itself), clearing a reclaimer's flag.
    pub(crate) fn reset(&self, count: u64) {
        self.count.store(count, Ordering::SeqCst);
    }

    /// Forgets everything (restore, which has the engine to itself).
    pub(crate) fn clear(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.scope_hint.store(0, Ordering::Relaxed);
    }
}
