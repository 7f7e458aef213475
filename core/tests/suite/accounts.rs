//! One test per rule of SPEC.md §8: spend limits, tiers, credits, suspension, overrides, quotas.

use sluicegate_core::tier::DOLLAR;
use sluicegate_core::{
    Capacity, Completion, Engine, Error, Heap, Metric, MetricLimits, Outcome, Permit, Policy, Price, Quota,
    QuotaError, Request, ScopeKey, SpendRejection, Suspension, Tier, Usage, Variant,
};

const SECOND: u64 = 1_000_000_000;
const MINUTE: u64 = 60 * SECOND;
const MODEL: &[u8] = b"llama-v3p1-70b";
/// $1 per million tokens of every kind: a token costs exactly one micro-dollar.
const ONE_MICRO_A_TOKEN: Price = Price { uncached_prompt: DOLLAR, cached_prompt: DOLLAR, generated: DOLLAR };

fn engine() -> Engine<Heap> {
    let e = Engine::new(Policy::fireworks_2024(), Capacity::scopes(256)).unwrap();
    e.set_price(MODEL, Variant::Regular, ONE_MICRO_A_TOKEN).unwrap();
    e
}

fn key(account: &str) -> ScopeKey<'_> {
    ScopeKey::new(account.as_bytes(), MODEL)
}

fn run(e: &Engine<Heap>, k: ScopeKey<'_>, prompt: u64, generated: u64, now: u64) -> Outcome {
    let d = e.admit(k, &Request::new(prompt).max_tokens(generated), now).unwrap();
    if let Some(p) = d.permit() {
        e.settle(p, &Usage::new(prompt, generated), Completion::Success, now).unwrap();
    }
    d.outcome
}

fn spend(e: &Engine<Heap>, account: &str) -> u64 {
    e.account(account.as_bytes()).unwrap().period_spend
}

#[test]
fn a_new_account_is_tier_one_with_a_fifty_dollar_limit() {
    let e = engine();
    run(&e, key("a"), 10, 0, 0);
    let a = e.account(b"a").unwrap();
    assert_eq!((a.tier, a.spend_limit, a.payment_method, a.refusal), (Tier::One, 50 * DOLLAR, true, None));
    assert_eq!(e.account(b"never-seen"), Err(Error::UnknownAccount));
}

#[test]
fn spend_is_computed_at_settle_from_the_model_price_table() {
    let e = engine();
    let price = Price { uncached_prompt: 900_000, cached_prompt: 450_000, generated: 2 * DOLLAR };
    e.set_price(MODEL, Variant::Regular, price).unwrap();
    let d = e.admit(key("a"), &Request::new(10_000).max_tokens(1_000), 0).unwrap();
    let usage = Usage { prompt_tokens: 10_000, cached_tokens: 4_000, generated_tokens: 500 };
    e.settle(d.permit().unwrap(), &usage, Completion::Success, 0).unwrap();
    // 6,000 × $0.90/M + 4,000 × $0.45/M + 500 × $2/M = $0.0054 + $0.0018 + $0.001
    assert_eq!(spend(&e, "a"), 8_200);
}

#[test]
fn fast_variants_are_priced_separately() {
    let e = engine();
    e.set_price(MODEL, Variant::Fast, Price { generated: 10 * DOLLAR, ..ONE_MICRO_A_TOKEN }).unwrap();
    run(&e, key("a").fast(), 0, 1_000, 0);
    run(&e, key("b"), 0, 1_000, 0);
    assert_eq!((spend(&e, "a"), spend(&e, "b")), (10_000, 1_000));
}

#[test]
fn upstream_failures_are_not_billed() {
    let e = engine();
    let d = e.admit(key("a"), &Request::new(1_000), 0).unwrap();
    e.settle(d.permit().unwrap(), &Usage::new(1_000, 0), Completion::UpstreamFailure, 0).unwrap();
    assert_eq!(spend(&e, "a"), 0);
}

#[test]
fn at_or_over_the_spend_limit_every_request_is_rejected() {
    let e = engine();
    e.set_spend_limit(b"a", 2_000).unwrap();
    assert!(matches!(run(&e, key("a"), 1_500, 0, 0), Outcome::Admit(_)));
    // Money is reserved like tokens (SPEC §8): a request whose worst case would cross the limit
    // is refused and charged nothing; one that fits exactly is admitted.
    assert_eq!(run(&e, key("a"), 1_500, 0, SECOND), Outcome::RejectSpend(SpendRejection::SpendLimitExceeded));
    assert_eq!(spend(&e, "a"), 1_500);
    assert!(matches!(run(&e, key("a"), 500, 0, SECOND), Outcome::Admit(_)));
    assert_eq!(run(&e, key("a"), 1, 0, 2 * SECOND), Outcome::RejectSpend(SpendRejection::SpendLimitExceeded));
    // Other models of the account too: spend is per account.
    let other = ScopeKey::new(b"a", b"another-model");
    assert!(matches!(e.admit(other, &Request::new(1), 0).unwrap().outcome, Outcome::RejectSpend(_)));
}

#[test]
fn a_new_billing_period_lifts_a_spend_limit_suspension() {
    let e = engine();
    e.set_spend_limit(b"a", 1_000).unwrap();
    run(&e, key("a"), 1_000, 0, 0);
    assert!(matches!(run(&e, key("a"), 1, 0, SECOND), Outcome::RejectSpend(_)));
    e.start_billing_period(2 * SECOND);
    assert!(matches!(run(&e, key("a"), 1, 0, 2 * SECOND), Outcome::Admit(_)));
    assert_eq!(spend(&e, "a"), 1);
}

/// An account's state reports its payment method, the suspension for lacking one, and a pin.
#[test]
fn the_state_reports_the_payment_method_its_lack_and_a_pinned_tier() {
    let e = engine();
    e.add_credits(b"a", DOLLAR).unwrap();
    let a = e.account(b"a").unwrap();
    assert!(a.payment_method && !a.no_payment_method && !a.tier_pinned, "{a:?}");
    e.set_payment_method(b"a", false).unwrap();
    let a = e.account(b"a").unwrap();
    assert!(!a.payment_method && !a.no_payment_method, "credits left: not suspended yet: {a:?}");
    e.set_price(MODEL, Variant::Regular, A_DOLLAR_A_TOKEN).unwrap();
    run(&e, key("a"), 1, 0, 0);
    let a = e.account(b"a").unwrap();
    assert!(!a.payment_method && a.no_payment_method, "credits spent: {a:?}");
    assert_eq!(a.refusal, Some(SpendRejection::AccountSuspended));
    e.set_tier(b"a", Some(Tier::Two), 0).unwrap();
    assert!(e.account(b"a").unwrap().tier_pinned);
}

/// The two suspensions are independent: lifting one leaves the other, and the account's state
/// reports each.
#[test]
fn lifting_one_suspension_leaves_the_other() {
    let e = engine();
    e.set_suspended(b"a", Suspension::Operator, true).unwrap();
    e.set_suspended(b"a", Suspension::PaymentFailed, true).unwrap();
    e.set_suspended(b"a", Suspension::PaymentFailed, false).unwrap();
    let state = e.account(b"a").unwrap();
    assert!(state.suspended_by_operator && !state.payment_failed, "{state:?}");
    assert_eq!(run(&e, key("a"), 1, 0, 0), Outcome::RejectSpend(SpendRejection::AccountSuspended));
    e.set_suspended(b"a", Suspension::PaymentFailed, true).unwrap();
    e.set_suspended(b"a", Suspension::Operator, false).unwrap();
    let state = e.account(b"a").unwrap();
    assert!(!state.suspended_by_operator && state.payment_failed, "{state:?}");
    assert_eq!(run(&e, key("a"), 1, 0, 0), Outcome::RejectSpend(SpendRejection::AccountSuspended));
    e.set_suspended(b"a", Suspension::PaymentFailed, false).unwrap();
    assert!(matches!(run(&e, key("a"), 1, 0, 0), Outcome::Admit(_)));
}

#[test]
fn operator_and_failed_payment_suspensions_hold_until_lifted() {
    let e = engine();
    for reason in [Suspension::Operator, Suspension::PaymentFailed] {
        e.set_suspended(b"a", reason, true).unwrap();
        assert_eq!(run(&e, key("a"), 1, 0, 0), Outcome::RejectSpend(SpendRejection::AccountSuspended));
        e.set_suspended(b"a", reason, false).unwrap();
        assert!(matches!(run(&e, key("a"), 1, 0, 0), Outcome::Admit(_)));
    }
}

#[test]
fn without_a_payment_method_the_account_is_suspended_once_credits_are_depleted() {
    let e = engine();
    e.set_payment_method(b"a", false).unwrap();
    assert_eq!(run(&e, key("a"), 1, 0, 0), Outcome::RejectSpend(SpendRejection::AccountSuspended));
    e.add_credits(b"a", 3_000).unwrap();
    assert!(matches!(run(&e, key("a"), 2_000, 0, 0), Outcome::Admit(_)));
    assert!(matches!(run(&e, key("a"), 1_000, 0, SECOND), Outcome::Admit(_)));
    let a = e.account(b"a").unwrap();
    assert_eq!((a.credits, a.no_payment_method), (0, true));
    assert_eq!(run(&e, key("a"), 1, 0, 2 * SECOND), Outcome::RejectSpend(SpendRejection::AccountSuspended));
    e.set_payment_method(b"a", true).unwrap();
    assert!(matches!(run(&e, key("a"), 1, 0, 3 * SECOND), Outcome::Admit(_)));
}

#[test]
fn prepaid_credits_raise_historical_spend_and_so_the_tier() {
    let e = engine();
    e.add_credits(b"a", 100 * DOLLAR).unwrap();
    let a = e.account(b"a").unwrap();
    assert_eq!((a.tier, a.spend_limit, a.historical_spend), (Tier::Two, 500 * DOLLAR, 100 * DOLLAR));
}

#[test]
fn credits_count_against_the_spend_limit() {
    let e = engine();
    e.add_credits(b"a", 20 * DOLLAR).unwrap();
    e.set_spend_limit(b"a", 5_000).unwrap();
    run(&e, key("a"), 5_000, 0, 0);
    // The limit is hit while credits remain.
    let a = e.account(b"a").unwrap();
    assert_eq!((a.credits, a.refusal), (20 * DOLLAR - 5_000, Some(SpendRejection::SpendLimitExceeded)));
    // Spend paid by credits is not counted twice in historical spend.
    assert_eq!(a.historical_spend, 20 * DOLLAR);
}

#[test]
fn paid_spend_promotes_the_account_when_it_reaches_a_tier() {
    let e = engine();
    e.set_price(MODEL, Variant::Regular, Price { generated: 40_000 * DOLLAR, ..Price::default() }).unwrap();
    // 1,000 generated tokens at $40,000/M = $40, within Tier 1's $50 a period; three periods
    // make $120 of historical spend.
    for period in 0..3 {
        assert!(matches!(run(&e, key("a"), 0, 1_000, period * SECOND), Outcome::Admit(_)));
        assert_eq!(e.account(b"a").unwrap().tier, if period < 2 { Tier::One } else { Tier::Two });
        e.start_billing_period(period * SECOND);
    }
}

#[test]
fn users_may_lower_their_limit_within_the_tier_but_never_raise_it_above() {
    let e = engine();
    e.set_spend_limit(b"a", 10 * DOLLAR).unwrap();
    assert_eq!(e.account(b"a").unwrap().spend_limit, 10 * DOLLAR);
    e.set_spend_limit(b"a", 50 * DOLLAR).unwrap();
    assert_eq!(
        e.set_spend_limit(b"a", 50 * DOLLAR + 1),
        Err(Error::SpendLimitAboveTier { max: 50 * DOLLAR })
    );
    e.set_tier(b"a", Some(Tier::Unlimited), 0).unwrap();
    e.set_spend_limit(b"a", 1_000_000 * DOLLAR).unwrap();
}

/// $1 per uncached prompt token: a request of `n` prompt tokens costs $`n`.
const A_DOLLAR_A_TOKEN: Price = Price { uncached_prompt: DOLLAR * 1_000_000, ..ONE_MICRO_A_TOKEN };

fn limit(e: &Engine<Heap>, account: &str) -> u64 {
    e.account(account.as_bytes()).unwrap().spend_limit
}

#[test]
fn unpinning_a_tier_returns_to_the_earned_tiers_spend_limit() {
    let e = engine();
    e.set_price(MODEL, Variant::Regular, A_DOLLAR_A_TOKEN).unwrap();
    e.add_credits(b"a", 1_000 * DOLLAR).unwrap();
    assert_eq!((e.account(b"a").unwrap().tier, limit(&e, "a")), (Tier::Three, 5_000 * DOLLAR));
    e.set_tier(b"a", Some(Tier::Unlimited), 0).unwrap();
    e.set_tier(b"a", None, 0).unwrap();
    let a = e.account(b"a").unwrap();
    assert_eq!((a.tier, a.tier_pinned, a.spend_limit), (Tier::Three, false, 5_000 * DOLLAR));
    // Un-pinning with no pin in place changes nothing either.
    e.set_tier(b"a", None, 0).unwrap();
    assert_eq!(limit(&e, "a"), 5_000 * DOLLAR);
    // Past $50 of spend, Tier 3's $5,000 still admits.
    assert!(matches!(run(&e, key("a"), 60, 0, 0), Outcome::Admit(_)));
    assert_eq!(spend(&e, "a"), 60 * DOLLAR);
    assert!(matches!(run(&e, key("a"), 1, 0, SECOND), Outcome::Admit(_)));
}

#[test]
fn a_lower_pinned_tier_limits_spend_only_while_it_is_pinned() {
    let e = engine();
    e.add_credits(b"a", 100 * DOLLAR).unwrap();
    assert_eq!(limit(&e, "a"), 500 * DOLLAR);
    e.set_tier(b"a", Some(Tier::One), 0).unwrap();
    assert_eq!(limit(&e, "a"), 50 * DOLLAR);
    // Un-pinned: back to the earned Tier 2.
    e.set_tier(b"a", None, 0).unwrap();
    assert_eq!((e.account(b"a").unwrap().tier, limit(&e, "a")), (Tier::Two, 500 * DOLLAR));
    // Pinned low again, un-pinned, then promoted: the promotion brings Tier 3's limit.
    e.set_tier(b"a", Some(Tier::One), 0).unwrap();
    e.set_tier(b"a", None, 0).unwrap();
    e.add_credits(b"a", 900 * DOLLAR).unwrap();
    assert_eq!((e.account(b"a").unwrap().tier, limit(&e, "a")), (Tier::Three, 5_000 * DOLLAR));
}

#[test]
fn a_users_own_lower_limit_survives_pinning_and_unpinning() {
    let e = engine();
    e.add_credits(b"a", 1_000 * DOLLAR).unwrap();
    e.set_spend_limit(b"a", 200 * DOLLAR).unwrap();
    assert_eq!(limit(&e, "a"), 200 * DOLLAR);
    // The effective limit is the lower of the tier's and the user's.
    e.set_tier(b"a", Some(Tier::One), 0).unwrap();
    assert_eq!(limit(&e, "a"), 50 * DOLLAR);
    e.set_tier(b"a", Some(Tier::Unlimited), 0).unwrap();
    assert_eq!(limit(&e, "a"), 200 * DOLLAR);
    e.set_tier(b"a", Some(Tier::One), 0).unwrap();
    e.set_tier(b"a", None, 0).unwrap();
    assert_eq!((e.account(b"a").unwrap().tier, limit(&e, "a")), (Tier::Three, 200 * DOLLAR));
    // A promotion keeps it too.
    e.add_credits(b"a", 9_000 * DOLLAR).unwrap();
    assert_eq!((e.account(b"a").unwrap().tier, limit(&e, "a")), (Tier::Four, 200 * DOLLAR));
}

#[test]
fn a_saturated_cost_keeps_spend_at_the_maximum_and_the_account_refused() {
    let e = engine();
    let pricey = ScopeKey::new(b"a", b"pricey");
    e.set_price(b"pricey", Variant::Regular, Price { generated: u64::MAX, ..Price::default() }).unwrap();
    // Some spend first, so that wrapping would land on a small number.
    run(&e, key("a"), 10, 0, 0);
    assert_eq!(spend(&e, "a"), 10);
    let late = *e.admit(key("a"), &Request::new(5), 0).unwrap().permit().unwrap();
    // Nothing reserved, then 10,000 generated tokens at u64::MAX µ$/M: the cost saturates.
    let d = e.admit(pricey, &Request::new(0), SECOND).unwrap();
    e.settle(d.permit().unwrap(), &Usage::new(0, 10_000), Completion::Success, SECOND).unwrap();
    let a = e.account(b"a").unwrap();
    assert_eq!((a.period_spend, a.historical_spend), (u64::MAX / 1_000, u64::MAX / 1_000));
    assert_eq!(a.refusal, Some(SpendRejection::SpendLimitExceeded));
    assert_eq!(run(&e, key("a"), 1, 0, 2 * SECOND), Outcome::RejectSpend(SpendRejection::SpendLimitExceeded));
    // Spend settled on top stays at the maximum.
    e.settle(&late, &Usage::new(5, 0), Completion::Success, 2 * SECOND).unwrap();
    assert_eq!(spend(&e, "a"), u64::MAX / 1_000);
}

#[test]
fn credits_near_the_maximum_saturate_instead_of_wrapping() {
    let e = engine();
    e.add_credits(b"a", u64::MAX / 1_000).unwrap();
    e.add_credits(b"a", u64::MAX / 1_000).unwrap();
    let a = e.account(b"a").unwrap();
    assert_eq!((a.credits, a.historical_spend, a.tier), (u64::MAX / 1_000, u64::MAX / 1_000, Tier::Four));
}

/// Sustained use at the limit for `minutes`, from minute `from`.
fn sustain(e: &Engine<Heap>, k: ScopeKey<'_>, from: u64, minutes: u64) {
    for minute in from..from + minutes {
        let rpm = e.limits(k, minute * MINUTE).unwrap().limit(Metric::Requests);
        for i in 0..rpm {
            run(e, k, 1, 0, minute * MINUTE + i * MINUTE / rpm);
        }
    }
}

#[test]
fn a_higher_tier_raises_ceilings_at_once_without_resetting_earned_limits() {
    let mut policy = Policy::fireworks_2024();
    policy.limits.0[0].ceiling = 100.0;
    let e = Engine::new(policy, Capacity::scopes(64)).unwrap();
    sustain(&e, key("a"), 0, 30);
    assert_eq!(e.limits(key("a"), 30 * MINUTE).unwrap().limit(Metric::Requests), 100);
    e.set_tier(b"a", Some(Tier::Two), 30 * MINUTE).unwrap();
    // Earned limit kept; the ceiling (now 200) lets it grow again from there.
    assert_eq!(e.limits(key("a"), 30 * MINUTE).unwrap().limit(Metric::Requests), 100);
    sustain(&e, key("a"), 30, 5);
    let grown = e.limits(key("a"), 35 * MINUTE).unwrap().limit(Metric::Requests);
    assert!(grown > 100 && grown <= 200, "{grown}");
    // Back to tier one: clamped to its ceiling at once.
    e.set_tier(b"a", Some(Tier::One), 35 * MINUTE).unwrap();
    assert_eq!(e.limits(key("a"), 35 * MINUTE).unwrap().limit(Metric::Requests), 100);
}

#[test]
fn an_override_gives_an_account_higher_limits_from_day_one() {
    let e = engine();
    let custom = MetricLimits { floor: 1_000.0, ceiling: 50_000.0 };
    e.set_limits_override(b"big", Metric::Requests, Some(custom), 0).unwrap();
    let l = e.limits(key("big"), 0).unwrap();
    assert_eq!((l.limit(Metric::Requests), l.remaining(Metric::Requests)), (1_000, 1_000));
    let admitted = (0..1_000).filter(|_| matches!(run(&e, key("big"), 0, 0, 0), Outcome::Admit(_))).count();
    assert_eq!(admitted, 1_000);
    // Other accounts keep the policy's floor.
    assert_eq!(e.limits(key("small"), 0).unwrap().limit(Metric::Requests), 60);
}

#[test]
fn an_override_on_a_live_scope_applies_at_once_and_keeps_the_bucket_level() {
    let e = engine();
    for _ in 0..30 {
        run(&e, key("a"), 0, 0, 0);
    }
    let custom = MetricLimits { floor: 600.0, ceiling: 600.0 };
    e.set_limits_override(b"a", Metric::Requests, Some(custom), 0).unwrap();
    let l = e.limits(key("a"), 0).unwrap();
    assert_eq!((l.limit(Metric::Requests), l.remaining(Metric::Requests)), (600, 30));
    assert_eq!(
        e.set_limits_override(b"a", Metric::Requests, Some(MetricLimits { floor: 9.0, ceiling: 1.0 }), 0),
        Err(Error::Policy(sluicegate_core::PolicyError::FloorAboveCeiling(Metric::Requests)))
    );
}

#[test]
fn spend_accounting_is_exact_to_the_micro_dollar_under_concurrency() {
    // Limits that never bind: this test is about spend, not admission (the threads' clocks
    // drift apart, so settled overruns would otherwise build real debt).
    let mut policy = Policy::fixed();
    policy.limits = sluicegate_core::PerMetric([MetricLimits::UNLIMITED; 4]);
    let threads = 4u64;
    let per_thread = 2_000u64;
    // A thread may run a whole run ahead of another (a loaded machine): a TTL longer than the
    // run keeps its sweeps from expiring a permit another thread holds between admit and settle.
    policy.permit_ttl_ns = 2 * per_thread * SECOND;
    let e = Engine::new(policy, Capacity::scopes(64)).unwrap();
    let price = Price { uncached_prompt: 1_234_567, cached_prompt: 345_678, generated: 9_876_543 };
    e.set_price(MODEL, Variant::Regular, price).unwrap();
    let expected_nanos: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let e = &e;
                s.spawn(move || {
                    let mut nanos = 0;
                    let k = ScopeKey::new(b"shared", MODEL);
                    for i in 0..per_thread {
                        let now = i * SECOND;
                        let p: Permit = *e.admit(k, &Request::new(0), now).unwrap().permit().unwrap();
                        let usage = Usage {
                            prompt_tokens: 37 + i % 11,
                            cached_tokens: i % 5,
                            generated_tokens: 3 + i % 7,
                        };
                        e.settle(&p, &usage, Completion::Success, now).unwrap();
                        let uncached = usage.prompt_tokens - usage.cached_tokens;
                        nanos += price.cost(uncached, usage.cached_tokens, usage.generated_tokens);
                    }
                    nanos
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(spend(&e, "shared"), expected_nanos / 1_000);
}

#[test]
fn quotas_have_the_published_defaults_and_are_acquired_and_released() {
    let e = engine();
    assert_eq!(e.acquire_quota(b"a", Quota::H100Gpus, 8), Ok((8, 8)));
    assert_eq!(
        e.acquire_quota(b"a", Quota::H100Gpus, 1),
        Err(Error::Quota(QuotaError::Exhausted { used: 8, limit: 8 }))
    );
    assert_eq!(e.release_quota(b"a", Quota::H100Gpus, 9), Err(Error::Quota(QuotaError::NotHeld { used: 8 })));
    assert_eq!(e.release_quota(b"a", Quota::H100Gpus, 3), Ok((5, 8)));
    assert_eq!(
        e.set_quota_limit(b"a", Quota::H100Gpus, 4),
        Err(Error::Quota(QuotaError::BelowUse { used: 5 }))
    );
    assert_eq!(e.set_quota_limit(b"a", Quota::H100Gpus, 64), Ok((5, 64)));
    assert_eq!(e.acquire_quota(b"a", Quota::H100Gpus, 59), Ok((64, 64)));
    let q = e.account(b"a").unwrap().quotas;
    assert_eq!(q, [(0, 100), (0, 8), (64, 64)]);
    // The names the C and Python surfaces and the CLI print, in the order of `quotas`.
    assert_eq!(Quota::ALL.map(Quota::name), ["deployed_models", "a100_gpus", "h100_gpus"]);
}

#[test]
fn spend_beyond_the_credits_adds_only_the_uncovered_part_to_history() {
    let e = engine();
    e.add_credits(b"a", 10_000).unwrap();
    run(&e, key("a"), 15_000, 0, 0);
    let a = e.account(b"a").unwrap();
    // $0.01 of credits bought, $0.015 spent: the credits pay $0.01, the other $0.005 is new history.
    assert_eq!((a.credits, a.period_spend, a.historical_spend), (0, 15_000, 15_000));
}

#[test]
fn a_restore_replaces_every_account() {
    let capacity = Capacity::scopes(64);
    let mut target = Engine::new(Policy::fireworks_2024(), capacity).unwrap();
    target.add_credits(b"stale", 5 * DOLLAR).unwrap();
    let source = Engine::new(Policy::fireworks_2024(), capacity).unwrap();
    source.add_credits(b"fresh", 7 * DOLLAR).unwrap();
    let mut buf = vec![0; source.snapshot_size()];
    let n = source.snapshot(&mut buf, 0).unwrap();
    target.restore(&buf[..n], 0).unwrap();
    assert_eq!(target.account(b"stale"), Err(Error::UnknownAccount));
    assert_eq!(target.account(b"fresh").unwrap().credits, 7 * DOLLAR);
}
