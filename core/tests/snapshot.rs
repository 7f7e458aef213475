//! SPEC.md §10: state survives a restart; damaged or foreign snapshots change nothing.

use proptest::prelude::*;
use sluicegate_core::snapshot::{ACCOUNT_RECORD, SCOPE_RECORD};
use sluicegate_core::tier::DOLLAR;
use sluicegate_core::{
    Capacity, Completion, Engine, Heap, Metric, MetricLimits, Policy, Price, Quota, Request, ScopeKey,
    SettleError, SnapshotError, Tier, Usage, Variant,
};

const SECOND: u64 = 1_000_000_000;
const MINUTE: u64 = 60 * SECOND;
/// The restoring process's monotonic clock starts somewhere else entirely.
const NEW_ORIGIN: u64 = 987_654 * SECOND;

fn engine() -> Engine<Heap> {
    Engine::new(Policy::fireworks_2024(), Capacity::scopes(128)).unwrap()
}

fn key(account: &str) -> ScopeKey<'_> {
    ScopeKey::new(account.as_bytes(), b"llama-v3p1-70b")
}

fn snapshot(e: &Engine<Heap>, now: u64) -> Vec<u8> {
    let mut buf = vec![0; e.snapshot_size()];
    let n = e.snapshot(&mut buf, now).unwrap();
    buf.truncate(n);
    buf
}

fn sustain(e: &Engine<Heap>, k: ScopeKey<'_>, from: u64, minutes: u64) {
    for minute in from..from + minutes {
        let rpm = e.limits(k, minute * MINUTE).unwrap().limit(Metric::Requests);
        for i in 0..rpm {
            let now = minute * MINUTE + i * MINUTE / rpm;
            if let Some(p) = e.admit(k, &Request::new(0), now).unwrap().permit() {
                e.settle(p, &Usage::default(), Completion::Success, now).unwrap();
            }
        }
    }
}

#[test]
fn earned_limits_survive_a_restart_and_keep_adapting() {
    let old = engine();
    sustain(&old, key("a"), 0, 120);
    assert_eq!(old.limits(key("a"), 120 * MINUTE).unwrap().limit(Metric::Requests), 1_440);
    let bytes = snapshot(&old, 120 * MINUTE);

    let mut new = engine();
    new.restore(&bytes, NEW_ORIGIN).unwrap();
    assert_eq!(new.limits(key("a"), NEW_ORIGIN).unwrap().limit(Metric::Requests), 1_440);
    // Sustained use after the restart keeps growing the limit: +12 RPM a minute.
    let shift = NEW_ORIGIN / MINUTE;
    sustain(&new, key("a"), shift, 2);
    let grown = new.limits(key("a"), (shift + 2) * MINUTE).unwrap().limit(Metric::Requests);
    assert!((1_450..=1_470).contains(&grown), "{grown}");
}

#[test]
fn bucket_levels_are_rebased_on_the_new_clock() {
    let old = Engine::new(Policy::fixed(), Capacity::scopes(128)).unwrap();
    old.admit(key("a"), &Request::new(0).n(30), 7 * SECOND).unwrap();
    let bytes = snapshot(&old, 7 * SECOND);
    let mut new = Engine::new(Policy::fixed(), Capacity::scopes(128)).unwrap();
    new.restore(&bytes, NEW_ORIGIN).unwrap();
    assert_eq!(new.limits(key("a"), NEW_ORIGIN).unwrap().remaining(Metric::Requests), 30);
    assert_eq!(new.limits(key("a"), NEW_ORIGIN + 15 * SECOND).unwrap().remaining(Metric::Requests), 45);
}

#[test]
fn accounts_quotas_prices_and_load_survive_a_restart() {
    let old = engine();
    let model = b"llama-v3p1-70b";
    old.set_price(
        model,
        Variant::Regular,
        Price { uncached_prompt: DOLLAR, cached_prompt: DOLLAR, generated: DOLLAR },
    )
    .unwrap();
    old.add_credits(b"a", 150 * DOLLAR).unwrap();
    old.set_spend_limit(b"a", 300 * DOLLAR).unwrap();
    old.acquire_quota(b"a", Quota::A100Gpus, 3).unwrap();
    old.set_load(model, Variant::Fast, 700).unwrap();
    old.set_limits_override(
        b"big",
        Metric::Requests,
        Some(MetricLimits { floor: 900.0, ceiling: 9_000.0 }),
        0,
    )
    .unwrap();
    let d = old.admit(key("a"), &Request::new(5_000), 0).unwrap();
    old.settle(d.permit().unwrap(), &Usage::new(5_000, 0), Completion::Success, 0).unwrap();
    let before = old.account(b"a").unwrap();
    assert_eq!((before.tier, before.period_spend), (Tier::Two, 5_000));

    let mut new = engine();
    new.restore(&snapshot(&old, 0), NEW_ORIGIN).unwrap();
    assert_eq!(new.account(b"a").unwrap(), before);
    assert_eq!(new.load(model, Variant::Fast).unwrap(), 700);
    assert_eq!(new.limits(key("big"), NEW_ORIGIN).unwrap().limit(Metric::Requests), 900);
    let d = new.admit(key("a"), &Request::new(1_000), NEW_ORIGIN).unwrap();
    new.settle(d.permit().unwrap(), &Usage::new(1_000, 0), Completion::Success, NEW_ORIGIN).unwrap();
    assert_eq!(new.account(b"a").unwrap().period_spend, 6_000);
}

#[test]
fn permits_issued_before_a_restore_are_stale() {
    let mut e = engine();
    let before = *e.admit(key("a"), &Request::new(10), 0).unwrap().permit().unwrap();
    let bytes = snapshot(&e, 0);
    e.restore(&bytes, SECOND).unwrap();
    assert_eq!(
        e.settle(&before, &Usage::new(10, 0), Completion::Success, SECOND),
        Err(SettleError::StalePermit)
    );
    let after = *e.admit(key("a"), &Request::new(10), SECOND).unwrap().permit().unwrap();
    e.settle(&after, &Usage::new(10, 0), Completion::Success, SECOND).unwrap();
}

#[test]
fn a_snapshot_needs_a_large_enough_buffer() {
    let e = engine();
    e.admit(key("a"), &Request::new(1), 0).unwrap();
    let mut small = vec![0; 100];
    assert_eq!(e.snapshot(&mut small, 0), Err(SnapshotError::BufferTooSmall { needed: e.snapshot_size() }));
    // One account, one model, one scope.
    assert_eq!(
        e.snapshot_size(),
        56 + ACCOUNT_RECORD + sluicegate_core::snapshot::MODEL_RECORD + SCOPE_RECORD + 4
    );
}

#[test]
fn restoring_into_other_capacities_is_refused() {
    let e = engine();
    e.admit(key("a"), &Request::new(1), 0).unwrap();
    let mut other = Engine::new(Policy::fireworks_2024(), Capacity::scopes(64)).unwrap();
    assert_eq!(other.restore(&snapshot(&e, 0), 0), Err(SnapshotError::CapacityMismatch));
}

/// An engine with some state, its snapshot, and a fingerprint of it (its own snapshot bytes).
fn populated() -> (Engine<Heap>, Vec<u8>) {
    let e = engine();
    for a in ["a", "b", "c"] {
        let d = e.admit(key(a), &Request::new(100).max_tokens(50), 0).unwrap();
        e.settle(d.permit().unwrap(), &Usage::new(100, 20), Completion::Success, 0).unwrap();
    }
    e.acquire_quota(b"b", Quota::H100Gpus, 2).unwrap();
    let bytes = snapshot(&e, 0);
    (e, bytes)
}

fn with_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn refused_and_unchanged(bytes: &[u8]) -> SnapshotError {
    let (mut target, _) = populated();
    let before = snapshot(&target, 0);
    let err = target.restore(bytes, 0).unwrap_err();
    assert_eq!(snapshot(&target, 0), before, "a failed restore changed the engine ({err:?})");
    err
}

#[test]
fn foreign_and_damaged_headers_are_typed_errors() {
    let (_, good) = populated();
    assert_eq!(
        refused_and_unchanged(b"PNG\x00 not a snapshot at all, definitely not"),
        SnapshotError::BadMagic
    );
    let mut v1 = good.clone();
    v1[4] = 1;
    assert_eq!(refused_and_unchanged(&with_checksum(v1)), SnapshotError::UnsupportedVersion(1));
    let mut v3 = good.clone();
    v3[4] = 3;
    assert_eq!(refused_and_unchanged(&with_checksum(v3)), SnapshotError::UnsupportedVersion(3));
    assert_eq!(refused_and_unchanged(&good[..good.len() - 1]), SnapshotError::Truncated);
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(refused_and_unchanged(&longer), SnapshotError::TrailingBytes);
    let mut counted = good.clone();
    counted[48] += 1; // one scope more than the records hold
    assert_eq!(refused_and_unchanged(&with_checksum(counted)), SnapshotError::Corrupt);
}

#[test]
fn inconsistent_records_are_refused_even_with_a_valid_checksum() {
    let (_, good) = populated();
    let scopes_at = good.len() - 4 - 3 * SCOPE_RECORD;
    // A scope whose id names another account (with no record, and not at its slot).
    let mut dangling = good.clone();
    dangling[scopes_at + 8..scopes_at + 16].copy_from_slice(&((4095u64 << 15) | 2).to_le_bytes());
    assert_eq!(refused_and_unchanged(&with_checksum(dangling)), SnapshotError::Corrupt);
    // A bucket debt beyond what a word can hold.
    let mut deep = good.clone();
    deep[scopes_at + 16..scopes_at + 24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(refused_and_unchanged(&with_checksum(deep)), SnapshotError::Corrupt);
    // An account key of length zero.
    let mut empty_key = good.clone();
    empty_key[60..64].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(refused_and_unchanged(&with_checksum(empty_key)), SnapshotError::Corrupt);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Stand-in for the fuzz target that always runs: any bit flip or truncation is refused.
    #[test]
    fn random_corruption_is_refused_and_changes_nothing(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let (_, good) = populated();
        let mut bad = good.clone();
        for (at, bit) in &flips {
            let i = at.index(bad.len());
            bad[i] ^= 1 << bit;
        }
        if let Some(c) = cut {
            bad.truncate(c.index(bad.len()));
        }
        prop_assume!(bad != good);
        refused_and_unchanged(&bad);
    }
}
