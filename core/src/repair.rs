//! Puts right what processes killed in the middle of a call left in shared tables (SPEC §11),
//! when one process has them to itself (the first opener after every other is gone).
//!
//! A call updates several words one after another; a process killed between two of them can
//! leave a slot claimed for a key it never published, a reclaimer's or tick lock taken, a
//! ledger entry taken but never filled in, or a count (the account's permits and money held,
//! the scope's and the model's permits in flight, the references to an account or model) one
//! off. The ledger and the published slots are the truth: everything else is recounted from
//! them.

use crate::scope;
use crate::storage::Tables;
use crate::sync::Ordering;
use crate::table::{self, Slot};

/// Repairs `tables`. The caller must have them to itself: no other thread or process may use
/// them during the call.
pub(crate) fn repair(tables: Tables<'_>) {
    release_abandoned_claims(tables.scopes);
    release_abandoned_claims(tables.accounts);
    release_abandoned_claims(tables.models);
    // A reclaimer that retired an idle scope's word and died before taking its slot: the scope
    // was as good as new, so it goes.
    for slot in tables.scopes {
        let id = slot.id.load(Ordering::Acquire);
        if table::is_ready(id) && crate::bucket::is_retired(slot.bucket.load(Ordering::Acquire)) {
            slot.id.store(table::emptied(id), Ordering::Release);
        }
    }
    for slot in tables.scopes {
        slot.reset_in_flight(0);
    }
    for account in tables.accounts {
        account.in_flight.store(0, Ordering::Relaxed);
        let spent = account.period_spend.load(Ordering::Relaxed);
        account.committed.store(spent, Ordering::Relaxed);
        account.refs.reset(0);
    }
    for model in tables.models {
        model.in_flight.iter().for_each(|n| n.store(0, Ordering::Relaxed));
        model.refs.reset(0);
    }
    // Each published scope holds its account and model.
    for slot in tables.scopes {
        let id = slot.id.load(Ordering::Acquire);
        if table::is_ready(id) {
            let (model, _) = scope::model_and_variant(id);
            if let Some(a) = tables.accounts.get(scope::account_of(id)) {
                a.refs.reset(a.refs.count() + 1);
            }
            if let Some(m) = tables.models.get(model) {
                m.refs.reset(m.refs.count() + 1);
            }
        }
    }
    // Each live permit holds a place in its scope, account and (if tracked) model, and money.
    for entry in tables.permits {
        let Some(owner) = entry.recover() else { continue };
        let Some(slot) = tables.scopes.get(owner.slot) else { continue };
        slot.reset_in_flight(slot.in_flight() + 1);
        if let Some(a) = tables.accounts.get(scope::account_of(slot.id.load(Ordering::Acquire))) {
            a.in_flight.fetch_add(1, Ordering::Relaxed);
            a.committed.fetch_add(owner.money, Ordering::Relaxed);
        }
        if owner.tracked {
            if let Some(n) =
                tables.models.get(owner.model).and_then(|m| m.in_flight.get(owner.variant.index()))
            {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Empties every slot whose claim was never published or whose dying claim was never reset.
fn release_abandoned_claims<T: Slot>(slots: &[T]) {
    for slot in slots {
        if let Some(empty) = table::abandoned(slot.id().load(Ordering::Acquire)) {
            slot.id().store(empty, Ordering::Release);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::repair;
    use crate::sync::Ordering;
    use crate::table::{self, Slot};
    use crate::{Capacity, Completion, Engine, Policy, Request, ScopeKey, Usage};

    /// Everything a process killed mid-call can leave behind, left by hand, then repaired.
    #[test]
    fn a_repair_puts_right_what_dead_processes_left_half_done() {
        let e = Engine::new(Policy::fixed(), Capacity { scopes: 8, accounts: 8, models: 4, permits: 16 })
            .unwrap_or_else(|e| panic!("{e}"));
        let admit = |key| {
            let d = e.admit(key, &Request::new(1), 0).unwrap_or_else(|e| panic!("{e}"));
            *d.permit().unwrap_or_else(|| panic!("{d:?}"))
        };
        let key = ScopeKey::new(b"a", b"m");
        let live = admit(key);
        let at = e.locate(key, 0, false).ok().flatten().unwrap_or_else(|| panic!("a scope"));
        let t = e.tables();
        let (scope, account) = (&t.scopes[at.slot], &t.accounts[at.account]);
        // A reclaimer's flag, a tick lock, a ledger entry taken and never filled in, a claim
        // never published, and counts one off.
        account.refs.reset(0);
        assert!(account.refs.begin_retire());
        assert!(scope.begin_exclusive());
        let (spare, _) = t
            .permits
            .iter()
            .enumerate()
            .find(|(_, p)| p.take().is_some())
            .unwrap_or_else(|| panic!("a free entry"));
        let empty = t
            .accounts
            .iter()
            .position(|a| a.id().load(Ordering::Acquire) == 0)
            .unwrap_or_else(|| panic!("room"));
        t.accounts[empty].id().store(table::claiming(0x77), Ordering::Release);
        account.in_flight.fetch_add(5, Ordering::Relaxed);
        account.committed.fetch_add(1_000, Ordering::Relaxed);
        scope.reset_in_flight(9);
        // And an idle scope whose word a reclaimer retired before it died.
        let idle = ScopeKey::new(b"b", b"m");
        let p = admit(idle);
        e.settle(&p, &Usage::new(1, 0), Completion::Success, 0).unwrap_or_else(|e| panic!("{e}"));
        let retired = e.locate(idle, 0, false).ok().flatten().unwrap_or_else(|| panic!("b's scope")).slot;
        assert!(t.scopes[retired].retire(t.scopes[retired].bucket.load(Ordering::Acquire)));

        repair(t);

        assert!(!table::is_ready(t.scopes[retired].id.load(Ordering::Acquire)), "the retired scope is gone");

        assert_eq!(account.refs.count(), 1, "its one scope holds it");
        let models = t.models.iter().filter(|m| table::is_ready(m.id().load(Ordering::Acquire)));
        assert_eq!(models.map(|m| m.refs.count()).collect::<std::vec::Vec<_>>(), [1], "and its model");
        assert!(account.refs.pin(), "no longer being reclaimed");
        account.refs.unpin();
        assert!(scope.begin_exclusive(), "the tick lock is free");
        scope.end_tick(None);
        assert!(t.permits[spare].take().is_some(), "the unfilled entry is free again");
        assert_eq!(t.accounts[empty].id().load(Ordering::Acquire), table::emptied(table::claiming(0x77)));
        assert_eq!(account.in_flight.load(Ordering::Relaxed), 1, "the one live permit");
        assert_eq!(account.committed.load(Ordering::Relaxed), account.period_spend.load(Ordering::Relaxed));
        assert_eq!(scope.in_flight(), 1);
        e.settle(&live, &Usage::new(1, 0), Completion::Success, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((account.in_flight.load(Ordering::Relaxed), scope.in_flight()), (0, 0));
        assert!(
            e.admit(idle, &Request::new(1), 0).unwrap_or_else(|e| panic!("{e}")).admitted(),
            "and b is served anew"
        );
    }
}
