//! An inserted account or model carries its own key: its state is found under exactly that key,
//! however many keys share the table, and an unknown key finds nothing.

use sluicegate_core::{Capacity, Engine, Error, Heap, Metric, Policy, Request, ScopeKey, Variant};

const ACCOUNTS: u64 = 200;
const MODELS: u64 = 100;

fn engine() -> Engine<Heap> {
    Engine::new(Policy::fixed(), Capacity::scopes(512)).unwrap()
}

fn account(i: u64) -> Vec<u8> {
    format!("account-{i}").into_bytes()
}

fn model(i: u64) -> Vec<u8> {
    format!("model/{i}").into_bytes()
}

#[test]
fn each_account_keeps_its_own_credits() {
    let e = engine();
    for i in 0..ACCOUNTS {
        e.add_credits(&account(i), 1_000 + i).unwrap();
        // Found at once under its key (a slot published without its key would be found by no
        // key, and each lookup would insert another).
        assert_eq!(e.account(&account(i)).map(|a| a.credits), Ok(1_000 + i), "account {i}");
    }
    // Again, so that a key inserted twice would show as a second slot's credits.
    for i in 0..ACCOUNTS {
        e.add_credits(&account(i), 1).unwrap();
    }
    for i in 0..ACCOUNTS {
        assert_eq!(e.account(&account(i)).map(|a| a.credits), Ok(1_001 + i), "account {i}");
    }
    assert_eq!(e.account(b"unknown"), Err(Error::UnknownAccount));
    assert_eq!(e.account(b"account-"), Err(Error::UnknownAccount));
    assert_eq!(e.account(format!("account-{ACCOUNTS}").as_bytes()), Err(Error::UnknownAccount));
}

#[test]
fn each_model_keeps_its_own_load() {
    let e = engine();
    for i in 0..MODELS {
        e.set_load(&model(i), Variant::Regular, 1 + i as u32).unwrap();
        e.set_load(&model(i), Variant::Fast, 500 + i as u32).unwrap();
        assert_eq!(e.load(&model(i), Variant::Regular), Ok(1 + i as u32), "model {i}");
    }
    for i in 0..MODELS {
        assert_eq!(e.load(&model(i), Variant::Regular), Ok(1 + i as u32), "model {i}");
        assert_eq!(e.load(&model(i), Variant::Fast), Ok(500 + i as u32), "model {i}");
    }
    assert_eq!(e.load(b"model/unknown", Variant::Regular), Ok(0));
}

/// Admissions create accounts and models too: each scope is found again under its key, with
/// the requests it used, and the accounts admissions made are known by name.
#[test]
fn admissions_find_their_own_scopes_again() {
    let e = engine();
    let keys: Vec<(Vec<u8>, Vec<u8>)> = (0..60).map(|i| (account(i), model(i % 7))).collect();
    for (i, (a, m)) in keys.iter().enumerate() {
        for _ in 0..=i % 5 {
            assert!(e.admit(ScopeKey::new(a, m), &Request::new(0), 0).unwrap().admitted());
        }
        let used = e.limits(ScopeKey::new(a, m), 0).unwrap().used(Metric::Requests);
        assert_eq!(used, (i % 5 + 1) as u64, "scope {i}");
    }
    for (i, (a, m)) in keys.iter().enumerate() {
        let used = e.limits(ScopeKey::new(a, m), 0).unwrap().used(Metric::Requests);
        assert_eq!(used, (i % 5 + 1) as u64, "scope {i}");
        assert_eq!(e.account(a).map(|s| s.credits), Ok(0), "account {i}");
    }
    assert_eq!(e.account(b"unknown"), Err(Error::UnknownAccount));
}
