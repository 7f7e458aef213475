//! One test per rule of SPEC.md §1–§7, named after the rule.

use sluicegate_core::{
    Band, Capacity, Completion, Decision, Engine, Heap, InvalidRequest, Metric, MetricLimits, Outcome,
    Permit, Policy, Request, ScopeKey, ServiceTier, Usage, Variant,
};

const SECOND: u64 = 1_000_000_000;
const MINUTE: u64 = 60 * SECOND;

fn engine(policy: Policy) -> Engine<Heap> {
    // Some tests hold a thousand permits at once: room for them with headroom.
    Engine::new(policy, Capacity { permits: 4_096, ..Capacity::scopes(256) }).unwrap()
}

fn key(account: &str) -> ScopeKey<'_> {
    ScopeKey::new(account.as_bytes(), b"llama-v3p1-70b")
}

fn one() -> Request {
    Request::new(0)
}

fn admit(e: &Engine<Heap>, k: ScopeKey<'_>, r: &Request, now: u64) -> Decision {
    e.admit(k, r, now).unwrap()
}

fn permit(d: &Decision) -> Permit {
    *d.permit().unwrap_or_else(|| panic!("expected admission, got {:?}", d.outcome))
}

/// Admits `count` copies of `r` at `now`, returning how many of each outcome.
fn burst(e: &Engine<Heap>, k: ScopeKey<'_>, r: &Request, count: usize, now: u64) -> [usize; 4] {
    let mut tally = [0; 4]; // admit, over limit, 429, 503
    for _ in 0..count {
        match admit(e, k, r, now).outcome {
            Outcome::Admit(_) => tally[0] += 1,
            Outcome::AdmitOverLimit(_) => tally[1] += 1,
            Outcome::RejectRateLimited(_) => tally[2] += 1,
            Outcome::Shed(_) => tally[3] += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    tally
}

fn remaining(e: &Engine<Heap>, k: ScopeKey<'_>, m: Metric, now: u64) -> u64 {
    e.limits(k, now).unwrap().remaining(m)
}

fn limit(e: &Engine<Heap>, k: ScopeKey<'_>, m: Metric, now: u64) -> u64 {
    e.limits(k, now).unwrap().limit(m)
}

// §1 Scopes and keys

#[test]
fn limits_are_kept_per_account_and_per_model() {
    let e = engine(Policy::fixed());
    assert_eq!(burst(&e, key("a"), &one(), 61, 0), [60, 0, 1, 0]);
    assert_eq!(burst(&e, key("b"), &one(), 60, 0), [60, 0, 0, 0]);
    assert_eq!(burst(&e, ScopeKey::new(b"a", b"other-model"), &one(), 60, 0), [60, 0, 0, 0]);
}

#[test]
fn fast_and_regular_variants_have_separate_limits() {
    let e = engine(Policy::fixed());
    assert_eq!(burst(&e, key("a"), &one(), 60, 0), [60, 0, 0, 0]);
    assert_eq!(burst(&e, key("a").fast(), &one(), 60, 0), [60, 0, 0, 0]);
    assert_eq!(burst(&e, key("a").fast(), &one(), 1, 0), [0, 0, 1, 0]);
}

#[test]
fn every_service_tier_shares_the_same_limits() {
    let e = engine(Policy::fixed());
    e.set_service_tier_grant(b"a", ServiceTier::Priority).unwrap();
    assert_eq!(burst(&e, key("a"), &one().service_tier(ServiceTier::Priority), 20, 0), [20, 0, 0, 0]);
    assert_eq!(burst(&e, key("a"), &one().service_tier(ServiceTier::Flex), 10, 0), [10, 0, 0, 0]);
    assert_eq!(burst(&e, key("a"), &one(), 31, 0), [30, 0, 1, 0]);
}

#[test]
fn idle_scopes_equal_to_fresh_ones_are_reclaimed_when_the_table_is_full() {
    let e = Engine::new(Policy::fireworks_2024(), Capacity { scopes: 2, accounts: 8, models: 2, permits: 8 })
        .unwrap();
    for a in ["a", "b"] {
        let p = permit(&admit(&e, key(a), &Request::new(100), 0));
        e.settle(&p, &Usage::new(100, 0), Completion::Success, 0).unwrap();
    }
    // Both scopes have usage this tick: a third has no room.
    assert!(matches!(e.admit(key("c"), &one(), MINUTE / 2), Err(sluicegate_core::Error::TableFull(_))));
    // A day later both have decayed back to a fresh scope's state and can be reclaimed.
    let later = 24 * 60 * MINUTE;
    assert!(admit(&e, key("c"), &one(), later).admitted());
    assert!(admit(&e, key("d"), &one(), later).admitted());
}

#[test]
fn a_scope_that_remembers_recent_use_is_not_reclaimed() {
    let e =
        Engine::new(Policy::fireworks_2024(), Capacity { scopes: 2, accounts: 8, models: 2, permits: 128 })
            .unwrap();
    for a in ["a", "b"] {
        for _ in 0..40 {
            let p = permit(&admit(&e, key(a), &one(), 0));
            e.settle(&p, &Usage::new(0, 0), Completion::Success, 0).unwrap();
        }
    }
    // The minute's tick records each peak of 40 a minute.
    for a in ["a", "b"] {
        assert_eq!(limit(&e, key(a), Metric::Requests, MINUTE), 60);
    }
    // Minutes later both buckets are full and both limits at their floor (40 of 60 RPM holds),
    // but each remembers a peak of 40 a minute: 2 x 40 > 60 could hold a later limit above the
    // floor as it decays, so neither equals a fresh scope.
    let later = 3 * MINUTE;
    assert_eq!(limit(&e, key("a"), Metric::Requests, later), 60);
    assert!(matches!(e.admit(key("c"), &one(), later), Err(sluicegate_core::Error::TableFull(_))));
}

#[test]
fn a_scope_whose_limit_is_above_its_floor_is_not_reclaimed() {
    let e =
        Engine::new(Policy::fireworks_2024(), Capacity { scopes: 2, accounts: 8, models: 2, permits: 128 })
            .unwrap();
    let raised = MetricLimits { floor: 600.0, ceiling: 2_000.0 };
    for a in ["a", "b"] {
        e.set_limits_override(a.as_bytes(), Metric::Requests, Some(raised), 0).unwrap();
        let p = permit(&admit(&e, key(a), &one(), 0));
        e.settle(&p, &Usage::new(0, 0), Completion::Success, 0).unwrap();
        // Back to the policy's bounds: the limit of 600 decays from here, an hour a halving.
        e.set_limits_override(a.as_bytes(), Metric::Requests, None, 0).unwrap();
    }
    let later = 3 * MINUTE;
    assert!(limit(&e, key("a"), Metric::Requests, later) > 500);
    assert!(matches!(e.admit(key("c"), &one(), later), Err(sluicegate_core::Error::TableFull(_))));
}

#[test]
fn a_scope_with_a_live_permit_outstanding_is_never_reclaimed() {
    let e = Engine::new(Policy::fixed(), Capacity { scopes: 1, accounts: 4, models: 1, permits: 4 }).unwrap();
    let p = permit(&admit(&e, key("a"), &one(), 0));
    assert!(e.admit(key("b"), &one(), 14 * MINUTE).is_err());
    e.settle(&p, &Usage::default(), Completion::Success, 14 * MINUTE).unwrap();
}

#[test]
fn an_expired_permit_no_longer_holds_its_scope() {
    let e = Engine::new(Policy::fixed(), Capacity { scopes: 1, accounts: 4, models: 1, permits: 4 }).unwrap();
    let p = permit(&admit(&e, key("a"), &one(), 0));
    // Past the 15-minute permit_ttl, "b" may take the slot: "a"'s permit expired.
    assert!(admit(&e, key("b"), &one(), 16 * MINUTE).admitted());
    let late = e.settle(&p, &Usage::default(), Completion::Success, 16 * MINUTE);
    assert_eq!(late, Err(sluicegate_core::SettleError::Expired));
}

// §2 Metrics

#[test]
fn n_counts_as_n_requests() {
    let e = engine(Policy::fixed());
    assert!(admit(&e, key("a"), &one().n(59), 0).admitted());
    assert_eq!(remaining(&e, key("a"), Metric::Requests, 0), 1);
    assert!(!admit(&e, key("a"), &one().n(2), 0).admitted());
}

#[test]
fn prompt_tokens_count_cached_and_uncached_and_uncached_counts_the_estimate() {
    let e = engine(Policy::fixed());
    admit(&e, key("a"), &Request::new(1_000).cached_tokens(600), 0);
    let l = e.limits(key("a"), 0).unwrap();
    assert_eq!(l.remaining(Metric::PromptTokens), 59_000);
    assert_eq!(l.remaining(Metric::UncachedPromptTokens), 59_600);
}

#[test]
fn generated_reservation_is_n_times_min_of_max_tokens_and_estimate() {
    let e = engine(Policy::fixed());
    admit(&e, key("a"), &one().max_tokens(500).n(2), 0);
    assert_eq!(remaining(&e, key("a"), Metric::GeneratedTokens, 0), 5_000);
    admit(&e, key("b"), &one().max_tokens(500).expected_tokens(100).n(3), 0);
    assert_eq!(remaining(&e, key("b"), Metric::GeneratedTokens, 0), 5_700);
}

#[test]
fn fireworks_presets_have_the_published_floors() {
    let floors = |p: Policy| p.limits.map(|_, l| l.floor).0;
    assert_eq!(floors(Policy::fireworks_2024())[..2], [60.0, 60_000.0]);
    assert_eq!(floors(Policy::fireworks_2024())[3], 6_000.0);
    assert_eq!(floors(Policy::fireworks_2026())[1..], [3_600_000.0, 900_000.0, 36_000.0]);
    let e = engine(Policy::fireworks_2026());
    // No request metric in 2026: many small requests pass, tokens are what binds.
    assert_eq!(burst(&e, key("a"), &one(), 1_000, 0), [1_000, 0, 0, 0]);
    assert_eq!(limit(&e, key("a"), Metric::GeneratedTokens, 0), 36_000);
}

// §3 Windows: continuously refilled buckets

#[test]
fn a_new_scope_starts_with_full_buckets() {
    let e = engine(Policy::fireworks_2024());
    let l = e.limits(key("new"), 0).unwrap();
    assert_eq!(Metric::ALL.map(|m| l.remaining(m)), [60, 60_000, 60_000, 6_000]);
    assert_eq!(burst(&e, key("new"), &one(), 60, 0), [60, 0, 0, 0]);
}

#[test]
fn buckets_refill_continuously_with_no_burst_at_window_boundaries() {
    let e = engine(Policy::fixed());
    assert_eq!(burst(&e, key("a"), &one(), 60, 0), [60, 0, 0, 0]);
    // Half a minute later exactly half the bucket is back, not nothing and not all of it.
    assert_eq!(remaining(&e, key("a"), Metric::Requests, 30 * SECOND), 30);
    assert_eq!(burst(&e, key("a"), &one(), 31, 30 * SECOND), [30, 0, 1, 0]);
    // At what a fixed window would call a new minute, there is no second full burst.
    assert_eq!(burst(&e, key("a"), &one(), 60, MINUTE), [30, 0, 30, 0]);
}

#[test]
fn a_limit_change_keeps_the_level_and_refills_at_the_new_rate() {
    let e = engine(Policy::fireworks_2024());
    for i in 0..60 {
        let p = permit(&admit(&e, key("a"), &one(), i * SECOND));
        e.settle(&p, &Usage::default(), Completion::Success, i * SECOND).unwrap();
    }
    // The tick at one minute grows the limit to 60·2^(1/10) ≈ 64; the level stays where it was.
    let at_tick = e.limits(key("a"), MINUTE).unwrap();
    assert_eq!(at_tick.limit(Metric::Requests), 64);
    let level = at_tick.remaining(Metric::Requests);
    assert!(level < 64, "level {level} must not jump to the new capacity");
    // It refills at 64.3/min: from `level` to full takes (64.3 − level)/64.3 minutes.
    let to_full = (64.306 - level as f64) / 64.306 * 60.0;
    let later = MINUTE + ((to_full + 0.5) * SECOND as f64) as u64;
    assert_eq!(remaining(&e, key("a"), Metric::Requests, later), 64);
}

// §4 Decision bands

#[test]
fn within_every_limit_a_request_is_admitted_normally() {
    let e = engine(Policy::fireworks_2024());
    let d = admit(&e, key("a"), &Request::new(1_000).max_tokens(100), 0);
    assert!(matches!(d.outcome, Outcome::Admit(_)));
    assert!(!permit(&d).over_limit());
    assert_eq!(d.levels.remaining(Metric::Requests), 59);
}

#[test]
fn over_the_limit_requests_run_at_lower_priority_until_the_hard_band() {
    let e = engine(Policy::fireworks_2024());
    assert_eq!(burst(&e, key("a"), &one(), 121, 0), [60, 60, 1, 0]);
    let d = admit(&e, key("a"), &one(), 0);
    let Outcome::RejectRateLimited(r) = d.outcome else { panic!("{:?}", d.outcome) };
    assert_eq!(r.metric, Metric::Requests);
    assert!(r.metric.is_request_limited());
}

#[test]
fn with_hard_factor_one_there_is_no_over_limit_band() {
    let mut p = Policy::fireworks_2024();
    p.hard_factor = 1.0;
    let e = engine(p);
    assert_eq!(burst(&e, key("a"), &one(), 61, 0), [60, 0, 1, 0]);
}

#[test]
fn a_token_limit_binds_as_token_limited() {
    let e = engine(Policy::fireworks_2024());
    assert!(admit(&e, key("a"), &Request::new(100_000), 0).admitted());
    let Outcome::RejectRateLimited(r) = admit(&e, key("a"), &Request::new(30_000), 0).outcome else {
        panic!()
    };
    assert_eq!(r.metric, Metric::PromptTokens);
    assert!(!r.metric.is_request_limited());
}

#[test]
fn rejected_requests_are_charged_nothing_on_any_metric() {
    let e = engine(Policy::fixed());
    admit(&e, key("a"), &Request::new(1_000).max_tokens(5_900), 0);
    let before = e.limits(key("a"), 0).unwrap();
    // Fits requests and prompt tokens but not generated tokens: nothing is charged anywhere.
    let d = admit(&e, key("a"), &Request::new(1_000).max_tokens(200), 0);
    assert!(matches!(d.outcome, Outcome::RejectRateLimited(r) if r.metric == Metric::GeneratedTokens));
    assert_eq!(e.limits(key("a"), 0).unwrap(), before);
}

#[test]
fn a_request_larger_than_the_hard_band_says_it_can_never_fit() {
    let e = engine(Policy::fireworks_2024());
    let Outcome::RejectRateLimited(r) = admit(&e, key("a"), &one().max_tokens(12_001), 0).outcome else {
        panic!()
    };
    assert!(r.too_large);
    assert_eq!(r.metric, Metric::GeneratedTokens);
    assert!(admit(&e, key("a"), &one().max_tokens(12_000), 0).admitted());
}

#[test]
fn zero_token_requests_pass_token_metrics_but_count_on_requests() {
    let e = engine(Policy::fixed());
    assert!(admit(&e, key("a"), &Request::new(60_000).max_tokens(6_000), 0).admitted());
    assert_eq!(burst(&e, key("a"), &one(), 60, 0), [59, 0, 1, 0]);
}

#[test]
fn malformed_requests_are_rejected_as_invalid() {
    let e = engine(Policy::fixed());
    let invalid = |r: Request| admit(&e, key("a"), &r, 0).outcome;
    assert_eq!(invalid(one().n(0)), Outcome::RejectInvalid(InvalidRequest::ZeroN));
    assert_eq!(
        invalid(Request::new(5).cached_tokens(6)),
        Outcome::RejectInvalid(InvalidRequest::CachedExceedsPrompt)
    );
    assert_eq!(invalid(one().n(u64::MAX).max_tokens(2)), Outcome::RejectInvalid(InvalidRequest::Overflow));
}

#[test]
fn retry_after_is_the_real_time_until_the_request_fits() {
    let e = engine(Policy::fixed());
    let big = Request::new(0).max_tokens(3_000);
    assert!(admit(&e, key("a"), &big, 0).admitted());
    assert!(admit(&e, key("a"), &Request::new(0).max_tokens(2_500), 0).admitted());
    let d = admit(&e, key("a"), &big, 0);
    let retry = d.retry_after_ns().unwrap();
    // 500 tokens left; 2,500 more must refill at 100/s: 25 s, not the window length.
    assert_eq!(retry, 25 * SECOND);
    assert!(!admit(&e, key("a"), &big, retry - 1_000_000).admitted());
    assert!(admit(&e, key("a"), &big, retry).admitted());
}

#[test]
fn smoothing_admits_with_a_wait_what_would_otherwise_be_rejected() {
    let e = engine(Policy::together());
    assert_eq!(burst(&e, key("a"), &one(), 60, 0), [60, 0, 0, 0]);
    // Two more requests fit within the 2 s smoothing wait: reserved in the future, delayed.
    let first = permit(&admit(&e, key("a"), &one(), 0));
    let second = permit(&admit(&e, key("a"), &one(), 0));
    assert_eq!((first.wait_ns(), second.wait_ns()), (SECOND, 2 * SECOND));
    assert_eq!(first.band(), Band::Normal);
    let Outcome::RejectRateLimited(r) = admit(&e, key("a"), &one(), 0).outcome else { panic!() };
    assert_eq!(r.retry_after_ns, 3 * SECOND);
}

// §5 Adaptation

/// Demand of `factor` × the current limit every minute, settled in full; the limits at each
/// minute boundary.
fn sustained(e: &Engine<Heap>, k: ScopeKey<'_>, factor: f64, minutes: u64) -> Vec<[u64; 4]> {
    let mut seen = Vec::new();
    for minute in 0..=minutes {
        let start = minute * MINUTE;
        let l = e.limits(k, start).unwrap();
        seen.push(Metric::ALL.map(|m| l.limit(m)));
        let demand = (l.limit(Metric::Requests) as f64 * factor).ceil() as u64;
        for i in 0..demand {
            let now = start + i * MINUTE / demand;
            if let Some(p) = e.admit(k, &Request::new(1_000).max_tokens(100), now).unwrap().permit() {
                e.settle(p, &Usage::new(1_000, 100), Completion::Success, now).unwrap();
            }
        }
    }
    seen
}

fn within_one_percent(got: u64, want: u64) -> bool {
    (got as f64 - want as f64).abs() <= want as f64 * 0.01
}

#[test]
fn ramp_reaches_120_720_and_1440_rpm_at_10_minutes_1_hour_and_2_hours() {
    let e = engine(Policy::fireworks_2024());
    let seen = sustained(&e, key("a"), 1.0, 120);
    let published = [(0, 60), (10, 120), (60, 720), (120, 1_440)];
    for (minute, rpm) in published {
        let [r, p, _, g] = seen[minute];
        assert!(within_one_percent(r, rpm), "minute {minute}: {r} RPM, published {rpm}");
        assert!(within_one_percent(p, rpm * 1_000), "minute {minute}: {p} prompt TPM");
        assert!(within_one_percent(g, rpm * 100), "minute {minute}: {g} generated TPM");
    }
}

#[test]
fn idle_limits_decay_back_to_the_floor() {
    let e = engine(Policy::fireworks_2024());
    sustained(&e, key("a"), 1.0, 60);
    // κ = 2 × the last hour's peak holds the limit through the first idle hour ...
    assert!(limit(&e, key("a"), Metric::Requests, 121 * MINUTE) >= 700);
    // ... then it halves every hour, down to the floor.
    let two_hours_idle = limit(&e, key("a"), Metric::Requests, 181 * MINUTE);
    assert!((300..=420).contains(&two_hours_idle), "{two_hours_idle}");
    assert_eq!(limit(&e, key("a"), Metric::Requests, 12 * 60 * MINUTE), 60);
}

#[test]
fn ramping_faster_than_the_limit_grows_gives_over_limit_then_429() {
    let e = engine(Policy::fireworks_2024());
    let mut first_over_limit = None;
    let mut first_429 = None;
    for minute in 0..30u64 {
        let demand = 60 * 2u64.pow((minute / 5) as u32); // doubling every 5 minutes
        for i in 0..demand {
            let now = minute * MINUTE + i * MINUTE / demand;
            match e.admit(key("a"), &one(), now).unwrap().outcome {
                Outcome::AdmitOverLimit(p) => {
                    first_over_limit.get_or_insert(minute);
                    e.settle(&p, &Usage::default(), Completion::Success, now).unwrap();
                }
                Outcome::Admit(p) => e.settle(&p, &Usage::default(), Completion::Success, now).unwrap(),
                Outcome::RejectRateLimited(_) => {
                    first_429.get_or_insert(minute);
                }
                other => panic!("{other:?}"),
            }
        }
    }
    let (over, rejected) = (first_over_limit.unwrap(), first_429.unwrap());
    assert!(over <= rejected, "over-limit at {over} must come no later than 429 at {rejected}");
}

#[test]
fn limits_hold_instead_of_growing_while_the_model_is_loaded() {
    let e = engine(Policy::fireworks_2024());
    e.set_load(b"llama-v3p1-70b", Variant::Regular, 1_000).unwrap();
    e.set_service_tier_grant(b"a", ServiceTier::Priority).unwrap();
    // In-limit default traffic is shed at this load; priority traffic runs and would grow limits.
    for i in 0..60 {
        let p = permit(&admit(&e, key("a"), &one().service_tier(ServiceTier::Priority), i * SECOND));
        e.settle(&p, &Usage::default(), Completion::Success, i * SECOND).unwrap();
    }
    assert_eq!(limit(&e, key("a"), Metric::Requests, MINUTE), 60);
    e.set_load(b"llama-v3p1-70b", Variant::Regular, 0).unwrap();
    for i in 0..60 {
        let p = permit(&admit(&e, key("b"), &one(), i * SECOND));
        e.settle(&p, &Usage::default(), Completion::Success, i * SECOND).unwrap();
    }
    assert_eq!(limit(&e, key("b"), Metric::Requests, MINUTE), 64);
}

#[test]
fn upstream_failures_do_not_count_toward_growth() {
    let e = engine(Policy::fireworks_2024());
    for i in 0..60 {
        let p = permit(&admit(&e, key("a"), &one(), i * SECOND));
        e.settle(&p, &Usage::default(), Completion::UpstreamFailure, i * SECOND).unwrap();
    }
    assert_eq!(limit(&e, key("a"), Metric::Requests, MINUTE), 60);
}

#[test]
fn the_fixed_policy_never_adapts() {
    let e = engine(Policy::fixed());
    sustained(&e, key("a"), 2.0, 30);
    assert_eq!(limit(&e, key("a"), Metric::Requests, 31 * MINUTE), 60);
}

#[test]
fn together_grows_at_most_twofold_per_hour_of_successful_use() {
    let e = engine(Policy::together());
    let seen = sustained(&e, key("a"), 1.5, 60);
    // Twice the floor after an hour, within 5% (the first minute's full bucket counts as use).
    let after_an_hour = seen[60][0];
    assert!((114..=126).contains(&after_an_hour), "{after_an_hour}");
}

#[test]
fn missed_ticks_are_caught_up_by_the_next_caller_in_one_step() {
    let e = engine(Policy::fireworks_2024());
    sustained(&e, key("a"), 1.0, 60);
    // One call five hours later applies 300 missed ticks of decay at once.
    let l = limit(&e, key("a"), Metric::Requests, 65 * 60 * MINUTE);
    assert_eq!(l, 60);
}

// §6 Load shedding and priority

#[test]
fn overload_sheds_six_classes_flex_first_and_in_limit_priority_last() {
    let model = b"llama-v3p1-70b";
    // [over-limit flex, in-limit flex, over-limit default, over-limit priority, in-limit default,
    // in-limit priority], each account granted priority and asking for its tier.
    let classes = |load: u32| {
        let e = engine(Policy::fireworks_2024());
        let shed = |d: Decision| matches!(d.outcome, Outcome::Shed(_));
        let ask = |tier| one().service_tier(tier);
        for name in ["in-f", "in-d", "in-p", "over-f", "over-d", "over-p"] {
            e.set_service_tier_grant(name.as_bytes(), ServiceTier::Priority).unwrap();
        }
        for name in ["over-f", "over-d", "over-p"] {
            burst(&e, key(name), &one(), 60, 0);
        }
        e.set_load(model, Variant::Regular, load).unwrap();
        [
            shed(admit(&e, key("over-f"), &ask(ServiceTier::Flex), 0)),
            shed(admit(&e, key("in-f"), &ask(ServiceTier::Flex), 0)),
            shed(admit(&e, key("over-d"), &ask(ServiceTier::Default), 0)),
            shed(admit(&e, key("over-p"), &ask(ServiceTier::Priority), 0)),
            shed(admit(&e, key("in-d"), &ask(ServiceTier::Default), 0)),
            shed(admit(&e, key("in-p"), &ask(ServiceTier::Priority), 0)),
        ]
    };
    assert_eq!(classes(0), [false; 6]);
    assert_eq!(classes(599), [false; 6]);
    for (shed_classes, load) in [600, 700, 800, 900, 1_000, 1_200].into_iter().enumerate() {
        let want: [bool; 6] = std::array::from_fn(|c| c <= shed_classes);
        assert_eq!(classes(load), want, "load {load}");
        let below: [bool; 6] = std::array::from_fn(|c| c < shed_classes);
        assert_eq!(classes(load - 1), below, "load {}", load - 1);
    }
}

#[test]
fn a_request_is_served_at_the_lower_of_its_tier_and_its_accounts_grant() {
    let model = b"llama-v3p1-70b";
    let e = engine(Policy::fireworks_2024());
    // In-limit default is shed at 1.0, in-limit priority at 1.2, in-limit flex at 0.7.
    e.set_load(model, Variant::Regular, 1_000).unwrap();
    let served = |account: &str, tier| {
        let d = admit(&e, key(account), &one().service_tier(tier), 0);
        d.permit().map(|p| p.service_tier())
    };
    // Never granted: asking for priority is served at default, and shed at 1.0 as default is.
    assert_eq!(served("plain", ServiceTier::Priority), None);
    assert_eq!(e.account(b"plain").unwrap().service_tier_grant, ServiceTier::Default);
    e.set_service_tier_grant(b"plain", ServiceTier::Priority).unwrap();
    assert_eq!(served("plain", ServiceTier::Priority), Some(ServiceTier::Priority));
    // Asking for less than the grant is served at what was asked.
    assert_eq!(served("plain", ServiceTier::Default), None);
    // A flex grant caps every ask at flex: at 0.65 flex in limit runs, default would too.
    e.set_service_tier_grant(b"batch", ServiceTier::Flex).unwrap();
    e.set_load(model, Variant::Regular, 650).unwrap();
    assert_eq!(served("batch", ServiceTier::Priority), Some(ServiceTier::Flex));
    e.set_load(model, Variant::Regular, 700).unwrap();
    assert_eq!(served("batch", ServiceTier::Priority), None);
    assert_eq!(served("other", ServiceTier::Priority), Some(ServiceTier::Default));
    // The grant is kept by a snapshot, and a grant back to default is a grant like any other.
    let mut buf = vec![0; e.snapshot_size()];
    let n = e.snapshot(&mut buf, 0).unwrap();
    let mut restored = engine(Policy::fireworks_2024());
    restored.restore(&buf[..n], 0).unwrap();
    assert_eq!(restored.account(b"batch").unwrap().service_tier_grant, ServiceTier::Flex);
    assert_eq!(restored.account(b"plain").unwrap().service_tier_grant, ServiceTier::Priority);
    restored.set_service_tier_grant(b"plain", ServiceTier::Default).unwrap();
    assert_eq!(restored.account(b"plain").unwrap().service_tier_grant, ServiceTier::Default);
}

#[test]
fn together_answers_503_at_or_below_the_dynamic_rate_and_429_above_it() {
    let e = engine(Policy::together());
    e.set_load(b"llama-v3p1-70b", Variant::Regular, 1_000).unwrap();
    assert!(matches!(admit(&e, key("a"), &one(), 0).outcome, Outcome::Shed(_)));
    e.set_load(b"llama-v3p1-70b", Variant::Regular, 0).unwrap();
    assert_eq!(burst(&e, key("a"), &one(), 62, 0), [62, 0, 0, 0]);
    e.set_load(b"llama-v3p1-70b", Variant::Regular, 1_000).unwrap();
    assert!(matches!(admit(&e, key("a"), &one(), 0).outcome, Outcome::RejectRateLimited(_)));
}

#[test]
fn shed_requests_are_charged_nothing_and_do_not_count_toward_growth() {
    let e = engine(Policy::fireworks_2024());
    e.set_load(b"llama-v3p1-70b", Variant::Regular, 1_500).unwrap();
    let before = e.limits(key("a"), 0).unwrap();
    assert_eq!(burst(&e, key("a"), &one(), 100, 0), [0, 0, 0, 100]);
    assert_eq!(e.limits(key("a"), 0).unwrap(), before);
    e.set_load(b"llama-v3p1-70b", Variant::Regular, 0).unwrap();
    assert_eq!(limit(&e, key("a"), Metric::Requests, MINUTE), 60);
}

#[test]
fn in_flight_load_is_tracked_when_the_model_declares_its_capacity() {
    let e = engine(Policy::fixed());
    let model = b"llama-v3p1-70b";
    e.set_model_capacity(model, Variant::Regular, 2).unwrap();
    let a = permit(&admit(&e, key("a"), &one(), 0));
    let _b = permit(&admit(&e, key("b"), &one(), 0));
    assert_eq!(e.load(model, Variant::Regular).unwrap(), 1_000);
    assert!(matches!(admit(&e, key("c"), &one(), 0).outcome, Outcome::Shed(_)));
    e.settle(&a, &Usage::default(), Completion::Success, 0).unwrap();
    assert_eq!(e.load(model, Variant::Regular).unwrap(), 500);
    assert!(admit(&e, key("c"), &one(), 0).admitted());
}

// §7 Reserve, then settle

#[test]
fn settle_refunds_the_unused_reservation() {
    let e = engine(Policy::fixed());
    let p = permit(&admit(&e, key("a"), &Request::new(2_000).max_tokens(3_000), 0));
    assert_eq!(remaining(&e, key("a"), Metric::GeneratedTokens, 0), 3_000);
    e.settle(&p, &Usage::new(1_500, 500), Completion::Success, 0).unwrap();
    let l = e.limits(key("a"), 0).unwrap();
    assert_eq!(l.remaining(Metric::GeneratedTokens), 5_500);
    assert_eq!(l.remaining(Metric::PromptTokens), 58_500);
    // Requests are never corrected.
    assert_eq!(l.remaining(Metric::Requests), 59);
}

#[test]
fn refunds_are_capped_at_capacity() {
    let e = engine(Policy::fixed());
    let p = permit(&admit(&e, key("a"), &one().max_tokens(3_000), 0));
    e.settle(&p, &Usage::new(0, 0), Completion::Success, 50 * SECOND).unwrap();
    assert_eq!(remaining(&e, key("a"), Metric::GeneratedTokens, 50 * SECOND), 6_000);
}

#[test]
fn extra_usage_pushes_the_bucket_into_debt() {
    let e = engine(Policy::fixed());
    let p = permit(&admit(&e, key("a"), &one().max_tokens(100), 0));
    e.settle(&p, &Usage::new(0, 9_000), Completion::Success, 0).unwrap();
    assert_eq!(remaining(&e, key("a"), Metric::GeneratedTokens, 0), 0);
    // 3,000 tokens of debt at 100/s: a one-token request waits 30 s and more.
    let d = admit(&e, key("a"), &one().max_tokens(1), 0);
    assert_eq!(d.retry_after_ns(), Some(30 * SECOND + 10_000_000));
}

#[test]
fn settle_twice_is_an_error_that_changes_nothing() {
    let e = engine(Policy::fixed());
    let p = permit(&admit(&e, key("a"), &one().max_tokens(1_000), 0));
    e.settle(&p, &Usage::new(0, 10), Completion::Success, 0).unwrap();
    let before = e.limits(key("a"), 0).unwrap();
    assert_eq!(
        e.settle(&p, &Usage::new(0, 0), Completion::Success, 0),
        Err(sluicegate_core::SettleError::AlreadySettled)
    );
    assert_eq!(e.limits(key("a"), 0).unwrap(), before);
}

#[test]
fn streams_charge_incrementally_and_settle_at_the_end() {
    let e = engine(Policy::fixed());
    let p = permit(&admit(&e, key("a"), &one().max_tokens(1_000), 0));
    e.charge(&p, 600, 0).unwrap();
    assert_eq!(remaining(&e, key("a"), Metric::GeneratedTokens, 0), 5_000);
    e.charge(&p, 700, 0).unwrap(); // 1,300 so far: 300 beyond the reservation, charged now
    assert_eq!(remaining(&e, key("a"), Metric::GeneratedTokens, 0), 4_700);
    e.settle(&p, &Usage::new(0, 1_300), Completion::Success, 0).unwrap();
    assert_eq!(remaining(&e, key("a"), Metric::GeneratedTokens, 0), 4_700);
    assert_eq!(e.charge(&p, 1, 0), Err(sluicegate_core::SettleError::AlreadySettled));
}

#[test]
fn a_cancelled_request_settles_with_what_it_used() {
    let e = engine(Policy::fixed());
    let p = permit(&admit(&e, key("a"), &one().max_tokens(2_000), 0));
    e.cancel(&p, &Usage::new(0, 250), 0).unwrap();
    assert_eq!(remaining(&e, key("a"), Metric::GeneratedTokens, 0), 5_750);
}

#[test]
fn querying_an_unknown_scope_reports_the_floors_and_creates_nothing() {
    let e = Engine::new(Policy::fixed(), Capacity { scopes: 1, accounts: 1, models: 1, permits: 4 }).unwrap();
    let l = e.limits(ScopeKey::new(b"nobody", b"no-model"), 0).unwrap();
    assert_eq!((l.limit(Metric::Requests), l.remaining(Metric::Requests)), (60, 60));
    // The one account, model and scope slot are still free for real traffic.
    assert!(admit(&e, key("a"), &one(), 0).admitted());
}

/// Nor does querying a pair whose account and model both exist: no scope is made for it.
#[test]
fn querying_an_unknown_pair_of_known_keys_creates_no_scope() {
    let e = engine(Policy::fixed());
    assert!(admit(&e, ScopeKey::new(b"a", b"m1"), &one(), 0).admitted());
    assert!(admit(&e, ScopeKey::new(b"b", b"m2"), &one(), 0).admitted());
    let before = e.snapshot_size();
    let l = e.limits(ScopeKey::new(b"a", b"m2"), 0).unwrap();
    assert_eq!((l.limit(Metric::Requests), l.remaining(Metric::Requests)), (60, 60));
    assert_eq!(e.snapshot_size(), before, "nothing new to snapshot");
}

#[test]
fn a_clock_going_back_days_never_refills_a_bucket() {
    let e = engine(Policy::fixed());
    let later = 3 * 24 * 60 * MINUTE;
    assert_eq!(burst(&e, key("a"), &one(), 61, later), [60, 0, 1, 0]);
    // Two days back: far beyond what the bucket word's epoch tag can tell apart.
    for back in [MINUTE, 24 * 60 * MINUTE, 2 * 24 * 60 * MINUTE, later] {
        assert_eq!(burst(&e, key("a"), &one(), 1, later - back), [0, 0, 1, 0], "{back} ns back");
    }
}

/// A clock a few minutes back is read at the last tick applied, not later: drained at minute
/// 15, nothing is admitted at minute 10.
#[test]
fn a_clock_going_back_minutes_is_read_at_the_last_tick() {
    let e = engine(Policy::fixed());
    assert_eq!(burst(&e, key("a"), &one(), 61, 15 * MINUTE), [60, 0, 1, 0]);
    assert_eq!(burst(&e, key("a"), &one(), 1, 10 * MINUTE), [0, 0, 1, 0]);
}

#[test]
fn under_fixed_an_override_takes_its_floor_at_once() {
    let e = engine(Policy::fixed());
    assert!(admit(&e, key("a"), &one(), 0).admitted());
    let bounds = MetricLimits { floor: 30.0, ceiling: 600.0 };
    e.set_limits_override(b"a", Metric::Requests, Some(bounds), 0).unwrap();
    // Not the old 60 clamped into 30..=600 until the next tick: a plain limiter's limit is its floor.
    assert_eq!(limit(&e, key("a"), Metric::Requests, 0), 30);
    assert_eq!(limit(&e, key("a"), Metric::Requests, 5 * MINUTE), 30);
}
