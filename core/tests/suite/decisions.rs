//! What a decision and its permit tell the gateway: the retry hint of each refusal, whether the
//! scope is over its normal limit, and the permit's tier and variant.

use sluicegate_core::{Capacity, Engine, Metric, Outcome, Policy, Request, ScopeKey, ServiceTier, Variant};

const SECOND: u64 = 1_000_000_000;
const KEY: ScopeKey<'static> = ScopeKey::new(b"acct", b"model");

fn engine(policy: Policy) -> Engine<sluicegate_core::Heap> {
    Engine::new(policy, Capacity::scopes(64)).unwrap()
}

/// 60 requests a minute are the normal limit; the hard factor of 2 lets 60 more run over it.
/// Exactly at the limit the scope is not over it; one past it, it is.
#[test]
fn levels_are_over_the_limit_only_past_it() {
    let e = engine(Policy::fireworks_2024());
    let decisions: Vec<_> = (0..121).map(|_| e.admit(KEY, &Request::new(0), 0).unwrap()).collect();
    assert!(decisions[..60].iter().all(|d| matches!(d.outcome, Outcome::Admit(_)) && !d.levels.over_limit()));
    assert!(!decisions[59].levels.over_limit(), "exactly at the limit");
    assert!(decisions[60..120].iter().all(|d| matches!(d.outcome, Outcome::AdmitOverLimit(_))));
    assert!(decisions[60].levels.over_limit(), "one past it");
    assert!(decisions[60].permit().unwrap().over_limit());
    assert!(matches!(decisions[120].outcome, Outcome::RejectRateLimited(_)));
    assert_eq!(decisions[120].retry_after_ns(), Some(SECOND));
    // A fresh scope is under its limit.
    assert!(!e.limits(ScopeKey::new(b"other", b"model"), 0).unwrap().over_limit());
}

/// Each refusal that can be retried says when; a request no bucket could ever hold, or an
/// admission, says nothing.
#[test]
fn every_retryable_refusal_says_when_and_nothing_else_does() {
    let e = engine(Policy::fixed().with_fixed_limit(Metric::PromptTokens, 1_000.0));
    let admitted = e.admit(KEY, &Request::new(10), 0).unwrap();
    assert_eq!(admitted.retry_after_ns(), None);
    let too_large = e.admit(KEY, &Request::new(1_000_000), 0).unwrap();
    assert!(matches!(too_large.outcome, Outcome::RejectRateLimited(r) if r.too_large));
    assert_eq!(too_large.retry_after_ns(), None, "waiting never lets it in");
    let invalid = e.admit(KEY, &Request::new(10).n(0), 0).unwrap();
    assert!(matches!(invalid.outcome, Outcome::RejectInvalid(_)));
    assert_eq!(invalid.retry_after_ns(), None);

    e.set_load(b"model", Variant::Regular, 1_000).unwrap();
    let shed = e.admit(KEY, &Request::new(10), 0).unwrap();
    let Outcome::Shed(s) = shed.outcome else { panic!("{shed:?}") };
    assert_eq!(shed.retry_after_ns(), Some(s.retry_after_ns));
    assert!(s.retry_after_ns > 0);
    e.set_load(b"model", Variant::Regular, 0).unwrap();

    e.set_max_in_flight(b"capped", Some(1)).unwrap();
    let capped = ScopeKey::new(b"capped", b"model");
    assert!(e.admit(capped, &Request::new(1), 0).unwrap().admitted());
    let concurrency = e.admit(capped, &Request::new(1), 0).unwrap();
    let Outcome::RejectConcurrency(c) = concurrency.outcome else { panic!("{concurrency:?}") };
    assert_eq!(concurrency.retry_after_ns(), Some(c.retry_after_ns));
}

/// A permit carries the service tier it was served at and the variant it was admitted under.
#[test]
fn a_permit_knows_its_service_tier_and_variant() {
    let e = engine(Policy::fireworks_2024());
    let regular = *e.admit(KEY, &Request::new(0), 0).unwrap().permit().unwrap();
    assert_eq!(regular.service_tier(), ServiceTier::Default);
    assert_eq!(regular.variant(), Variant::Regular);
    e.set_service_tier_grant(KEY.account, ServiceTier::Priority).unwrap();
    let fast = *e
        .admit(KEY.fast(), &Request::new(0).service_tier(ServiceTier::Priority), 0)
        .unwrap()
        .permit()
        .unwrap();
    assert_eq!(fast.service_tier(), ServiceTier::Priority);
    assert_eq!(fast.variant(), Variant::Fast);
}

/// "After" its expiry means after: a settle at the very nanosecond a permit expires is still in
/// time, one nanosecond later it is not.
#[test]
fn a_permit_expires_just_after_its_expiry_time() {
    use sluicegate_core::{Completion, SettleError, Usage};
    let e = engine(Policy::fixed());
    let on_time = *e.admit(KEY, &Request::new(0), 0).unwrap().permit().unwrap();
    let late = *e.admit(KEY, &Request::new(0), 0).unwrap().permit().unwrap();
    let expiry = on_time.expires_at_ns();
    assert_eq!(expiry, e.policy().permit_ttl_ns, "admitted at 0, on a whole second");
    assert_eq!(e.settle(&on_time, &Usage::new(0, 0), Completion::Success, expiry), Ok(()));
    assert_eq!(
        e.settle(&late, &Usage::new(0, 0), Completion::Success, expiry + 1),
        Err(SettleError::Expired)
    );
}

/// A ledger entry remembers the permit it expired, not just that it expired one: after it is
/// reused, a second settle of its new permit is `AlreadySettled`, and the old permit still
/// learns it expired.
#[test]
fn a_reused_entry_tells_its_settled_permit_from_the_expired_one_before_it() {
    use sluicegate_core::{Capacity, Completion, Engine, SettleError, Usage};
    let e = Engine::new(Policy::fixed(), Capacity { permits: 1, ..Capacity::scopes(8) }).unwrap();
    let old = *e.admit(KEY, &Request::new(0), 0).unwrap().permit().unwrap();
    let later = e.policy().permit_ttl_ns + 2 * e.policy().tick_ns;
    let new = *e.admit(KEY, &Request::new(0), later).unwrap().permit().unwrap();
    let settle = |p| e.settle(p, &Usage::new(0, 0), Completion::Success, later);
    assert_eq!(settle(&new), Ok(()));
    assert_eq!(settle(&new), Err(SettleError::AlreadySettled));
    assert_eq!(settle(&old), Err(SettleError::Expired));
}

/// When a request is too large on two metrics alike, the first of them in `Metric::ALL` is the
/// one named.
#[test]
fn a_tie_between_metrics_names_the_first() {
    let policy = Policy::fixed()
        .with_fixed_limit(Metric::PromptTokens, 1_000.0)
        .with_fixed_limit(Metric::UncachedPromptTokens, 1_000.0);
    let e = engine(policy);
    let d = e.admit(KEY, &Request::new(1_000_000), 0).unwrap();
    assert!(
        matches!(d.outcome, Outcome::RejectRateLimited(r) if r.too_large && r.metric == Metric::PromptTokens),
        "{d:?}"
    );
}

/// A permit handed through C or Python as plain integers comes back as itself; integers with a
/// flag bit `to_raw` never writes are no permit at all.
#[test]
fn a_raw_permit_round_trips_and_unknown_flags_are_refused() {
    use sluicegate_core::Permit;
    let e = engine(Policy::fireworks_2024());
    e.set_service_tier_grant(KEY.account, ServiceTier::Priority).unwrap();
    let admit = |key, tier| *e.admit(key, &Request::new(0).service_tier(tier), 0).unwrap().permit().unwrap();
    let permits = ServiceTier::ALL.map(|t| admit(KEY.fast(), t));
    for permit in permits.into_iter().chain([admit(KEY, ServiceTier::Default)]) {
        let raw = permit.to_raw();
        assert_eq!(Permit::from_raw(&raw), Some(permit));
        // The priority and flex bits together are no tier.
        let mut both = raw;
        both.words[3] |= (4 | 16) << 48;
        assert_eq!(Permit::from_raw(&both), None);
        for bit in 53..64 {
            let mut forged = raw;
            forged.words[3] |= 1 << bit;
            assert_eq!(Permit::from_raw(&forged), None, "flag bit {bit}");
        }
    }
}
