//! The engine against the reference model (`tests/suite/model/`) on the same random operation
//! sequences: outcomes must agree, and levels and limits may differ only by the documented
//! rounding. `SLUICEGATE_DIFF_CASES` and `SLUICEGATE_DIFF_OPS` run more and longer cases.

use crate::model;
use crate::model::{
    Adapt, Config, Key, METRICS, MINUTE, Model, Outcome, QuotaCall, QuotaResult, SECOND, SettleResult,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunConfig, TestRunner};
use sluicegate_core::{
    Adaptation, Capacity, Completion, Engine, Error, Metric, MetricLimits, Outcome as EngineOutcome, Permit,
    Policy, Quota, QuotaError, Request, ScopeKey, ServiceTier, SettleError, Tier, Usage, Variant,
};

/// Debts below this are exact in the engine's bucket word (`bucket::MAX_HORIZON_Q`).
const EXACT_RANGE_US: u64 = sluicegate_core::bucket::MAX_HORIZON_Q;
const ACCOUNTS: [&[u8]; 3] = [b"acct-a", b"acct-b", b"acct-c"];
const MODELS: [&[u8]; 2] = [b"llama", b"qwen"];
/// Spend refusals the engine and the model agreed on, over the whole run: the distribution must
/// reach them.
static SPEND_REFUSALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[derive(Clone, Debug)]
enum Op {
    Admit { key: usize, prompt: u64, cached_pct: u64, max_tokens: u64, n: u64, tier: usize },
    Settle { which: usize, pct: u64, failed: bool },
    Charge { which: usize, tokens: u64 },
    Cancel { which: usize, pct: u64 },
    Step { us: u64 },
    StepBack { ms: u64 },
    SetLoad { model: usize, fast: bool, permille: u64 },
    SetTier { account: usize, tier: Option<usize> },
    SetGrant { account: usize, tier: usize },
    Override { account: usize, metric: usize, bounds: Option<(f64, f64)> },
    Restore,
    Quota { account: usize, quota: usize, call: QuotaCall },
    SetPrice { model: usize, fast: bool, price: [u64; 3] },
    SetSpendLimit { account: usize, micros: u64 },
    StartBillingPeriod,
}

fn tokens() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..2_000, 2 => 2_000u64..200_000, 1 => Just(0), 1 => 1u64 << 20..1u64 << 40, 1 => Just(u64::MAX)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..12, tokens(), 0u64..=100, tokens(), prop_oneof![8 => Just(1u64), 1 => 2u64..5, 1 => Just(0)], 0usize..3)
            .prop_map(|(key, prompt, cached_pct, max_tokens, n, tier)| Op::Admit { key, prompt, cached_pct, max_tokens, n, tier }),
        3 => (any::<usize>(), prop_oneof![4 => 0u64..300, 1 => 300u64..1_000_000], any::<bool>()).prop_map(|(which, pct, failed)| Op::Settle { which, pct, failed }),
        1 => (any::<usize>(), 0u64..20_000).prop_map(|(which, tokens)| Op::Charge { which, tokens }),
        1 => (any::<usize>(), 0u64..100).prop_map(|(which, pct)| Op::Cancel { which, pct }),
        // Log-uniform steps from 1 µs to 3 days: long, sparse stretches are part of every run.
        4 => (0u32..=37).prop_flat_map(|bits| (1u64 << bits)..=(1u64 << (bits + 1)).min(259_200_000_000)).prop_map(|us| Op::Step { us }),
        1 => (0u64..5_000).prop_map(|ms| Op::StepBack { ms }),
        1 => (0usize..2, any::<bool>(), prop::sample::select(vec![0u64, 500, 850, 950, 1_100, 1_300]))
            .prop_map(|(model, fast, permille)| Op::SetLoad { model, fast, permille }),
        1 => (0usize..3, prop::option::of(0usize..5)).prop_map(|(account, tier)| Op::SetTier { account, tier }),
        1 => (0usize..3, 0usize..3).prop_map(|(account, tier)| Op::SetGrant { account, tier }),
        1 => (0usize..3, 0usize..METRICS, prop::option::of((prop::sample::select(vec![30.0, 600.0, 6_000.0, 120_000.0]), 1.0f64..4.0)))
            .prop_map(|(account, metric, b)| Op::Override { account, metric, bounds: b.map(|(f, k)| (f, (f * k).round())) }),
        1 => Just(Op::Restore),
        // Prices of a few µ$ per million tokens: limits of a few µ$ bind, and no account ever
        // spends the $100 that would earn it Tier 2 (these accounts stay at their pinned tier).
        1 => (0usize..2, any::<bool>(), [0u64..=5, 0u64..=5, 0u64..=5]).prop_map(|(model, fast, price)| Op::SetPrice { model, fast, price }),
        1 => (0usize..3, prop::sample::select(vec![0u64, 1, 5, 50, 1_000_000])).prop_map(|(account, micros)| Op::SetSpendLimit { account, micros }),
        1 => Just(Op::StartBillingPeriod),
        1 => (0usize..3, 0usize..3, prop_oneof![
                Just(0u32), 1u32..10, Just(u32::MAX)
            ], 0u8..3)
            .prop_map(|(account, quota, n, kind)| {
                let call = match kind {
                    0 => QuotaCall::Acquire(n),
                    1 => QuotaCall::Release(n),
                    _ => QuotaCall::SetLimit(n),
                };
                Op::Quota { account, quota, call }
            }),
    ]
}

fn policy() -> impl Strategy<Value = (Policy, Adapt)> {
    prop_oneof![
        Just(1.0f64).prop_map(|rho| {
            let mut p = Policy::fixed();
            p.hard_factor = rho;
            (p, Adapt::Fixed)
        }),
        Just(2.0f64).prop_map(|rho| {
            let mut p = Policy::fixed();
            p.hard_factor = rho;
            p.permit_ttl_ns = 90 * SECOND;
            (p, Adapt::Fixed)
        }),
        Just((Policy::fireworks_2024(), Adapt::Threshold)),
        Just((Policy::fireworks_2026(), Adapt::Threshold)),
        Just(Policy::together()).prop_map(|p| {
            let Adaptation::Ewma(r) = p.adaptation else { unreachable!("together is an EWMA policy") };
            (p, Adapt::Ewma { factor: r.usage_factor, tau_ns: r.time_constant_ns })
        }),
    ]
}

/// The reference model's configuration of a policy (also `linearizable.rs`'s).
pub(crate) fn config_of(p: &Policy, adapt: Adapt) -> Config {
    let s = p.shed;
    Config {
        floor: p.limits.0.map(|l| if l.is_limited() { l.floor } else { f64::INFINITY }),
        ceiling: p.limits.0.map(|l| if l.is_limited() { l.ceiling } else { f64::INFINITY }),
        hard: p.hard_factor,
        max_wait_ns: p.max_wait_ns,
        tier_scale: p.tiers.0.map(|t| t.ceiling_scale),
        tier_spend_limit: p.tiers.0.map(|t| t.monthly_spend_limit),
        adapt,
        tick_ns: p.tick_ns,
        ttl_ns: p.permit_ttl_ns,
        shed: [
            s.over_limit_flex,
            s.in_limit_flex,
            s.over_limit_default,
            s.over_limit_priority,
            s.in_limit_default,
            s.in_limit_priority,
        ]
        .map(u64::from),
    }
}

fn key_of(i: usize) -> (ScopeKey<'static>, Key) {
    let (account, model, fast) = (ACCOUNTS[i % 3], MODELS[(i / 3) % 2], i >= 6);
    let key = ScopeKey::new(account, model);
    let key = if fast { key.fast() } else { key };
    (key, Key { account: account.to_vec(), model: model.to_vec(), fast })
}

fn outcome_of(o: &EngineOutcome) -> Outcome {
    match o {
        EngineOutcome::Admit(p) => Outcome::Admit { over_limit: false, wait_us: p.wait_ns() / 1_000 },
        EngineOutcome::AdmitOverLimit(p) => Outcome::Admit { over_limit: true, wait_us: p.wait_ns() / 1_000 },
        EngineOutcome::RejectRateLimited(r) => {
            Outcome::RateLimited { metric: r.metric as usize, too_large: r.too_large }
        }
        EngineOutcome::Shed(s) => Outcome::Shed { over_limit: s.band == sluicegate_core::Band::OverLimit },
        EngineOutcome::RejectInvalid(_) => Outcome::Invalid,
        EngineOutcome::RejectSpend(sluicegate_core::SpendRejection::SpendLimitExceeded) => {
            Outcome::SpendLimitExceeded
        }
        EngineOutcome::RejectSpend(r) => panic!("every account has a payment method here: {r:?}"),
        EngineOutcome::RejectConcurrency(_) => panic!("no concurrency cap in these policies"),
    }
}

/// The same decision up to the documented rounding: a binding metric that ties within it, a
/// smoothing wait within `tolerance` µs.
fn agree(got: Outcome, want: &model::Decision, tolerance: i128) -> bool {
    match (got, want.outcome) {
        (Outcome::RateLimited { metric, too_large }, Outcome::RateLimited { too_large: t, .. }) => {
            too_large == t && want.ties[metric]
        }
        (Outcome::Admit { over_limit, wait_us }, Outcome::Admit { over_limit: o, wait_us: w }) => {
            over_limit == o && i128::from(wait_us).abs_diff(i128::from(w)) <= tolerance.unsigned_abs()
        }
        (a, b) => a == b,
    }
}

fn settle_of(r: Result<(), SettleError>) -> SettleResult {
    match r {
        Ok(()) => SettleResult::Ok,
        Err(SettleError::AlreadySettled) => SettleResult::AlreadySettled,
        Err(SettleError::Expired) => SettleResult::Expired,
        Err(SettleError::StalePermit) => SettleResult::Stale,
        Err(other) => panic!("settle refused with {other:?}"),
    }
}

/// A live pair: the engine's permit and the model's.
struct Pair {
    engine: Permit,
    model: usize,
    key: usize,
}

/// Runs one sequence through both. Ambiguous decisions (within rounding of a band edge, or
/// made while a clock had gone back) may differ; the model then follows the engine.
fn run((policy, adapt): (Policy, Adapt), ops: &[Op]) -> Result<(), TestCaseError> {
    let config = config_of(&policy, adapt);
    // The per-account cap on permits in flight is not modelled: an expired permit gives its
    // place back when the engine next meets it, a moment the SPEC leaves open.
    let policy = Policy { max_in_flight: Some(u32::MAX), ..policy };
    let mut e = Engine::new(policy, Capacity::scopes(256)).unwrap();
    let mut m = Model::new(config);
    let mut now = 3_600 * SECOND;
    let mut high = now;
    let mut pairs: Vec<Pair> = Vec::new();
    let mut settled: Vec<Pair> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let behind = now < high;
        let mut touched = None;
        let mut resync_all = false;
        match *op {
            Op::Admit { key, prompt, cached_pct, max_tokens, n, tier } => {
                touched = Some(key);
                let (ek, mk) = key_of(key);
                let cached = prompt / 100 * cached_pct.min(100);
                let req = Request::new(prompt)
                    .cached_tokens(cached)
                    .max_tokens(max_tokens)
                    .n(n)
                    .service_tier(ServiceTier::ALL[tier]);
                let d = e.admit(ek, &req, now).unwrap();
                let got = outcome_of(&d.outcome);
                if got == Outcome::SpendLimitExceeded {
                    SPEND_REFUSALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let before = m.clone_state();
                let r = model::Request { prompt, cached, max_tokens, n, tier };
                let (want, permit) = m.admit(&mk, &r, now);
                let tolerance = if adapt == Adapt::Fixed { 4 } else { 68 };
                if !agree(got, &want, tolerance) {
                    let ambiguous = want.margin_us <= tolerance
                        || (behind && !matches!(want.outcome, Outcome::RateLimited { .. }));
                    prop_assert!(ambiguous, "step {step}: engine {got:?}, model {want:?} for {op:?}");
                    m.restore_state(before);
                    let forced = m.follow(&mk, &r, now, got);
                    if let (Some(p), Some(mp)) = (d.permit(), forced) {
                        m.set_deadline(mp, p.expires_at_ns());
                        pairs.push(Pair { engine: *p, model: mp, key });
                    }
                } else if let (Some(p), Some(mp)) = (d.permit(), permit) {
                    let deadline = p.expires_at_ns();
                    prop_assert!(
                        deadline >= now + config.ttl_ns && deadline <= high.max(now) + config.ttl_ns + SECOND
                    );
                    m.set_deadline(mp, deadline);
                    pairs.push(Pair { engine: *p, model: mp, key });
                }
            }
            Op::Settle { which, pct, failed } if !pairs.is_empty() => {
                let pair = pairs.swap_remove(which % pairs.len());
                touched = Some(pair.key);
                let r = pair.engine.reserved();
                let generated = r.generated_tokens.saturating_mul(pct) / 100;
                let usage = Usage {
                    prompt_tokens: r.prompt_tokens,
                    cached_tokens: r.prompt_tokens - r.uncached_prompt_tokens,
                    generated_tokens: generated,
                };
                let completion = if failed { Completion::UpstreamFailure } else { Completion::Success };
                let got = settle_of(e.settle(&pair.engine, &usage, completion, now));
                let want =
                    m.settle(pair.model, usage.prompt_tokens, usage.cached_tokens, generated, !failed, now);
                prop_assert!(behind || got == want, "step {step}: settle engine {got:?}, model {want:?}");
                settled.push(pair);
            }
            Op::Charge { which, tokens } if !pairs.is_empty() => {
                let pair = &pairs[which % pairs.len()];
                touched = Some(pair.key);
                let got = settle_of(e.charge(&pair.engine, tokens, now));
                let want = m.charge(pair.model, tokens, now);
                prop_assert!(behind || got == want, "step {step}: charge engine {got:?}, model {want:?}");
            }
            Op::Cancel { which, pct } if !settled.is_empty() || !pairs.is_empty() => {
                // A cancel of a live permit, or a second settle of a settled one.
                let (pair, again) = if pairs.is_empty() || which % 2 == 0 && !settled.is_empty() {
                    (settled.swap_remove(which % settled.len()), true)
                } else {
                    (pairs.swap_remove(which % pairs.len()), false)
                };
                touched = Some(pair.key);
                let r = pair.engine.reserved();
                let usage = Usage::new(r.prompt_tokens, r.generated_tokens * pct / 100);
                let got = settle_of(e.cancel(&pair.engine, &usage, now));
                let want = m.settle(pair.model, r.prompt_tokens, 0, usage.generated_tokens, true, now);
                prop_assert!(
                    behind || got == want,
                    "step {step}: cancel (again: {again}) engine {got:?}, model {want:?}"
                );
                settled.push(pair);
            }
            Op::SetTier { account, tier } => {
                e.set_tier(ACCOUNTS[account], tier.map(|t| Tier::ALL[t]), now).unwrap();
                m.set_tier(ACCOUNTS[account], tier, now);
                resync_all = behind;
            }
            Op::SetGrant { account, tier } => {
                e.set_service_tier_grant(ACCOUNTS[account], ServiceTier::ALL[tier]).unwrap();
                m.set_grant(ACCOUNTS[account], tier);
            }
            Op::Override { account, metric, bounds } => {
                let limits = bounds.map(|(floor, ceiling)| MetricLimits { floor, ceiling });
                e.set_limits_override(ACCOUNTS[account], Metric::ALL[metric], limits, now).unwrap();
                m.set_override(ACCOUNTS[account], metric, bounds, now);
                resync_all = behind;
            }
            Op::Restore => {
                // A restart resumes at or after the latest time seen, never before it.
                now = high;
                let mut buf = vec![0; e.snapshot_size()];
                let n = e.snapshot(&mut buf, now).unwrap();
                e.restore(&buf[..n], now).unwrap();
                m.restore(now);
            }
            Op::Quota { account, quota, call } => {
                let (a, q) = (ACCOUNTS[account], Quota::ALL[quota]);
                let got = match call {
                    QuotaCall::Acquire(n) => e.acquire_quota(a, q, n),
                    QuotaCall::Release(n) => e.release_quota(a, q, n),
                    QuotaCall::SetLimit(l) => e.set_quota_limit(a, q, l),
                };
                let got = match got {
                    Ok((used, limit)) => QuotaResult::Ok(used, limit),
                    Err(Error::Quota(QuotaError::Exhausted { .. })) => QuotaResult::Exhausted,
                    Err(Error::Quota(QuotaError::NotHeld { .. })) => QuotaResult::NotHeld,
                    Err(Error::Quota(QuotaError::BelowUse { .. })) => QuotaResult::BelowUse,
                    Err(other) => panic!("quota call refused with {other}"),
                };
                let want = m.quota(a, quota, call);
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::SetPrice { model: i, fast, price } => {
                let variant = if fast { Variant::Fast } else { Variant::Regular };
                let [uncached_prompt, cached_prompt, generated] = price;
                let p = sluicegate_core::Price { uncached_prompt, cached_prompt, generated };
                e.set_price(MODELS[i], variant, p).unwrap();
                m.set_price(MODELS[i], fast, price);
            }
            Op::SetSpendLimit { account, micros } => {
                let got = e.set_spend_limit(ACCOUNTS[account], micros).is_ok();
                prop_assert_eq!(got, m.set_spend_limit(ACCOUNTS[account], micros), "step {}: {:?}", step, op);
            }
            Op::StartBillingPeriod => {
                e.start_billing_period(now);
                m.start_billing_period(now);
            }
            Op::Step { us } => now += us * 1_000,
            Op::StepBack { ms } => now = now.saturating_sub(ms * 1_000_000),
            Op::SetLoad { model: i, fast, permille } => {
                let variant = if fast { Variant::Fast } else { Variant::Regular };
                e.set_load(MODELS[i], variant, permille as u32).unwrap();
                m.set_load(MODELS[i], fast, permille);
            }
            _ => {}
        }
        high = high.max(now);
        // An operation on a clock that went back takes effect at that time: adopt the engine's
        // debts for what it touched (the checks below bound how far they may differ).
        let keys: Vec<usize> =
            if resync_all { (0..12).collect() } else { touched.filter(|_| behind).into_iter().collect() };
        for key in keys {
            let (ek, mk) = key_of(key);
            if m.levels(&mk, high).is_some() {
                let (debt_us, _) = e.limits(ek, high).unwrap().to_raw();
                m.sync(&mk, high, debt_us);
            }
        }
        // Money: spend plus what is held, the same whenever expired permits are billed (floored
        // to µ$ twice by the engine's account state).
        for account in ACCOUNTS {
            let Ok(a) = e.account(account) else { continue };
            let want = m.committed(account) / 1_000;
            let got = u128::from(a.period_spend) + u128::from(a.reserved);
            prop_assert!(
                got == want || got + 1 == want,
                "step {step}: {account:?} holds {got} µ$, model {want}"
            );
        }
        // Every scope's levels and limits, as both see them now.
        for i in 0..12 {
            let (ek, mk) = key_of(i);
            let Some((used, limit)) = m.levels(&mk, now) else { continue };
            let l = e.limits(ek, now).unwrap();
            for (k, metric) in Metric::ALL.into_iter().enumerate().take(METRICS) {
                if !limit[k].is_finite() {
                    continue;
                }
                let el = l.limit(metric) as f64;
                prop_assert!(
                    (el - limit[k]).abs() <= 0.5 + 1e-9 * limit[k],
                    "step {step} {mk:?} {metric:?}: limit {el} vs {}",
                    limit[k]
                );
                let (eu, mu) = (l.used(metric), used[k]);
                // Rounding: a unit at each edge, 1 µs a cost; past the exact range 1/8192 a rewrite.
                let slack = 2
                    + eu.max(mu) / 2_048
                    + u64::from(adapt == Adapt::Threshold) * (1 + eu.max(mu) / 100_000);
                // A clock behind what the scope has seen reads more debt, never less.
                let behind_units = ((high - now) as f64 / 1e3 * limit[k] / 60.0e6).ceil() as u64;
                // Past the exact range the field's grid starts at 2^18 µs (`bucket::LINEAR_END`):
                // a debt crossing into it is rounded up by up to one step, never down.
                let coarse_units = if l.to_raw().0[k] >= EXACT_RANGE_US {
                    ((1u64 << 18) as f64 * limit[k] / 60.0e6).ceil() as u64
                } else {
                    0
                };
                prop_assert!(
                    eu + slack >= mu && eu <= mu + slack + behind_units + coarse_units,
                    "step {step} {mk:?} {metric:?}: used {eu} vs {mu}"
                );
            }
            // Past the exact range the engine rounds debt up by < 1/8192 at each rewrite, and
            // the excess outlives the debt: having checked agreement to that, adopt its value.
            let (debt_us, _) = l.to_raw();
            if now == high && debt_us.iter().zip(limit).any(|(d, l)| l.is_finite() && *d >= EXACT_RANGE_US) {
                m.sync(&mk, now, debt_us);
            }
        }
    }
    Ok(())
}

fn cases_and_ops() -> (u32, usize) {
    let env =
        |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    (env("SLUICEGATE_DIFF_CASES", 256) as u32, env("SLUICEGATE_DIFF_OPS", 2_000))
}

#[test]
fn the_engine_agrees_with_the_reference_model() {
    let (cases, ops) = cases_and_ops();
    let mut runner = TestRunner::new(RunConfig { cases, failure_persistence: None, ..RunConfig::default() });
    let strategy = (policy(), prop::collection::vec(op(), 1..=ops));
    runner.run(&strategy, |(p, ops)| run(p, &ops)).unwrap();
    let spend_refusals = SPEND_REFUSALS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(spend_refusals > 0, "no sequence reached a spend limit");
    eprintln!("{spend_refusals} spend refusals agreed on");
}

/// A 10,000-operation sequence runs through the model alone in well under a second (it is
/// simple, not slow); this pins that it stays usable for long runs.
#[test]
fn the_model_handles_ten_thousand_operations() {
    let config = config_of(&Policy::fireworks_2024(), Adapt::Threshold);
    let mut m = Model::new(config);
    let (_, key) = key_of(0);
    let r = model::Request { prompt: 100, cached: 0, max_tokens: 10, n: 1, tier: model::DEFAULT };
    let mut admitted = 0;
    for i in 0..10_000u64 {
        let (d, p) = m.admit(&key, &r, i * SECOND);
        if let Some(p) = p {
            admitted += 1;
            assert_eq!(m.settle(p, 100, 0, 10, true, i * SECOND), SettleResult::Ok);
        }
        assert!(matches!(d.outcome, Outcome::Admit { .. } | Outcome::RateLimited { .. }));
    }
    // One request a second against 60 RPM growing with use: all of them fit.
    assert_eq!(admitted, 10_000);
    let (_, limit) = m.levels(&key, 10_000 * SECOND).unwrap();
    assert!(limit[0] > 60.0, "sustained use grows the limit: {}", limit[0]);
    let _ = MINUTE;
}
