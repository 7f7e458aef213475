//! Resolved scopes: a gateway resolves an API key's scope once, caches the handle, and admits
//! through it without the account, model and scope lookups of a keyed call.

use crate::decision::Decision;
use crate::engine::{Attempt, Engine, Located};
use crate::error::{Error, Table};
use crate::key::{ACCOUNT_KEY_MAX, MODEL_KEY_MAX, ScopeKey, Variant};
use crate::request::Request;
use crate::storage::Storage;
use crate::sync::{AtomicU64, Ordering};

/// A scope resolved by [`Engine::scope`]: admissions through [`Engine::admit_scope`] skip the
/// three keyed lookups of [`Engine::admit`] and check, with one load, that the scope still lives
/// where it was found.
///
/// A handle is `Sync`: cache one per API key and share it between threads. It stays correct for
/// the engine's whole life. An idle scope may be reclaimed for another key, and a restore moves
/// every scope: the next admission through the handle then looks its key up again and
/// remembers where the scope now lives. A handle used with another engine is looked up by key
/// there, so it never charges a scope of that engine's other tenants.
///
/// ```
/// use sluicegate_core::{Capacity, Completion, Engine, Outcome, Policy, Request, ScopeKey, Usage};
/// let engine = Engine::new(Policy::fireworks_2024(), Capacity::scopes(1024))?;
/// let scope = engine.scope(ScopeKey::new(b"acct-1", b"llama-v3p1-70b"), 0)?;
/// let decision = engine.admit_scope(&scope, &Request::new(1200).max_tokens(256), 0)?;
/// let Outcome::Admit(permit) = decision.outcome else { panic!("a new scope has full buckets") };
/// engine.settle(&permit, &Usage::new(1200, 180), Completion::Success, 2_000_000_000)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ScopeHandle {
    /// The engine (seed mixed with incarnation) that `slot` and `id` were found in. Written
    /// after them and read before them, so a reader that sees it sees where it was found.
    engine: AtomicU64,
    slot: AtomicU64,
    id: AtomicU64,
    account: [u8; ACCOUNT_KEY_MAX],
    account_len: usize,
    model: [u8; MODEL_KEY_MAX],
    model_len: usize,
    variant: Variant,
}

impl ScopeHandle {
    /// The key this handle resolves.
    pub fn key(&self) -> ScopeKey<'_> {
        let account = self.account.get(..self.account_len).unwrap_or_default();
        let model = self.model.get(..self.model_len).unwrap_or_default();
        ScopeKey { account, model, variant: self.variant }
    }

    /// Where the scope was last found, if in the engine `engine`.
    fn located(&self, engine: u64) -> Option<Located> {
        if self.engine.load(Ordering::Acquire) != engine {
            return None;
        }
        let slot = usize::try_from(self.slot.load(Ordering::Relaxed)).ok()?;
        Some(Located::of_id(slot, self.id.load(Ordering::Relaxed)))
    }

    fn remember(&self, engine: u64, at: Located) {
        self.slot.store(at.slot as u64, Ordering::Relaxed);
        self.id.store(at.id, Ordering::Relaxed);
        self.engine.store(engine, Ordering::Release);
    }
}

impl Clone for ScopeHandle {
    fn clone(&self) -> Self {
        let engine = self.engine.load(Ordering::Acquire);
        ScopeHandle {
            engine: AtomicU64::new(engine),
            slot: AtomicU64::new(self.slot.load(Ordering::Relaxed)),
            id: AtomicU64::new(self.id.load(Ordering::Relaxed)),
            ..*self
        }
    }
}

impl<S: Storage> Engine<S> {
    /// Resolves the scope of `key`, creating it (and its account and model) if new, for
    /// [`Engine::admit_scope`]. Errors as [`Engine::admit`]'s: a bad key, a full table.
    pub fn scope(&self, key: ScopeKey<'_>, now_ns: u64) -> Result<ScopeHandle, Error> {
        let at = self.locate(key, now_ns, true)?.ok_or(Error::TableFull(Table::Scopes))?;
        let mut account = [0; ACCOUNT_KEY_MAX];
        let mut model = [0; MODEL_KEY_MAX];
        // `locate` refused longer keys.
        account.iter_mut().zip(key.account).for_each(|(d, s)| *d = *s);
        model.iter_mut().zip(key.model).for_each(|(d, s)| *d = *s);
        let handle = ScopeHandle {
            engine: AtomicU64::new(0),
            slot: AtomicU64::new(0),
            id: AtomicU64::new(0),
            account,
            account_len: key.account.len(),
            model,
            model_len: key.model.len(),
            variant: key.variant,
        };
        handle.remember(self.handle_identity(), at);
        Ok(handle)
    }

    /// [`Engine::admit`] through a resolved scope: the same decision, without the lookups.
    /// A scope that moved since (reclaimed while idle, or restored elsewhere) is looked up by
    /// key again, and the handle remembers where.
    pub fn admit_scope(
        &self,
        scope: &ScopeHandle,
        request: &Request,
        now_ns: u64,
    ) -> Result<Decision, Error> {
        let costs = match request.costs() {
            Ok(c) => c,
            Err(reason) => return Ok(Decision::invalid(reason)),
        };
        let engine = self.handle_identity();
        let own = self.own_buckets();
        if let Some(at) = scope.located(engine) {
            if let Attempt::Decided(d) = self.admit_at(at, costs, request.service_tier, now_ns, &own)? {
                return Ok(d);
            }
        }
        self.admit_key(scope.key(), costs, request.service_tier, now_ns, |at| scope.remember(engine, at), own)
    }

    /// What a handle records of the engine it was resolved in: a restore changes it.
    fn handle_identity(&self) -> u64 {
        self.seed ^ u64::from(self.incarnation)
    }
}

#[cfg(test)]
mod tests {
    use crate::locate::lookups;
    use crate::{Capacity, Completion, Engine, Heap, Metric, Policy, Request, ScopeKey, Usage};

    const MINUTE: u64 = 60_000_000_000;

    /// The point of a handle: admissions through it look nothing up while its scope stays put,
    /// and one lookup (remembered) after the scope moved.
    #[test]
    fn a_handle_looks_its_key_up_only_when_its_scope_moved() {
        let capacity = Capacity { scopes: 1, accounts: 4, models: 1, permits: 8 };
        let e = Engine::new(Policy::fixed(), capacity).unwrap_or_else(|e| panic!("{e}"));
        let handle = e.scope(ScopeKey::new(b"a", b"m"), 0).unwrap_or_else(|e| panic!("{e}"));
        let admit = |now| {
            let d = e.admit_scope(&handle, &Request::new(0), now).unwrap_or_else(|e| panic!("{e}"));
            let p = d.permit().unwrap_or_else(|| panic!("{d:?}"));
            e.settle(p, &Usage::new(0, 0), Completion::Success, now).unwrap_or_else(|e| panic!("{e}"));
        };
        let before = lookups::made();
        (0..10).for_each(|_| admit(0));
        assert_eq!(lookups::made(), before, "a handle whose scope stays put looks nothing up");
        // "b" takes the only slot once "a" is idle; later "a" takes it back through the handle.
        let b = e.admit(ScopeKey::new(b"b", b"m"), &Request::new(0), 5 * MINUTE);
        let p = *b.unwrap_or_else(|e| panic!("{e}")).permit().unwrap_or_else(|| panic!("b admitted"));
        e.settle(&p, &Usage::new(0, 0), Completion::Success, 5 * MINUTE).unwrap_or_else(|e| panic!("{e}"));
        let before = lookups::made();
        admit(11 * MINUTE);
        assert_eq!(lookups::made(), before + 1, "one lookup finds where the scope moved");
        (0..10).for_each(|_| admit(11 * MINUTE));
        assert_eq!(lookups::made(), before + 1, "and the handle remembers it");
    }

    /// Twin engines (same seed) where keys of one hash (`collide-…`, see `key::collide`) took
    /// the same account slot, so "collide-b"'s scope in the second engine has the very slot and
    /// id that "collide-a"'s has in the first: only the handle's check of its engine keeps a
    /// handle of "collide-a" from charging "collide-b" there.
    #[test]
    fn a_handle_never_charges_the_twin_scope_of_another_engine() {
        let twin = || {
            let heap = Heap::new(Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
            Engine::with_storage(Policy::fixed(), heap, 0x5eed).unwrap_or_else(|e| panic!("{e}"))
        };
        let (first, second) = (twin(), twin());
        let (a, b) = (ScopeKey::new(b"collide-a", b"m"), ScopeKey::new(b"collide-b", b"m"));
        let handle = first.scope(a, 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(second.admit(b, &Request::new(0), 0).is_ok_and(|d| d.admitted()));
        let place = |e: &Engine<Heap>, key| e.locate(key, 0, false).ok().flatten().map(|at| (at.slot, at.id));
        assert_eq!(place(&first, a), place(&second, b), "the twin scope sits where the handle points");
        assert!(second.admit_scope(&handle, &Request::new(0), 0).is_ok_and(|d| d.admitted()));
        let used = |key| second.limits(key, 0).map(|l| l.used(Metric::Requests)).ok();
        assert_eq!((used(a), used(b)), (Some(1), Some(1)), "each charged once, by its own key");
    }
}
