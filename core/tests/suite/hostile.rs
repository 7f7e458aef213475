//! End-to-end scenarios from a hostile world: clients that lie about `max_tokens`, gateways that
//! crash with permits outstanding, key floods, and processes that run for weeks (issue 12).

use proptest::prelude::*;
use sluicegate_core::{
    Capacity, Completion, Engine, Heap, Metric, MetricLimits, Outcome, PerMetric, Permit, Policy, Request,
    ScopeKey, Usage, Variant,
};

const SECOND: u64 = 1_000_000_000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const KEY: ScopeKey<'static> = ScopeKey::new(b"acct", b"model");

/// A `fixed` policy that enforces only generated tokens, at `per_minute`.
fn generated_only(per_minute: f64) -> Policy {
    let mut p = Policy::fixed();
    p.limits = PerMetric([MetricLimits::UNLIMITED; 4]);
    *p.limits.get_mut(Metric::GeneratedTokens) = MetricLimits::fixed(per_minute);
    p
}

fn engine(policy: Policy) -> Engine<Heap> {
    Engine::new(policy, Capacity::scopes(64)).unwrap()
}

/// Issue 12 §1: 50 requests a minute reserve 10 generated tokens and settle with 100,000 each.
/// Before the fix, debt past the packed word's ~268 s horizon was dropped and 1,600,000 tokens
/// got through in an hour at 6,000 TPM; now at most L·T + ρ·L + one request's overrun.
#[test]
fn usage_past_the_debt_horizon_is_never_forgiven() {
    let policy = generated_only(6_000.0);
    let hard = policy.hard_factor;
    let e = engine(policy);
    let mut through = 0u64;
    for minute in 0..60 {
        for j in 0..50 {
            let now = minute * MINUTE + j * SECOND;
            let d = e.admit(KEY, &Request::new(0).max_tokens(10), now).unwrap();
            if let Some(p) = d.permit() {
                e.settle(p, &Usage::new(0, 100_000), Completion::Success, now).unwrap();
                through += 100_000;
            }
        }
    }
    let bound = 6_000 * 60 + (hard * 6_000.0) as u64 + 100_000;
    assert!(through <= bound, "{through} generated tokens got through; the bound is {bound}");
    assert!(through <= 472_000);
}

/// SPEC §3: a zero-cost request is refused while its scope is past the hard band on any metric.
#[test]
fn zero_cost_request_is_refused_while_past_the_hard_band() {
    let e = engine(generated_only(6_000.0));
    let p = *e.admit(KEY, &Request::new(0).max_tokens(10), 0).unwrap().permit().unwrap();
    // Ten minutes' worth of generated tokens: nine minutes past the hard band (ρ = 1).
    e.settle(&p, &Usage::new(0, 60_000), Completion::Success, 0).unwrap();
    let d = e.admit(KEY, &Request::new(0), SECOND).unwrap();
    match d.outcome {
        Outcome::RejectRateLimited(r) => {
            assert_eq!(r.metric, Metric::GeneratedTokens);
            assert!(!r.too_large);
            // Ten minutes of debt lie past the exact range: stored rounded up, by < 1/8,192.
            let exact = 9 * MINUTE - SECOND;
            assert!(r.retry_after_ns >= exact && r.retry_after_ns - exact < 10 * MINUTE / 8_192);
        }
        other => panic!("a zero-cost request passed a scope nine minutes in debt: {other:?}"),
    }
    assert!(e.admit(KEY, &Request::new(0), 9 * MINUTE + SECOND).unwrap().admitted());
}

/// Ten hours of debt from one lying request are repaid at the refill rate, across the packed
/// word's coarse range and hourly re-seals, to within one part in 8,192.
#[test]
fn hours_of_debt_are_repaid_at_the_refill_rate() {
    let e = engine(generated_only(6_000.0));
    let p = *e.admit(KEY, &Request::new(0).max_tokens(10), 0).unwrap().permit().unwrap();
    e.settle(&p, &Usage::new(0, 3_600_000 + 10), Completion::Success, 0).unwrap();
    // 3,600,000 tokens at 6,000 TPM: 600 minutes. Poll through the debt every 7 minutes.
    let owed_until = 600 * MINUTE;
    let mut now = 0;
    while now < owed_until - 6 * MINUTE {
        now += 7 * MINUTE;
        let d = e.admit(KEY, &Request::new(0).max_tokens(1), now).unwrap();
        let Outcome::RejectRateLimited(r) = d.outcome else { panic!("admitted at {now} ns: {d:?}") };
        let exact = owed_until - MINUTE - now;
        let err = r.retry_after_ns.abs_diff(exact);
        assert!(
            r.retry_after_ns >= exact && err <= owed_until / 8_192,
            "at {now}: {} vs {exact}",
            r.retry_after_ns
        );
    }
    assert!(e.admit(KEY, &Request::new(0).max_tokens(1), owed_until).unwrap().admitted());
}

/// Issue 12 §5: a scope touched for days only by calls that never write its word (shed
/// requests) still reads its bucket right. Before the fix, after 20 or 25 hours 31 of 60 were
/// left instead of 59.
#[test]
fn a_week_of_shed_traffic_never_aliases_the_epoch_tag() {
    let e = engine(Policy::fireworks_2024());
    let mut now = 0;
    let p = *e.admit(KEY, &Request::new(10), now).unwrap().permit().unwrap();
    e.settle(&p, &Usage::new(10, 0), Completion::Success, now).unwrap();
    for gap_hours in [10, 18, 19, 20, 25, 40, 12, 24] {
        let until = now + gap_hours * HOUR;
        e.set_load(b"model", Variant::Regular, 5_000).unwrap();
        while now + 4 * MINUTE < until {
            now += 4 * MINUTE;
            let d = e.admit(KEY, &Request::new(10), now).unwrap();
            assert!(matches!(d.outcome, Outcome::Shed(_)), "{d:?}");
        }
        now = until;
        e.set_load(b"model", Variant::Regular, 0).unwrap();
        let d = e.admit(KEY, &Request::new(10), now).unwrap();
        let left = d.levels.remaining(Metric::Requests);
        assert_eq!((left, d.levels.limit(Metric::Requests)), (59, 60), "after {gap_hours} h");
        e.settle(d.permit().unwrap(), &Usage::new(10, 0), Completion::Success, now).unwrap();
    }
    assert!(now >= 7 * 24 * HOUR);
}

/// A scope left in debt and untouched for a day reads its debt as repaid, not aliased.
#[test]
fn a_scope_idle_for_a_day_reads_full() {
    let e = engine(Policy::fireworks_2024());
    for i in 0..60 {
        assert!(e.admit(KEY, &Request::new(10), i).unwrap().admitted());
    }
    for hours in [19, 20, 25, 40] {
        let l = e.limits(KEY, hours * HOUR + 60).unwrap();
        assert_eq!(l.remaining(Metric::Requests), 60, "after {hours} h");
    }
}

#[derive(Clone, Debug)]
enum Op {
    Admit { prompt: u64, max_tokens: u64 },
    Settle { which: usize, factor: u64 },
    Charge { which: usize, tokens: u64 },
    Cancel { which: usize },
    Step { ms: u64 },
    Jump { minutes: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..4_000, 1u64..2_000).prop_map(|(prompt, max_tokens)| Op::Admit { prompt, max_tokens }),
        3 => (any::<usize>(), 0u64..10_000).prop_map(|(which, factor)| Op::Settle { which, factor }),
        1 => (any::<usize>(), 0u64..50_000).prop_map(|(which, tokens)| Op::Charge { which, tokens }),
        1 => any::<usize>().prop_map(|which| Op::Cancel { which }),
        3 => (0u64..30_000).prop_map(|ms| Op::Step { ms }),
        1 => (0u64..300).prop_map(|minutes| Op::Jump { minutes }),
    ]
}

/// One observation: the time, what each metric has charged so far
/// (admissions plus corrections), and what each owes (its debt in units, from its levels).
struct Seen {
    at: u64,
    charged: [i128; 4],
    owed: [u64; 4],
}

/// SPEC §3, for every metric and every window T between two observations: what was charged is
/// at most L·T/60 s plus what is owed at the end of T (which includes the ρ·L a hard band
/// holds). Settles reach 10^4× the reservation and the clock jumps hours, so debt goes far past
/// what the packed word holds exactly.
fn charged_is_bounded_by_refill_plus_owed(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut policy = Policy::fixed();
    policy.hard_factor = 2.0;
    let e = engine(policy);
    let limits = e.limits(KEY, 0).unwrap();
    let mut now = 10 * SECOND;
    // Observations start when the scope does. (Clocks going back are `invariants.rs`'s.)
    let mut created = false;
    let mut live: Vec<(Permit, u64)> = Vec::new();
    let mut charged = [0i128; 4];
    let mut seen: Vec<Seen> = Vec::new();
    for op in ops {
        match op {
            Op::Admit { prompt, max_tokens } => {
                created = true;
                let d = e.admit(KEY, &Request::new(prompt).max_tokens(max_tokens), now).unwrap();
                if let Some(p) = d.permit() {
                    for (c, cost) in charged.iter_mut().zip(d.cost.0) {
                        *c += i128::from(cost);
                    }
                    live.push((*p, 0));
                }
            }
            Op::Settle { which, factor } if !live.is_empty() => {
                settle_one(&e, &mut live, &mut charged, which, Some(factor), now)
            }
            Op::Cancel { which } if !live.is_empty() => {
                settle_one(&e, &mut live, &mut charged, which, None, now)
            }
            Op::Charge { which, tokens } if !live.is_empty() => {
                let i = which % live.len();
                let (p, streamed) = live[i];
                if e.charge(&p, tokens, now).is_ok() {
                    let after = streamed + tokens;
                    charged[3] +=
                        i128::from(after.saturating_sub(p.reserved().generated_tokens.max(streamed)));
                    live[i].1 = after;
                }
            }
            Op::Step { ms } => now += ms * 1_000_000,
            Op::Jump { minutes } => now += minutes * MINUTE,
            _ => {}
        }
        if !created {
            continue;
        }
        let l = e.limits(KEY, now).unwrap();
        let owed = Metric::ALL.map(|m| l.used(m));
        seen.push(Seen { at: now, charged, owed });
    }
    for m in Metric::ALL {
        let limit = limits.limit(m);
        if limit == u64::MAX {
            continue;
        }
        let i = m as usize;
        for (a, first) in seen.iter().enumerate() {
            for last in &seen[a..] {
                let window = u128::from(last.at - first.at);
                let refill = (u128::from(limit) * window).div_ceil(u128::from(MINUTE));
                let charged = last.charged[i] - first.charged[i];
                // One unit of rounding per operation in between.
                let slack = (seen.len()) as i128;
                let allowed = refill as i128 + i128::from(last.owed[i]) + slack;
                prop_assert!(charged <= allowed, "{m:?}: charged {charged} > {allowed} over {window} ns");
            }
        }
    }
    Ok(())
}

/// Settles (or with no factor, cancels unused) one live permit, counting its correction.
fn settle_one(
    e: &Engine<Heap>,
    live: &mut Vec<(Permit, u64)>,
    charged: &mut [i128; 4],
    which: usize,
    factor: Option<u64>,
    now: u64,
) {
    let (p, streamed) = live.swap_remove(which % live.len());
    let r = p.reserved();
    let generated = factor.map_or(0, |f| r.generated_tokens * f);
    let usage = Usage::new(r.prompt_tokens, generated);
    let done = match factor {
        Some(_) => e.settle(&p, &usage, Completion::Success, now),
        None => e.cancel(&p, &usage, now),
    };
    if done.is_ok() {
        charged[3] += i128::from(generated) - i128::from(r.generated_tokens.max(streamed));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn nothing_charged_is_ever_forgiven(ops in prop::collection::vec(op(), 1..120)) {
        charged_is_bounded_by_refill_plus_owed(ops)?;
    }
}

/// Issue 12 §2: a burst of 10× the ledger's capacity, admitted and never settled (a crashed
/// gateway). Before, the ledger, the scopes' in-flight counts and the model's tracked load were
/// held forever; within `permit_ttl` after the burst everything they held is released.
#[test]
fn abandoned_permits_expire_and_release_everything_they_held() {
    let mut policy = Policy::fixed();
    policy.limits = PerMetric([MetricLimits::fixed(1e9); 4]);
    let ttl = policy.permit_ttl_ns;
    let capacity = Capacity { scopes: 640, accounts: 640, models: 4, permits: 1024 };
    let e = Engine::new(policy, capacity).unwrap();
    e.set_model_capacity(b"model", Variant::Regular, 2_000).unwrap();
    let steady = ScopeKey::new(b"steady", b"model");
    let first = *e.admit(steady, &Request::new(1), 0).unwrap().permit().unwrap();
    e.settle(&first, &Usage::new(1, 0), Completion::Success, 0).unwrap();
    let (mut held, mut refused) = (Vec::new(), 0);
    for i in 0..10 * capacity.permits {
        let account = format!("burst-{}", i % 512);
        let now = i as u64 * 50_000;
        match e.admit(ScopeKey::new(account.as_bytes(), b"model"), &Request::new(1), now) {
            Ok(d) => held.push(*d.permit().unwrap()),
            Err(sluicegate_core::Error::TableFull(_)) => refused += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert!(held.len() > 900 && refused > 9_000, "{} held, {refused} refused", held.len());
    // While they are live the ledger is full: even the steady account is refused (503).
    assert!(e.admit(steady, &Request::new(1), 5 * MINUTE).is_err());
    assert!(e.load(b"model", Variant::Regular).unwrap() > 400);
    // Within the ttl (plus the tick that sweeps) after the burst, all of it is released.
    let after = ttl + 2 * MINUTE;
    let d = e.admit(steady, &Request::new(1), after).unwrap();
    assert!(d.admitted(), "{d:?}");
    // One permit of 2,000 capacity is 0 ‰: the ~1,000 abandoned ones no longer count.
    assert_eq!(e.load(b"model", Variant::Regular).unwrap(), 0);
    e.settle(d.permit().unwrap(), &Usage::new(1, 0), Completion::Success, after).unwrap();
    // The abandoned scopes are reclaimable: 320 new scopes fit beside them in the 640-scope table.
    for i in 0..320 {
        let account = format!("burst-{i}");
        let d = e.admit(ScopeKey::new(account.as_bytes(), b"other-model"), &Request::new(1), after + SECOND);
        let d = d.unwrap_or_else(|err| panic!("new scope {i}: {err}"));
        e.settle(d.permit().unwrap(), &Usage::new(1, 0), Completion::Success, after + SECOND).unwrap();
    }
    // A late settle of an abandoned permit is a typed error and changes nothing.
    let late = e.settle(&held[0], &Usage::new(1, 0), Completion::Success, after + 2 * SECOND);
    assert_eq!(late, Err(sluicegate_core::SettleError::Expired));
    assert_eq!(e.load(b"model", Variant::Regular).unwrap(), 0);
}

/// A permit admitted before its model's capacity was set never counted toward the model's
/// load, so when it is abandoned and expires it takes nothing off the load of the permits
/// admitted since.
#[test]
fn an_abandoned_untracked_permit_leaves_the_tracked_load_alone() {
    let e = engine(Policy::fixed());
    let ttl = e.policy().permit_ttl_ns;
    let untracked = e.admit(KEY, &Request::new(1), 0).unwrap();
    assert!(untracked.admitted());
    e.set_model_capacity(b"model", Variant::Regular, 4).unwrap();
    let tracked = *e.admit(KEY, &Request::new(1), ttl / 2).unwrap().permit().unwrap();
    assert_eq!(e.load(b"model", Variant::Regular), Ok(250), "one of four in flight");
    // Past the untracked permit's expiry (and the tick that sweeps it), within the other's.
    let later = ttl + 2 * MINUTE;
    assert!(later < tracked.expires_at_ns());
    assert!(e.admit(ScopeKey::new(b"other", b"unrelated"), &Request::new(1), later).is_ok());
    assert_eq!(e.load(b"model", Variant::Regular), Ok(250), "still the tracked one");
    e.settle(&tracked, &Usage::new(1, 0), Completion::Success, later).unwrap();
    assert_eq!(e.load(b"model", Variant::Regular), Ok(0));
}

/// Issue 12 §7: a permit damaged on its way through C or Python (here: its reservation) is
/// refused as stale, and the real one still settles.
#[test]
fn a_damaged_permit_settles_as_stale() {
    let e = engine(Policy::fireworks_2024());
    let p = *e.admit(KEY, &Request::new(100).max_tokens(100), 0).unwrap().permit().unwrap();
    for word in 0..9 {
        let mut raw = p.to_raw();
        raw.words[word] ^= 1 << 7;
        if let Some(damaged) = Permit::from_raw(&raw) {
            let r = e.settle(&damaged, &Usage::new(100, 0), Completion::Success, SECOND);
            assert!(r.is_err(), "word {word} damaged, settle accepted");
        }
    }
    e.settle(&p, &Usage::new(100, 50), Completion::Success, SECOND).unwrap();
}

/// A small deterministic stream of made-up keys (xorshift), as a hostile client sends them.
fn junk(seed: &mut u64) -> String {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    format!("junk-{:016x}", *seed)
}

/// Issue 12 §3: 10× each table's capacity of made-up account ids and model names. Before, the
/// account and model tables filled for good and every new key got `TableFull` forever. Now
/// existing accounts are admitted throughout, and a new legitimate key once the flood is idle.
#[test]
fn a_key_flood_never_locks_out_existing_or_later_keys() {
    let capacity = Capacity { scopes: 1024, accounts: 256, models: 64, permits: 1024 };
    let e = Engine::new(Policy::fireworks_2024(), capacity).unwrap();
    let real: Vec<String> = (0..8).map(|i| format!("real-{i}")).collect();
    let mut seed = 0x5eed_u64;
    let mut refused = 0;
    let mut now = 0;
    let serve = |account: &str, model: &str, now: u64| {
        let d = e.admit(ScopeKey::new(account.as_bytes(), model.as_bytes()), &Request::new(10), now)?;
        if let Some(p) = d.permit() {
            e.settle(p, &Usage::new(10, 0), Completion::Success, now).unwrap();
        }
        Ok::<bool, sluicegate_core::Error>(d.admitted())
    };
    for account in &real {
        assert!(serve(account, "llama", now).unwrap());
    }
    for i in 0..10 * capacity.accounts + 10 * capacity.models {
        now += 100_000_000;
        // Made-up accounts on a real model, then a real account on made-up model names.
        let attempt = if i % 2 == 0 {
            serve(&junk(&mut seed), "llama", now)
        } else {
            serve("real-0", &junk(&mut seed), now)
        };
        match attempt {
            Ok(_) => {}
            Err(sluicegate_core::Error::TableFull(_)) => refused += 1,
            Err(other) => panic!("flood request {i}: {other}"),
        }
        let account = &real[i % real.len()];
        assert_eq!(serve(account, "llama", now), Ok(true), "existing account {account} at flood request {i}");
    }
    assert!(refused > 0, "the flood never filled a table: the test proves nothing");
    // Idle for ten minutes: the flood's keys hold nothing worth keeping any more.
    now += 10 * MINUTE;
    assert_eq!(serve("newcomer", "new-model", now), Ok(true));
    assert_eq!(serve("real-1", "llama", now), Ok(true));
}

/// An account that holds something (credits, a pinned tier, an override) is never reclaimed,
/// however full its table.
#[test]
fn accounts_worth_keeping_survive_a_flood() {
    let capacity = Capacity { scopes: 512, accounts: 64, models: 8, permits: 1024 };
    let e = Engine::new(Policy::fireworks_2024(), capacity).unwrap();
    e.add_credits(b"prepaid", 5_000_000).unwrap();
    e.set_tier(b"enterprise", Some(sluicegate_core::Tier::Four), 0).unwrap();
    let mut seed = 7;
    for i in 0..640u64 {
        let _ = e.admit(ScopeKey::new(junk(&mut seed).as_bytes(), b"llama"), &Request::new(1), i * MINUTE);
    }
    assert_eq!(e.account(b"prepaid").unwrap().credits, 5_000_000);
    assert_eq!(e.account(b"enterprise").unwrap().tier, sluicegate_core::Tier::Four);
}

/// A model an operator configured (here: its reported load) is never taken for a made-up name,
/// however long a flood of them lasts; the flood's own names come and go.
#[test]
fn a_configured_model_outlives_a_flood_of_made_up_model_names() {
    let capacity = Capacity { scopes: 64, accounts: 16, models: 8, permits: 1024 };
    let e = Engine::new(Policy::fixed(), capacity).unwrap();
    e.set_load(b"kept", Variant::Regular, 700).unwrap();
    let mut admitted = 0;
    for i in 0..2_000u64 {
        let model = format!("made-up-{i}");
        let now = i * 10 * SECOND;
        if let Ok(d) = e.admit(ScopeKey::new(b"flooder", model.as_bytes()), &Request::new(1), now) {
            if let Some(p) = d.permit() {
                e.settle(p, &Usage::new(1, 0), Completion::Success, now).unwrap();
                admitted += 1;
            }
        }
    }
    assert!(admitted > 1_000, "the flood's names were reclaimed for each other: {admitted}");
    assert_eq!(e.load(b"kept", Variant::Regular).unwrap(), 700);
}
