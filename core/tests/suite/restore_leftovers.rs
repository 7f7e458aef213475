//! A restore replaces the whole state: nothing the engine held before it that the snapshot does
//! not hold survives it — no model's load, capacity, in-flight count or prices, no ledger entry.

use sluicegate_core::{
    Capacity, Completion, Engine, Error, Heap, Permit, Policy, Price, Request, ScopeKey, SettleError, Table,
    Usage, Variant,
};

const SECOND: u64 = 1_000_000_000;
const SEED: u64 = 0x5eed_1eff_0ae5;

/// A small ledger, so that it can be filled: an entry is searched for among at most 64.
fn capacity() -> Capacity {
    Capacity { permits: 64, ..Capacity::scopes(256) }
}

/// Engines sharing a seed put a key in the same slot, so a restored model lands where the
/// restoring engine already had one.
fn engine() -> Engine<Heap> {
    Engine::with_storage(Policy::fixed(), Heap::new(capacity()).unwrap(), SEED).unwrap()
}

fn snapshot(e: &Engine<Heap>, now: u64) -> Vec<u8> {
    let mut buf = vec![0; e.snapshot_size()];
    let n = e.snapshot(&mut buf, now).unwrap();
    buf.truncate(n);
    buf
}

fn admit(e: &Engine<Heap>, account: &str, model: &str, now: u64) -> Result<Permit, Error> {
    let d =
        e.admit(ScopeKey::new(account.as_bytes(), model.as_bytes()), &Request::new(10).max_tokens(10), now)?;
    Ok(*d.permit().unwrap_or_else(|| panic!("expected admission, got {:?}", d.outcome)))
}

fn price() -> Price {
    Price { uncached_prompt: 1_000_000, cached_prompt: 1_000_000, generated: 1_000_000 }
}

/// Models the snapshot does not name are gone after the restore: their reported load, their
/// capacity (and so their derived load) and their prices.
#[test]
fn models_not_in_the_snapshot_are_gone() {
    let empty = snapshot(&engine(), 0);
    let mut e = engine();
    e.set_load(b"reported", Variant::Regular, 700).unwrap();
    e.set_load(b"reported", Variant::Fast, 300).unwrap();
    e.set_model_capacity(b"tracked", Variant::Regular, 10).unwrap();
    let held: Vec<Permit> = (0..5).map(|i| admit(&e, &format!("a{i}"), "tracked", 0).unwrap()).collect();
    assert_eq!(e.load(b"tracked", Variant::Regular), Ok(500));
    e.set_price(b"priced", Variant::Regular, price()).unwrap();

    e.restore(&empty, SECOND).unwrap();
    assert_eq!(e.load(b"reported", Variant::Regular), Ok(0));
    assert_eq!(e.load(b"reported", Variant::Fast), Ok(0));
    assert_eq!(e.load(b"tracked", Variant::Regular), Ok(0));
    // No capacity any more: new permits are not counted as load either.
    admit(&e, "b", "tracked", SECOND).unwrap();
    assert_eq!(e.load(b"tracked", Variant::Regular), Ok(0));
    // No prices: a settled request costs nothing.
    let p = admit(&e, "payer", "priced", SECOND).unwrap();
    e.settle(&p, &Usage::new(1_000, 1_000), Completion::Success, SECOND).unwrap();
    assert_eq!(e.account(b"payer").map(|a| a.period_spend), Ok(0));
    // The permits from before the restore are stale, and were not counted twice.
    for p in &held {
        assert_eq!(
            e.settle(p, &Usage::new(10, 10), Completion::Success, SECOND),
            Err(SettleError::StalePermit)
        );
    }
}

/// A model the snapshot names gets the snapshot's settings and nothing else: the in-flight count
/// its slot had before (permits that can never settle now) is gone.
#[test]
fn a_model_in_the_snapshot_keeps_only_what_the_snapshot_says() {
    let source = engine();
    source.set_model_capacity(b"m", Variant::Regular, 10).unwrap();
    source.set_price(b"m", Variant::Regular, price()).unwrap();
    let bytes = snapshot(&source, 0);

    let mut e = engine();
    e.set_model_capacity(b"m", Variant::Regular, 10).unwrap();
    for i in 0..6 {
        admit(&e, &format!("a{i}"), "m", 0).unwrap();
    }
    assert_eq!(e.load(b"m", Variant::Regular), Ok(600));
    e.restore(&bytes, SECOND).unwrap();
    assert_eq!(e.load(b"m", Variant::Regular), Ok(0));
    // The snapshot's capacity and prices hold.
    let p = admit(&e, "payer", "m", SECOND).unwrap();
    assert_eq!(e.load(b"m", Variant::Regular), Ok(100));
    e.settle(&p, &Usage::new(1_000, 1_000), Completion::Success, SECOND).unwrap();
    assert_eq!(e.load(b"m", Variant::Regular), Ok(0));
    assert_eq!(e.account(b"payer").map(|a| a.period_spend), Ok(2_000));
}

/// A full ledger before the restore is an empty one after it: every entry is free again, and a
/// permit from before settles as stale.
#[test]
fn the_ledger_is_empty_after_a_restore() {
    let empty = snapshot(&engine(), 0);
    let mut e = engine();
    let permits = e.capacity().permits;
    let held: Vec<Permit> = (0..permits).map(|i| admit(&e, &format!("a{i}"), "m", 0).unwrap()).collect();
    assert_eq!(admit(&e, "one-more", "m", 0), Err(Error::TableFull(Table::Permits)));

    e.restore(&empty, SECOND).unwrap();
    let before = held.first().unwrap();
    assert_eq!(
        e.settle(before, &Usage::new(10, 10), Completion::Success, SECOND),
        Err(SettleError::StalePermit)
    );
    let after: Vec<Permit> =
        (0..permits).map(|i| admit(&e, &format!("b{i}"), "m", SECOND).unwrap()).collect();
    assert_eq!(admit(&e, "one-more", "m", SECOND), Err(Error::TableFull(Table::Permits)));
    for p in &after {
        e.settle(p, &Usage::new(10, 10), Completion::Success, 2 * SECOND).unwrap();
    }
    // Long after the old permits' deadlines, nothing of theirs is released into the new state.
    let late = 3_600 * SECOND;
    let again: Vec<Permit> = (0..permits).map(|i| admit(&e, &format!("c{i}"), "m", late).unwrap()).collect();
    for p in &again {
        e.settle(p, &Usage::new(10, 10), Completion::Success, late).unwrap();
    }
}
