//! SPEC §8, money is reserved like tokens: admission holds a request's worst-case cost against
//! the spend limit, settle replaces it with the actual cost, so concurrency can never carry an
//! account past its limit by more than the overruns of requests that settled above their own
//! reservation.

use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};

use sluicegate_core::tier::DOLLAR;
use sluicegate_core::{
    Capacity, Completion, Engine, Heap, Metric, MetricLimits, Outcome, Permit, Policy, Price, Request,
    ScopeKey, SpendRejection, Usage,
};

const SECOND: u64 = 1_000_000_000;
const MODEL: &[u8] = b"model";
/// $1 per million prompt tokens, $10 per million generated: a prompt token costs 1 µ$, a
/// generated one 10 µ$.
const PRICE: Price = Price { uncached_prompt: DOLLAR, cached_prompt: DOLLAR, generated: 10 * DOLLAR };

/// Rate limits that never bind: only money decides.
fn engine(capacity: Capacity) -> Engine<Heap> {
    let mut policy = Policy::fixed();
    policy.limits = policy.limits.map(|_, _| MetricLimits::UNLIMITED);
    let e = Engine::new(policy, capacity).unwrap();
    e.set_price(MODEL, sluicegate_core::Variant::Regular, PRICE).unwrap();
    e
}

fn key(account: &[u8]) -> ScopeKey<'_> {
    ScopeKey::new(account, MODEL)
}

/// The scenario: 1,000 requests of 1,000 prompt + 1,000 max tokens admitted at one
/// instant against a $1 limit, then settled at full use. Billing at settle alone let all 1,000
/// through: $11.00. With reservations, 90 fit ($0.011 each) and $0.99 is billed.
#[test]
fn a_burst_at_one_instant_never_bills_past_the_limit() {
    let e = engine(Capacity { permits: 2_048, ..Capacity::scopes(64) });
    e.set_spend_limit(b"a", DOLLAR).unwrap();
    let request = Request::new(1_000).max_tokens(1_000);
    let decisions: Vec<_> = (0..1_000).map(|_| e.admit(key(b"a"), &request, 0).unwrap()).collect();
    let admitted: Vec<&Permit> = decisions.iter().filter_map(|d| d.permit()).collect();
    assert_eq!(admitted.len(), 90);
    for d in decisions.iter().filter(|d| !d.admitted()) {
        assert_eq!(d.outcome, Outcome::RejectSpend(SpendRejection::SpendLimitExceeded));
    }
    assert_eq!(e.account(b"a").unwrap().reserved, 990_000);
    for p in admitted {
        e.settle(p, &Usage::new(1_000, 1_000), Completion::Success, 0).unwrap();
    }
    let a = e.account(b"a").unwrap();
    assert_eq!((a.period_spend, a.reserved), (990_000, 0));
    assert!(a.period_spend <= DOLLAR);
}

/// Settle replaces the reservation with the actual cost; cancel bills what was used; an upstream
/// failure bills nothing; an expired permit bills its whole reservation.
#[test]
fn each_way_a_permit_ends_replaces_its_reservation() {
    let e = engine(Capacity::scopes(64));
    let request = Request::new(1_000).max_tokens(1_000); // 11,000 µ$ worst case
    let admit = || *e.admit(key(b"a"), &request, 0).unwrap().permit().unwrap();
    let state = || {
        let a = e.account(b"a").unwrap();
        (a.period_spend, a.reserved)
    };
    let p = admit();
    assert_eq!(state(), (0, 11_000));
    e.settle(&p, &Usage::new(1_000, 200), Completion::Success, 0).unwrap();
    assert_eq!(state(), (3_000, 0));
    let p = admit();
    e.cancel(&p, &Usage::new(1_000, 0), 0).unwrap();
    assert_eq!(state(), (4_000, 0));
    let p = admit();
    e.settle(&p, &Usage::new(1_000, 1_000), Completion::UpstreamFailure, 0).unwrap();
    assert_eq!(state(), (4_000, 0));
    // A settle above the reservation bills the overrun.
    let p = admit();
    e.settle(&p, &Usage::new(1_000, 3_000), Completion::Success, 0).unwrap();
    assert_eq!(state(), (35_000, 0));
    // Abandoned: at expiry the reservation is billed as if fully used.
    let abandoned = admit();
    assert_eq!(state(), (35_000, 11_000));
    let expired_by = e.policy().permit_ttl_ns + 3_600 * SECOND;
    let late = e.settle(&abandoned, &Usage::new(0, 0), Completion::Success, expired_by);
    assert_eq!(late, Err(sluicegate_core::SettleError::Expired));
    assert_eq!(state(), (46_000, 0));
}

/// A refusal by the rate limits takes its reservation back at once.
#[test]
fn a_rate_limited_request_holds_no_money() {
    let policy = Policy::fixed().with_fixed_limit(Metric::Requests, 1.0);
    let e = Engine::new(policy, Capacity::scopes(64)).unwrap();
    e.set_price(MODEL, sluicegate_core::Variant::Regular, PRICE).unwrap();
    let request = Request::new(10).max_tokens(10);
    assert!(e.admit(key(b"a"), &request, 0).unwrap().admitted());
    let refused = e.admit(key(b"a"), &request, 0).unwrap();
    assert!(matches!(refused.outcome, Outcome::RejectRateLimited(_)));
    assert_eq!(e.account(b"a").unwrap().reserved, 110);
}

/// Without a payment method an account may reserve only its credits.
#[test]
fn credits_are_spent_by_reservations_too() {
    let e = engine(Capacity::scopes(64));
    e.add_credits(b"a", 20_000).unwrap();
    e.set_payment_method(b"a", false).unwrap();
    let request = Request::new(1_000).max_tokens(1_000); // 11,000 µ$
    let first = e.admit(key(b"a"), &request, 0).unwrap();
    assert!(first.admitted());
    let second = e.admit(key(b"a"), &request, 0).unwrap();
    assert_eq!(second.outcome, Outcome::RejectSpend(SpendRejection::AccountSuspended));
    e.settle(first.permit().unwrap(), &Usage::new(1_000, 100), Completion::Success, 0).unwrap();
    // 2,000 µ$ spent from the credits: 18,000 left, enough for the next worst case.
    assert!(e.admit(key(b"a"), &request, 0).unwrap().admitted());
}

/// 8 threads with random sizes, settling below or above their reservations, cancelling and
/// abandoning: money is conserved to the nano-dollar, and the limit is crossed by no more than
/// the overruns of the requests that settled above their reservation.
#[test]
fn concurrent_spend_is_conserved_and_bounded() {
    const THREADS: u64 = 8;
    let e = engine(Capacity { permits: 8_192, ..Capacity::scopes(256) });
    let limit = 5 * DOLLAR;
    e.set_spend_limit(b"a", limit).unwrap();
    let overruns = AtomicU64::new(0);
    let billed_by_threads = AtomicU64::new(0);
    let abandoned: std::sync::Mutex<Vec<(Permit, u64)>> = std::sync::Mutex::new(Vec::new());
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (e, overruns, billed_by_threads, abandoned, barrier) =
                (&e, &overruns, &billed_by_threads, &abandoned, &barrier);
            s.spawn(move || {
                let mut rng = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut next = |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                barrier.wait();
                for _ in 0..2_000 {
                    let (prompt, max) = (next(2_000), next(2_000));
                    let worst = prompt + 10 * max;
                    let d = e.admit(key(b"a"), &Request::new(prompt).max_tokens(max), 0).unwrap();
                    let Some(p) = d.permit() else { continue };
                    let generated = next(max * 2 + 1);
                    match next(10) {
                        0 => {
                            abandoned.lock().unwrap().push((*p, worst));
                            continue;
                        }
                        1 => {
                            e.settle(p, &Usage::new(prompt, generated), Completion::UpstreamFailure, 0)
                                .unwrap();
                            continue;
                        }
                        2 => e.cancel(p, &Usage::new(prompt, generated), 0).unwrap(),
                        _ => e.settle(p, &Usage::new(prompt, generated), Completion::Success, 0).unwrap(),
                    }
                    let cost = prompt + 10 * generated;
                    billed_by_threads.fetch_add(cost, Ordering::Relaxed);
                    overruns.fetch_add(cost.saturating_sub(worst), Ordering::Relaxed);
                }
            });
        }
    });
    let abandoned = abandoned.into_inner().unwrap();
    let reserved_outstanding: u64 = abandoned.iter().map(|(_, worst)| worst).sum();
    let a = e.account(b"a").unwrap();
    // Conservation while permits are outstanding: spend is what settles billed, and what is held
    // is exactly the outstanding permits' worst cases.
    assert_eq!(a.period_spend, billed_by_threads.load(Ordering::Relaxed));
    assert_eq!(a.reserved, reserved_outstanding);
    assert!(a.period_spend + a.reserved <= limit + overruns.load(Ordering::Relaxed));
    // Let them expire: each bills its reservation, nothing is held any more.
    let late = e.policy().permit_ttl_ns + 3_600 * SECOND;
    for (p, _) in &abandoned {
        assert!(e.settle(p, &Usage::new(0, 0), Completion::Success, late).is_err());
    }
    let a = e.account(b"a").unwrap();
    assert_eq!(a.reserved, 0);
    assert_eq!(a.period_spend, billed_by_threads.load(Ordering::Relaxed) + reserved_outstanding);
    assert!(a.period_spend <= limit + overruns.load(Ordering::Relaxed), "{a:?}");
    assert!(billed_by_threads.load(Ordering::Relaxed) > limit / 2, "the limit was reached");
}

/// Nothing is held for an account without a limit, nor for a free request; a free request is
/// admitted even while held money exceeds the credits of an account without a payment method.
#[test]
fn nothing_is_held_without_a_limit_or_a_price() {
    let e = engine(Capacity::scopes(64));
    e.set_tier(b"big", Some(sluicegate_core::Tier::Unlimited), 0).unwrap();
    let d = e.admit(key(b"big"), &Request::new(1_000).max_tokens(1_000), 0).unwrap();
    assert!(d.admitted());
    assert_eq!(e.account(b"big").unwrap().reserved, 0);
    e.settle(d.permit().unwrap(), &Usage::new(1_000, 1_000), Completion::Success, 0).unwrap();
    assert_eq!(e.account(b"big").unwrap().period_spend, 11_000);

    e.add_credits(b"a", 11_000).unwrap();
    e.set_payment_method(b"a", false).unwrap();
    let held = e.admit(key(b"a"), &Request::new(1_000).max_tokens(1_000), 0).unwrap();
    assert!(held.admitted());
    let free = ScopeKey::new(b"a", b"free-model");
    assert!(e.admit(free, &Request::new(1_000).max_tokens(1_000), 0).unwrap().admitted());
    assert_eq!(e.account(b"a").unwrap().reserved, 11_000);
}

/// When an account's credits and its limit allow exactly as much, the refusal names the limit.
#[test]
fn a_tie_between_credits_and_the_limit_names_the_limit() {
    let e = engine(Capacity::scopes(64));
    e.add_credits(b"a", 11_000).unwrap();
    e.set_payment_method(b"a", false).unwrap();
    e.set_spend_limit(b"a", 11_000).unwrap();
    let over = e.admit(key(b"a"), &Request::new(1_001).max_tokens(1_000), 0).unwrap();
    assert_eq!(over.outcome, Outcome::RejectSpend(SpendRejection::SpendLimitExceeded));
    e.set_spend_limit(b"a", 12_000).unwrap();
    let over = e.admit(key(b"a"), &Request::new(1_001).max_tokens(1_000), 0).unwrap();
    assert_eq!(over.outcome, Outcome::RejectSpend(SpendRejection::AccountSuspended));
    assert!(e.admit(key(b"a"), &Request::new(1_000).max_tokens(1_000), 0).unwrap().admitted());
}

/// A week of uptime with a crashing gateway: every hour one request is abandoned mid-flight and
/// others settle, a billing period starts every day. Nothing leaks: each abandoned hold is billed
/// once, the account's places come back, and at the end nothing is held.
#[test]
fn a_week_of_abandoned_requests_leaks_neither_money_nor_places() {
    const HOUR: u64 = 3_600 * SECOND;
    let e = engine(Capacity::scopes(64));
    e.set_max_in_flight(b"a", Some(4)).unwrap();
    let request = Request::new(100).max_tokens(100); // 1,100 µ$ held
    let (mut billed_today, mut abandoned) = (0u64, 0u64);
    for hour in 0..7 * 24u64 {
        let now = hour * HOUR;
        if hour % 24 == 0 {
            e.start_billing_period(now);
            billed_today = 0;
        }
        // The permit abandoned an hour ago has expired (15 min): its hold is billed when met.
        let crashed = e.admit(key(b"a"), &request, now).unwrap();
        assert!(crashed.admitted(), "hour {hour}: {:?}", crashed.outcome);
        abandoned += 1;
        for _ in 0..2 {
            let d = e.admit(key(b"a"), &request, now + SECOND).unwrap();
            e.settle(d.permit().unwrap(), &Usage::new(100, 10), Completion::Success, now + SECOND).unwrap();
            billed_today += 200;
        }
        let a = e.account(b"a").unwrap();
        assert!(a.in_flight <= 2, "hour {hour}: {} in flight", a.in_flight);
        // Today's spend: what settled, plus the holds billed at expiry (never twice).
        assert!(a.period_spend >= billed_today && a.period_spend <= billed_today + 1_100 * (hour % 24 + 1));
    }
    let end = 8 * 24 * HOUR;
    e.start_billing_period(end);
    let a = e.account(b"a").unwrap();
    assert_eq!((a.in_flight, a.reserved, a.period_spend), (0, 0, 0));
    assert_eq!(abandoned, 168);
}
