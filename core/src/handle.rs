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
        if let Some(at) = scope.located(engine) {
            if let Attempt::Decided(d) = self.admit_at(at, costs, request.priority, now_ns)? {
                return Ok(d);
            }
        }
        self.admit_key(scope.key(), costs, request.priority, now_ns, |at| scope.remember(engine, at))
    }

    /// What a handle records of the engine it was resolved in: a restore changes it.
    fn handle_identity(&self) -> u64 {
        self.seed ^ u64::from(self.incarnation)
    }
}
