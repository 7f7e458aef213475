//! From a key to its slots: finding a scope's account, model and scope, creating what is missing,
//! and reclaiming slots that hold nothing worth keeping (SPEC §1, hostile keys).
//!
//! Every scope holds a reference on its account and its model, and every operator call holds
//! one while it works. A key nothing references, whose state is a new key's, may be taken for
//! another key; when its table is full, a key held only by one idle scope is freed with it. So
//! a flood of made-up keys is reclaimed once idle, and never evicts a key in use.

use core::cell::Cell;

use crate::account::AccountSlot;
use crate::adapt;
use crate::bucket::{self, QUANTUM_NS, Word};
use crate::engine::{Engine, Located, MODEL_SALT, SCOPE_SALT};
use crate::error::{Error, Table};
use crate::key::{self, ACCOUNT_KEY_MAX, MODEL_KEY_MAX, ScopeKey};
use crate::model::ModelSlot;
use crate::scope;
use crate::storage::Storage;
use crate::sync::{Ordering, spin_hint};
use crate::table::{self, Claim, Keyed, Probe, Slot};

/// A key's slot as found: its index and the id it was published under.
type Found = (usize, u64);

/// Whether slot `found.0` still holds the key it was found under.
fn still<T: Slot>(slots: &[T], found: Found) -> bool {
    slots.get(found.0).is_some_and(|s| s.id().load(Ordering::SeqCst) == found.1)
}

impl<S: Storage> Engine<S> {
    /// Runs `f` on the model's slot (created if new) while holding a reference to it.
    pub(crate) fn with_model<R>(&self, model: &[u8], f: impl FnOnce(&ModelSlot) -> R) -> Result<R, Error> {
        let slots = self.tables().models;
        let init = |s: &ModelSlot| s.init(model);
        let find = || self.key_entry(slots, model, MODEL_KEY_MAX, MODEL_SALT, Some(&init), 0);
        self.with_key(slots, &find, Table::Models, Error::TableFull(Table::Models), |_, s| f(s))
    }

    /// Runs `f` on the account's slot (created if new and `create`) while holding a reference.
    pub(crate) fn with_account<R>(
        &self,
        account: &[u8],
        create: bool,
        f: impl FnOnce(usize, &AccountSlot) -> R,
    ) -> Result<R, Error> {
        let slots = self.tables().accounts;
        let init = |s: &AccountSlot| s.init(account, &self.policy.tiers);
        let init: Option<&dyn Fn(&AccountSlot)> = create.then_some(&init);
        let find = || self.key_entry(slots, account, ACCOUNT_KEY_MAX, 0, init, 0);
        self.with_key(slots, &find, Table::Accounts, Error::UnknownAccount, f)
    }

    /// Runs `f` on the key's slot while holding a reference. A slot that refuses references for
    /// [`table::PATIENCE`] rounds is `TableFull`: its reclaimer may have died deciding (a process
    /// of a shared region killed), and waiting on it would wait forever.
    fn with_key<T: Slot + Keyed, R>(
        &self,
        slots: &[T],
        find: &dyn Fn() -> Result<Option<Found>, Error>,
        table: Table,
        missing: Error,
        f: impl FnOnce(usize, &T) -> R,
    ) -> Result<R, Error> {
        for _ in 0..table::PATIENCE {
            let found = find()?.ok_or(missing)?;
            let slot = slots.get(found.0).ok_or(missing)?;
            if slot.refs().pin() {
                if still(slots, found) {
                    let r = f(found.0, slot);
                    slot.refs().unpin();
                    return Ok(r);
                }
                slot.refs().unpin();
            }
            // Reclaimed under us: look the key up again.
            spin_hint();
        }
        Err(Error::TableFull(table))
    }

    /// The account's table index, if it exists.
    pub(crate) fn account_index(&self, account: &[u8]) -> Result<Option<usize>, Error> {
        let found = self.key_entry(self.tables().accounts, account, ACCOUNT_KEY_MAX, 0, None, 0)?;
        Ok(found.map(|(i, _)| i))
    }

    /// Finds a key in the account or model table; with `init`, inserts it when absent,
    /// reclaiming an unused key's slot if its window is full.
    fn key_entry<T: Slot + Keyed>(
        &self,
        slots: &[T],
        key: &[u8],
        max: usize,
        salt: u64,
        init: Option<&dyn Fn(&T)>,
        now_ns: u64,
    ) -> Result<Option<Found>, Error> {
        match key.len() {
            0 => return Err(Error::EmptyKey),
            n if n > max => return Err(Error::KeyTooLong { max }),
            _ => {}
        }
        let hash = key::hash(self.seed ^ salt, key);
        let matches = |i: usize| slots.get(i).is_some_and(|s| s.key_equals(key));
        let probe = Probe { hash, tag: hash >> 2, mask: u64::MAX, matches: &matches };
        let Some(init) = init else {
            return Ok(table::find(slots, &probe));
        };
        let (table, holder) = if salt == MODEL_SALT {
            (Table::Models, (|id| scope::model_and_variant(id).0) as fn(u64) -> usize)
        } else {
            (Table::Accounts, scope::account_of as fn(u64) -> usize)
        };
        let claim = KeyClaim { engine: self, slots, tag: hash >> 2, init, holder, now_ns };
        table::find_or_insert(slots, &probe, &claim).map(Some).ok_or(Error::TableFull(table))
    }

    /// Finds (or with `create`, creates) the scope of `key`.
    pub(crate) fn locate(
        &self,
        key: ScopeKey<'_>,
        now_ns: u64,
        create: bool,
    ) -> Result<Option<Located>, Error> {
        #[cfg(test)]
        lookups::count();
        let t = self.tables();
        let tiers = &self.policy.tiers;
        let init_account = |s: &AccountSlot| s.init(key.account, tiers);
        let init_model = |s: &ModelSlot| s.init(key.model);
        let init_account: Option<&dyn Fn(&AccountSlot)> = create.then_some(&init_account);
        let init_model: Option<&dyn Fn(&ModelSlot)> = create.then_some(&init_model);
        // Each round that looks again found the account or model being reclaimed; see `with_key`.
        for _ in 0..table::PATIENCE {
            let account =
                self.key_entry(t.accounts, key.account, ACCOUNT_KEY_MAX, 0, init_account, now_ns)?;
            let model = self.key_entry(t.models, key.model, MODEL_KEY_MAX, MODEL_SALT, init_model, now_ns)?;
            let (Some(account), Some(model)) = (account, model) else { return Ok(None) };
            #[cfg(test)]
            lookups::keys_found();
            let identity = scope::identity(account.0, model.0, key.variant.index());
            let always = |_: usize| true;
            let hash = scope_hash(self.seed, identity);
            let probe = Probe { hash, tag: identity, mask: scope::IDENTITY_MASK, matches: &always };
            let found = match table::find(t.scopes, &probe) {
                None if create => match self.insert_scope(&probe, identity, account, model, now_ns)? {
                    Some(found) => Some(found),
                    None => continue,
                },
                found => found,
            };
            // A scope holds its account and model: while both keep the ids found, it is theirs.
            if still(t.accounts, account) && still(t.models, model) {
                let (account, model, variant) = (account.0, model.0, key.variant);
                return Ok(found.map(|(slot, id)| Located { slot, id, account, model, variant }));
            }
        }
        Err(Error::TableFull(Table::Scopes))
    }

    /// Inserts a scope, its account and model pinned for it; `None` if one of them was reclaimed
    /// meanwhile (look again).
    fn insert_scope<F: Fn(usize) -> bool>(
        &self,
        probe: &Probe<'_, F>,
        identity: u64,
        account: Found,
        model: Found,
        now_ns: u64,
    ) -> Result<Option<Found>, Error> {
        let t = self.tables();
        let (Some(a), Some(m)) = (t.accounts.get(account.0), t.models.get(model.0)) else { return Ok(None) };
        if !a.refs.pin() {
            return Ok(None);
        }
        if !m.refs.pin() {
            a.refs.unpin();
            return Ok(None);
        }
        let release = || {
            a.refs.unpin();
            m.refs.unpin();
        };
        if !still(t.accounts, account) || !still(t.models, model) {
            release();
            return Ok(None);
        }
        let claim = ScopeClaim {
            engine: self,
            identity,
            account: account.0,
            model: model.0,
            now_ns,
            claimed: Cell::new(None),
        };
        let found = table::find_or_insert(t.scopes, probe, &claim);
        // The references stay only with a scope this call published.
        let published = matches!(found, Some((i, id)) if claim.claimed.get() == Some((i, table::tag_of(id))));
        if !published {
            release();
        }
        found.map(Some).ok_or(Error::TableFull(Table::Scopes))
    }

    /// Takes the idle scope in slot `index` (id `old`) by swapping its id to `new`: a claim of
    /// the slot, or an empty slot. Its account and model are released.
    fn take_idle_scope(&self, index: usize, old: u64, new: u64, now_ns: u64) -> bool {
        let t = self.tables();
        let (Some(slot), Some(adaptation)) = (t.scopes.get(index), t.adaptation.get(index)) else {
            return false;
        };
        // Bring the candidate up to date first: an idle scope's decay is applied lazily.
        let candidate = Located::of_id(index, old);
        let now_ns = self.tick(candidate, now_ns);
        if !slot.begin_reclaim() {
            return false;
        }
        let bounds = self.bounds(Some(candidate.account));
        let (_, intervals) = self.fresh(&bounds);
        let forgettable = adaptation
            .load()
            .iter()
            .all(|(m, state)| adapt::is_forgettable(&self.policy.adaptation, *state, *bounds.get(m)));
        let w = slot.bucket.load(Ordering::Acquire);
        let word = Word::unpack(w);
        let idle = !bucket::is_retired(w)
            && slot.usage_is_zero()
            && slot.in_flight() == 0
            && forgettable
            && slot.intervals(word.buffer()) == intervals
            && bucket::open(word, now_ns / QUANTUM_NS).debt == [0; 4];
        let mut taken = false;
        if idle && slot.retire(w) {
            taken = slot.id.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst).is_ok();
            if !taken {
                slot.bucket.store(w, Ordering::Release);
            }
        }
        slot.end_tick(None);
        if taken {
            if let Some(a) = t.accounts.get(candidate.account) {
                a.refs.unpin();
            }
            if let Some(m) = t.models.get(candidate.model) {
                m.refs.unpin();
            }
        }
        taken
    }

    /// Frees scope slot `index` if it is an idle scope of key `key_index` (as `holder` reads a
    /// scope id), to let that key go.
    fn free_idle_scope_of(&self, index: usize, key_index: usize, holder: fn(u64) -> usize, now_ns: u64) {
        let Some(slot) = self.tables().scopes.get(index) else { return };
        let id = slot.id.load(Ordering::SeqCst);
        if table::is_ready(id) && holder(id) == key_index {
            self.take_idle_scope(index, id, table::emptied(id), now_ns);
        }
    }
}

/// The home of a scope identity: a seeded multiply-xorshift, as the identity is already a
/// dense integer.
pub(crate) fn scope_hash(seed: u64, identity: u64) -> u64 {
    // Another mixing operator only mixes worse: an equivalent mutant (.cargo/mutants.toml).
    let x = (identity ^ seed ^ SCOPE_SALT).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53)
}

/// Inserting an account or model: a fixed tag; an unused key's slot may be reclaimed.
struct KeyClaim<'e, S: Storage, T> {
    engine: &'e Engine<S>,
    slots: &'e [T],
    tag: u64,
    init: &'e dyn Fn(&T),
    /// Which account or model a scope id names.
    holder: fn(u64) -> usize,
    now_ns: u64,
}

impl<S: Storage, T: Slot + Keyed> Claim for KeyClaim<'_, S, T> {
    fn tag(&self, _: u64) -> u64 {
        self.tag
    }

    fn init(&self, index: usize) {
        if let Some(s) = self.slots.get(index) {
            (self.init)(s);
        }
    }

    fn reclaim(&self, index: usize, old: u64, new: u64) -> bool {
        let Some(slot) = self.slots.get(index) else { return false };
        // A flood key usually has one scope, idle by now: free it, and the key with it.
        if slot.refs().count() == 1 {
            if let Some(scope) = slot.refs().scope_hint() {
                self.engine.free_idle_scope_of(scope, index, self.holder, self.now_ns);
            }
        }
        if !slot.refs().begin_retire() {
            return false;
        }
        let taken = slot.holds_nothing()
            && slot.id().compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        slot.refs().end_retire();
        taken
    }
}

/// Inserting a scope: a new generation per incarnation of a slot, and reclaim of idle scopes
/// whose state equals a fresh scope's (SPEC §1).
struct ScopeClaim<'e, S: Storage> {
    engine: &'e Engine<S>,
    identity: u64,
    account: usize,
    model: usize,
    now_ns: u64,
    /// The slot and tag this call last initialised: its scope, if that claim is published.
    claimed: Cell<Option<(usize, u64)>>,
}

impl<S: Storage> Claim for ScopeClaim<'_, S> {
    fn tag(&self, old: u64) -> u64 {
        scope::next_generation(old, self.identity)
    }

    fn init(&self, index: usize) {
        let e = self.engine;
        let t = e.tables();
        if let (Some(slot), Some(adaptation)) = (t.scopes.get(index), t.adaptation.get(index)) {
            self.claimed.set(Some((index, table::tag_of(slot.id.load(Ordering::SeqCst)))));
            let (states, intervals) = e.fresh(&e.bounds(Some(self.account)));
            // A stale tick of the slot's last scope may hold the lock: it backs out on our id.
            // If its holder never lets go (it died), `init` below resets the lock with the rest.
            let _ = slot.begin_exclusive();
            adaptation.store(&states);
            slot.init(intervals, self.now_ns / QUANTUM_NS, e.tick_index(self.now_ns));
        }
        if let (Some(a), Some(m)) = (t.accounts.get(self.account), t.models.get(self.model)) {
            a.refs.set_scope_hint(index);
            m.refs.set_scope_hint(index);
        }
    }

    fn reclaim(&self, index: usize, old: u64, new: u64) -> bool {
        self.engine.take_idle_scope(index, old, new, self.now_ns)
    }
}

/// Unit tests only: how many keyed lookups this thread has made, to pin which calls make none.
#[cfg(test)]
pub(crate) mod lookups {
    use std::boxed::Box;

    type Meanwhile = core::cell::RefCell<Option<Box<dyn FnOnce()>>>;

    std::thread_local! {
        static LOOKUPS: core::cell::Cell<usize> = const { core::cell::Cell::new(0) };
        /// What another thread does between a lookup finding its keys and finding their scope.
        static MEANWHILE: Meanwhile = const { core::cell::RefCell::new(None) };
    }

    /// Runs `f` once, in the next lookup on this thread, once it has found its keys.
    pub(crate) fn meanwhile(f: impl FnOnce() + 'static) {
        MEANWHILE.with(|m| *m.borrow_mut() = Some(Box::new(f)));
    }

    pub(crate) fn keys_found() {
        if let Some(f) = MEANWHILE.with(|m| m.borrow_mut().take()) {
            f();
        }
    }

    pub(crate) fn count() {
        LOOKUPS.with(|n| n.set(n.get() + 1));
    }

    pub(crate) fn made() -> usize {
        LOOKUPS.with(core::cell::Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Capacity, Completion, Engine, Metric, Policy, Request, ScopeKey, Usage, Variant};

    const MINUTE: u64 = 60_000_000_000;

    /// Creates the scope of ("a", "m") at 0, settled: idle a minute later.
    fn idle_scope(e: &Engine<crate::Heap>) -> crate::engine::Located {
        let key = ScopeKey::new(b"a", b"m");
        let d = e.admit(key, &Request::new(0), 0).unwrap_or_else(|e| panic!("{e}"));
        let p = *d.permit().unwrap_or_else(|| panic!("{d:?}"));
        e.settle(&p, &Usage::new(0, 0), Completion::Success, 0).unwrap_or_else(|e| panic!("{e}"));
        e.locate(key, 0, false).ok().flatten().unwrap_or_else(|| panic!("a has a scope"))
    }

    /// A reclaim that lost its scope's id to a rival (it looked under an id the slot no longer
    /// has) leaves the scope as it was, not retired: it still admits.
    #[test]
    fn a_reclaim_that_lost_the_slot_leaves_the_scope_serving() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let at = idle_scope(&e);
        // Brought up to date (its tick applied), so that only the id stands in the way.
        assert!(e.limits(ScopeKey::new(b"a", b"m"), MINUTE).is_ok());
        let stale = at.id ^ (1 << 2);
        assert!(!e.take_idle_scope(at.slot, stale, crate::table::emptied(stale), MINUTE));
        let d = e.admit(ScopeKey::new(b"a", b"m"), &Request::new(0), MINUTE);
        assert!(d.is_ok_and(|d| d.admitted()), "the scope still serves");
        let again = e.locate(ScopeKey::new(b"a", b"m"), MINUTE, false).ok().flatten();
        assert_eq!(again.map(|at| (at.slot, at.id)), Some((at.slot, at.id)), "in its slot, as it was");
    }

    /// A reclaim never takes a scope whose tick lock is held: the holder may be applying its
    /// ticks (or have died doing so in a shared region, for repair to put right). Once the lock
    /// is let go, the idle scope is taken.
    #[test]
    fn a_reclaim_never_takes_a_scope_whose_tick_lock_is_held() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let at = idle_scope(&e);
        assert!(e.limits(ScopeKey::new(b"a", b"m"), MINUTE).is_ok());
        let slot = e.tables().scopes.get(at.slot).unwrap_or_else(|| panic!("its slot"));
        let empty = crate::table::emptied(at.id);
        assert!(slot.begin_exclusive());
        assert!(!e.take_idle_scope(at.slot, at.id, empty, MINUTE), "taken while its lock was held");
        slot.end_tick(None);
        assert!(e.take_idle_scope(at.slot, at.id, empty, MINUTE), "idle and unlocked: taken");
    }

    /// Letting a key go frees only that key's idle scopes, not an idle scope of another key.
    #[test]
    fn letting_a_key_go_frees_only_its_own_idle_scopes() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let at = idle_scope(&e);
        let id = || e.tables().scopes.get(at.slot).map(|s| s.id.load(crate::sync::Ordering::SeqCst));
        let other_account = at.account + 1;
        e.free_idle_scope_of(at.slot, other_account, crate::scope::account_of, MINUTE);
        assert_eq!(id(), Some(at.id), "another key's scope stays");
        e.free_idle_scope_of(at.slot, at.account, crate::scope::account_of, MINUTE);
        assert_ne!(id(), Some(at.id), "its own idle scope goes");
    }

    /// Inserting a scope for an account or model found before it was reclaimed and reused (its
    /// slot's id moved on) publishes nothing: the caller looks again.
    #[test]
    fn a_scope_is_never_inserted_for_an_account_or_model_reused_since_found() {
        use crate::key::MODEL_KEY_MAX;
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let init_account = |s: &AccountSlot| s.init(b"x", &e.policy.tiers);
        let init_model = |s: &ModelSlot| s.init(b"m");
        let t = e.tables();
        let account = e.key_entry(t.accounts, b"x", ACCOUNT_KEY_MAX, 0, Some(&init_account), 0);
        let model = e.key_entry(t.models, b"m", MODEL_KEY_MAX, MODEL_SALT, Some(&init_model), 0);
        let (Ok(Some(account)), Ok(Some(model))) = (account, model) else { panic!("both made") };
        let insert = |account: Found, model: Found| {
            let identity = scope::identity(account.0, model.0, 0);
            let always = |_: usize| true;
            let hash = scope_hash(e.seed, identity);
            let probe = Probe { hash, tag: identity, mask: scope::IDENTITY_MASK, matches: &always };
            e.insert_scope(&probe, identity, account, model, 0)
        };
        let stale = |found: Found| (found.0, found.1 ^ (1 << 2));
        assert_eq!(insert(stale(account), model), Ok(None), "a reused account");
        assert_eq!(insert(account, stale(model)), Ok(None), "a reused model");
        assert!(matches!(insert(account, model), Ok(Some(_))), "both current: inserted");
    }

    /// A lookup whose slot was reclaimed and reused for another key between finding and pinning
    /// it (the slot's id moved on) looks again: it never works on the reused slot.
    #[test]
    fn a_lookup_never_works_on_a_slot_reused_since_it_was_found() {
        use crate::error::{Error, Table};
        use crate::key::ACCOUNT_KEY_MAX;
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        for account in [b"a", b"b"] {
            let d = e.admit(ScopeKey::new(account, b"m"), &Request::new(0), 0);
            assert!(d.is_ok_and(|d| d.admitted()));
        }
        let slots = e.tables().accounts;
        let found = |key: &[u8]| e.key_entry(slots, key, ACCOUNT_KEY_MAX, 0, None, 0).ok().flatten();
        let (Some(a), Some(b)) = (found(b"a"), found(b"b")) else { panic!("both accounts exist") };
        // "b"'s slot as a lookup found it before "b" took it: under an id the slot no longer has.
        let stale = (b.0, b.1 ^ (1 << 2));
        let lookups = core::cell::Cell::new(0);
        let find = || {
            lookups.set(lookups.get() + 1);
            Ok(Some(if lookups.get() == 1 { stale } else { a }))
        };
        let ran_on = e.with_key(slots, &find, Table::Accounts, Error::UnknownAccount, |i, _| i);
        assert_eq!(ran_on, Ok(a.0), "worked on the slot found again, not the reused one");
        assert_eq!(lookups.get(), 2);
    }

    /// An account reclaimed and its slot reused by another account, with a scope on the same
    /// model, while a lookup was between finding the account and finding its scope: the scope
    /// there is the other tenant's, and the lookup must not return it.
    #[test]
    fn a_lookup_never_returns_the_scope_of_an_account_that_took_its_slot_meanwhile() {
        let capacity = Capacity { accounts: 1, ..Capacity::scopes(8) };
        let e: &'static Engine<crate::Heap> = std::boxed::Box::leak(std::boxed::Box::new(
            Engine::new(Policy::fixed(), capacity).unwrap_or_else(|e| panic!("{e}")),
        ));
        let a = idle_scope(e);
        let b = ScopeKey::new(b"b", b"m");
        lookups::meanwhile(move || {
            // The one account slot is "a"'s, idle: "b" takes it and makes its scope on "m".
            assert!(e.admit(b, &Request::new(0), MINUTE).is_ok_and(|d| d.admitted()));
        });
        let found = e.locate(ScopeKey::new(b"a", b"m"), MINUTE, false).ok().flatten();
        let of_b = e.locate(b, MINUTE, false).ok().flatten().unwrap_or_else(|| panic!("b has a scope"));
        assert_eq!(of_b.account, a.account, "b took a's account slot");
        assert_eq!(found.map(|at| at.id), None, "a has no scope any more; b's is not a's");
    }

    /// Keys whose hashes collide (every `collide-…` key, see `key::collide`) share a tag: only
    /// the full-key comparison keeps the tenants apart.
    #[test]
    fn accounts_and_models_colliding_on_their_tag_never_share_state() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (ScopeKey::new(b"collide-a", b"collide-m1"), ScopeKey::new(b"collide-b", b"collide-m2"));
        for i in 0..60 {
            let d = e.admit(a, &Request::new(0), i).unwrap_or_else(|e| panic!("{e}"));
            let p = *d.permit().unwrap_or_else(|| panic!("a's own limit: {d:?}"));
            e.settle(&p, &Usage::new(0, 0), Completion::Success, i).unwrap_or_else(|e| panic!("{e}"));
        }
        // a has used its 60 requests; b, whose keys hash alike, has all of its own.
        let b_levels = e.limits(b, 60).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b_levels.remaining(Metric::Requests), 60);
        assert!(e.admit(b, &Request::new(0), 60).unwrap_or_else(|e| panic!("{e}")).admitted());
        assert!(!e.admit(a, &Request::new(0), 60).unwrap_or_else(|e| panic!("{e}")).admitted());
        e.add_credits(b"collide-a", 5).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.account(b"collide-b").map(|s| s.credits), Ok(0));
        e.set_load(b"collide-m1", Variant::Regular, 900).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.load(b"collide-m2", Variant::Regular), Ok(0));
        assert_eq!(e.account(b"collide-c"), Err(crate::Error::UnknownAccount));
    }

    /// A key's window full of other keys that share its tag is a full table, not a rival
    /// inserting the same key: the insert is refused instead of waiting forever.
    #[test]
    fn a_window_full_of_keys_sharing_the_tag_is_full() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(256)).unwrap_or_else(|e| panic!("{e}"));
        for i in 0..crate::table::PROBE_WINDOW {
            // Credits are worth keeping: none of these can be reclaimed.
            e.add_credits(std::format!("collide-{i}").as_bytes(), 1).unwrap_or_else(|e| panic!("{e}"));
        }
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(e.add_credits(b"collide-new", 1)));
        let outcome = result.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(outcome, Ok(Err(crate::Error::TableFull(crate::Table::Accounts))));
    }

    /// A reclaimer that dies deciding (a process of a shared region killed between taking the
    /// retiring flag and dropping it) leaves the slot refusing references. Calls on its key give
    /// up with `TableFull` instead of waiting forever, and other keys carry on.
    #[test]
    fn a_slot_whose_reclaimer_died_deciding_is_full_not_a_wait() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        e.add_credits(b"stuck", 1).unwrap_or_else(|e| panic!("{e}"));
        let index = e.account_index(b"stuck").ok().flatten().unwrap_or_else(|| panic!("no account"));
        let slot = e.tables().accounts.get(index).unwrap_or_else(|| panic!("no slot"));
        assert!(slot.refs.begin_retire(), "nothing holds the account");
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let credits = e.add_credits(b"stuck", 1);
            let admit = e.admit(ScopeKey::new(b"stuck", b"model"), &Request::new(0), 0).map(|d| d.admitted());
            let other = e.admit(ScopeKey::new(b"other", b"model"), &Request::new(0), 0).map(|d| d.admitted());
            done.send((credits, admit, other))
        });
        let (credits, admit, other) = result
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("a call waited forever"));
        assert_eq!(credits, Err(crate::Error::TableFull(crate::Table::Accounts)));
        assert_eq!(admit, Err(crate::Error::TableFull(crate::Table::Scopes)));
        assert_eq!(other, Ok(true));
    }
}
