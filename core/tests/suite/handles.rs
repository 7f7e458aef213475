//! Resolved scopes (issue 15): admitting through a handle decides exactly as admitting by key,
//! and a handle never charges a scope that is not its key's, whatever moved meanwhile: a
//! reclaim, a restore, another engine.

use std::sync::atomic::{AtomicU64, Ordering};

use sluicegate_core::{
    Capacity, Completion, Decision, Engine, Error, Heap, Metric, Outcome, Policy, Request, ScopeKey,
    ServiceTier, Table, Usage,
};

const MINUTE: u64 = 60_000_000_000;

fn engine(capacity: Capacity) -> Engine<Heap> {
    Engine::with_storage(Policy::fireworks_2024(), Heap::new(capacity).unwrap(), 0x5eed).unwrap()
}

/// A decision with its permit's per-engine fields left out.
fn shape(d: &Decision) -> String {
    let outcome = match &d.outcome {
        Outcome::Admit(p) => format!("admit {:?} wait {}", p.reserved(), p.wait_ns()),
        Outcome::AdmitOverLimit(p) => format!("over {:?} wait {}", p.reserved(), p.wait_ns()),
        other => format!("{other:?}"),
    };
    format!("{outcome} {:?} {:?}", d.levels, d.cost)
}

/// Two engines built alike see the same traffic, one by key and one through cached handles:
/// every decision is the same, through admissions, refusals, settles and idle minutes.
#[test]
fn a_handle_decides_exactly_as_the_key() {
    let capacity = Capacity::scopes(256);
    let (by_key, by_handle) = (engine(capacity), engine(capacity));
    let accounts: Vec<String> = (0..12).map(|i| format!("acct-{i}")).collect();
    let models = [b"llama-v3p1-70b".as_slice(), b"mixtral-8x22b"];
    let keys: Vec<ScopeKey> = accounts
        .iter()
        .flat_map(|a| models.iter().map(move |m| ScopeKey::new(a.as_bytes(), m)))
        .chain([ScopeKey::new(b"acct-0", models[0]).fast()])
        .collect();
    let handles: Vec<_> = keys.iter().map(|k| by_handle.scope(*k, 0).unwrap()).collect();
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut now, mut admitted, mut refused) = (0u64, 0, 0);
    for i in 0..20_000 {
        now += next() % 50_000_000;
        if i % 5_000 == 4_999 {
            now += 10 * MINUTE;
        }
        let k = (next() % keys.len() as u64) as usize;
        let request =
            Request::new(next() % 40_000).max_tokens(next() % 4_000).service_tier(ServiceTier::ALL[i % 3]);
        let (a, b) =
            (by_key.admit(keys[k], &request, now), by_handle.admit_scope(&handles[k], &request, now));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(shape(&a), shape(&b), "call {i}, key {k}");
        if let (Some(p), Some(q)) = (a.permit(), b.permit()) {
            admitted += 1;
            let usage = Usage::new(p.reserved().prompt_tokens, next() % 5_000);
            by_key.settle(p, &usage, Completion::Success, now).unwrap();
            by_handle.settle(q, &usage, Completion::Success, now).unwrap();
        } else {
            refused += 1;
        }
    }
    assert!(admitted > 1_000 && refused > 1_000, "admitted {admitted}, refused {refused}");
}

/// A handle whose scope was reclaimed while idle, its only slot now another key's, never
/// charges that key: while the other key is busy the handle's key finds no room, and once
/// it is idle the handle's key takes the slot back and is charged there.
#[test]
fn a_handle_never_charges_the_scope_that_took_its_slot() {
    let capacity = Capacity { scopes: 1, accounts: 4, models: 1, permits: 8 };
    let e = Engine::new(Policy::fixed(), capacity).unwrap();
    let (a, b) = (ScopeKey::new(b"a", b"m"), ScopeKey::new(b"b", b"m"));
    let handle = e.scope(a, 0).unwrap();
    let d = e.admit_scope(&handle, &Request::new(0), 0).unwrap();
    e.settle(d.permit().unwrap(), &Usage::new(0, 0), Completion::Success, 0).unwrap();
    // Minutes later "a" is idle and "b" takes the only slot.
    let d = e.admit(b, &Request::new(0), 5 * MINUTE).unwrap();
    e.settle(d.permit().unwrap(), &Usage::new(0, 0), Completion::Success, 5 * MINUTE).unwrap();
    assert_eq!(e.admit_scope(&handle, &Request::new(0), 5 * MINUTE), Err(Error::TableFull(Table::Scopes)));
    assert_eq!(e.limits(b, 5 * MINUTE).unwrap().remaining(Metric::Requests), 59, "only b's own request");
    // Later still "b" is idle: the handle's key takes its slot back.
    let d = e.admit_scope(&handle, &Request::new(0), 11 * MINUTE).unwrap();
    assert!(d.admitted());
    assert_eq!(e.limits(a, 11 * MINUTE).unwrap().remaining(Metric::Requests), 59);
    // The handle remembers the new place: a second admission charges the same scope.
    assert!(e.admit_scope(&handle, &Request::new(0), 11 * MINUTE).unwrap().admitted());
    assert_eq!(e.limits(a, 11 * MINUTE).unwrap().remaining(Metric::Requests), 58);
}

/// A restore moves every scope and renumbers accounts. Handles resolved before it charge
/// their own key's restored scope, never another account's that now sits where theirs was.
#[test]
fn handles_resolved_before_a_restore_charge_their_own_scopes() {
    let policy = Policy::fixed().with_fixed_limit(Metric::Requests, 100.0);
    let capacity = Capacity::scopes(64);
    let mut e = Engine::new(policy, capacity).unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("acct-{i}")).collect();
    let key = |i: usize| ScopeKey::new(names[i].as_bytes(), b"m");
    let handles: Vec<_> = (0..20).map(|i| e.scope(key(i), 0).unwrap()).collect();
    // Account i has used i requests when the snapshot is taken.
    for (i, h) in handles.iter().enumerate() {
        for _ in 0..i {
            assert!(e.admit_scope(h, &Request::new(0), 0).unwrap().admitted());
        }
    }
    let mut bytes = vec![0; e.snapshot_size()];
    let n = e.snapshot(&mut bytes, 0).unwrap();
    // Another engine, whose accounts arrived in the opposite order, restores it.
    let mut other = Engine::new(policy, capacity).unwrap();
    for i in (0..20).rev() {
        assert!(other.admit(key(i), &Request::new(0), 0).unwrap().admitted());
    }
    other.restore(&bytes[..n], 0).unwrap();
    e.restore(&bytes[..n], 0).unwrap();
    for engine in [&e, &other] {
        for h in handles.iter().rev() {
            assert!(engine.admit_scope(h, &Request::new(0), 0).unwrap().admitted());
        }
        for i in 0..20 {
            let used = engine.limits(key(i), 0).unwrap().used(Metric::Requests);
            assert_eq!(used, i as u64 + 1, "account {i}");
        }
    }
}

/// A handle taken to another engine is looked up by key there: it charges its own key's scope
/// in that engine, never the scope that sits in its slot there.
#[test]
fn a_handle_used_with_another_engine_charges_its_own_key_there() {
    let policy = Policy::fixed().with_fixed_limit(Metric::Requests, 100.0);
    let capacity = Capacity::scopes(64);
    let (first, second) = (Engine::new(policy, capacity).unwrap(), Engine::new(policy, capacity).unwrap());
    let (a, b) = (ScopeKey::new(b"a", b"m"), ScopeKey::new(b"b", b"m"));
    let handle = first.scope(a, 0).unwrap();
    // In the second engine "b" arrives first, with account index 0 as "a" had in the first.
    for _ in 0..5 {
        assert!(second.admit(b, &Request::new(0), 0).unwrap().admitted());
    }
    assert!(second.admit_scope(&handle, &Request::new(0), 0).unwrap().admitted());
    assert_eq!(second.limits(b, 0).unwrap().used(Metric::Requests), 5);
    assert_eq!(second.limits(a, 0).unwrap().used(Metric::Requests), 1);
    assert_eq!(first.limits(a, 0).unwrap().used(Metric::Requests), 0);
    // Back in its own engine it still charges its scope there.
    assert!(first.admit_scope(&handle, &Request::new(0), 0).unwrap().admitted());
    assert_eq!(first.limits(a, 0).unwrap().used(Metric::Requests), 1);
}

/// Bad keys are the keyed call's typed errors; a handle keeps its key exactly, variant included.
#[test]
fn resolving_a_bad_key_is_a_typed_error_and_a_handle_keeps_its_key() {
    let e = Engine::new(Policy::fixed(), Capacity::scopes(16)).unwrap();
    assert_eq!(e.scope(ScopeKey::new(b"", b"m"), 0).err(), Some(Error::EmptyKey));
    assert_eq!(e.scope(ScopeKey::new(b"a", b""), 0).err(), Some(Error::EmptyKey));
    assert_eq!(e.scope(ScopeKey::new(&[b'a'; 65], b"m"), 0).err(), Some(Error::KeyTooLong { max: 64 }));
    assert_eq!(e.scope(ScopeKey::new(b"a", &[b'm'; 129]), 0).err(), Some(Error::KeyTooLong { max: 128 }));
    let longest = ScopeKey::new(&[b'a'; 64], &[b'm'; 128]).fast();
    let handle = e.scope(longest, 0).unwrap();
    assert_eq!(handle.key(), longest);
    assert_eq!(handle.clone().key(), longest);
    // An invalid request through a handle is refused as by key, charging nothing.
    let d = e.admit_scope(&handle, &Request::new(10).cached_tokens(11), 0).unwrap();
    assert!(matches!(d.outcome, Outcome::RejectInvalid(_)), "{d:?}");
    assert_eq!(e.limits(longest, 0).unwrap().used(Metric::Requests), 0);
    assert_eq!(e.limits(ScopeKey::new(&[b'a'; 64], &[b'm'; 128]), 0).unwrap().used(Metric::Requests), 0);
    assert!(e.admit_scope(&handle, &Request::new(0), 0).unwrap().admitted());
    assert_eq!(e.limits(longest, 0).unwrap().used(Metric::Requests), 1, "the fast variant's own scope");
}

/// Two threads share one handle whose scope is reclaimed for made-up keys between windows
/// (ten idle minutes apart), so that both find it moved and look it up again at once, while a
/// third admits other keys: in every window the handle's key is admitted exactly its limit, in
/// one scope.
#[test]
fn threads_sharing_a_handle_through_reclaims_admit_exactly_the_limit() {
    const LIMIT: u64 = 50;
    let policy = Policy::fixed().with_fixed_limit(Metric::Requests, LIMIT as f64);
    let e = Engine::new(policy, Capacity { scopes: 16, accounts: 64, models: 2, permits: 256 }).unwrap();
    let handle = e.scope(ScopeKey::new(b"hot", b"m"), 0).unwrap();
    let serve = |name: &str, now| {
        let d = e.admit(ScopeKey::new(name.as_bytes(), b"m"), &Request::new(0), now).unwrap();
        d.permit().map(|p| e.settle(p, &Usage::new(0, 0), Completion::Success, now).unwrap()).is_some()
    };
    let (mut moved, mut last) = (0, None);
    for window in 0..40u64 {
        let now = window * 10 * MINUTE;
        let churn: Vec<String> = (0..12).map(|k| format!("churn-{window}-{k}")).collect();
        for name in &churn {
            assert!(serve(name, now), "window {window}, {name}");
        }
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..LIMIT {
                        if let Some(p) = e.admit_scope(&handle, &Request::new(0), now).unwrap().permit() {
                            admitted.fetch_add(1, Ordering::SeqCst);
                            e.settle(p, &Usage::new(0, 0), Completion::Success, now).unwrap();
                        }
                    }
                });
            }
            s.spawn(|| {
                for name in churn.iter().cycle().take(100) {
                    serve(name, now);
                }
            });
        });
        assert_eq!(admitted.load(Ordering::SeqCst), LIMIT, "window {window}");
        let place = format!("{:?}", e.scope(ScopeKey::new(b"hot", b"m"), now).unwrap());
        moved += usize::from(last.as_ref().is_some_and(|l| *l != place));
        last = Some(place);
    }
    assert!(moved > 10, "the handle's scope moved {moved} times: the test proves little");
}
