//! When a settle's correction applies: at the settle's own time, never at the admission's.
//!
//! `Policy::fixed` generates 6,000 tokens a minute: 100 a second refill, a bucket of 6,000. Every
//! expected level below is that arithmetic, done by hand.
//!
//! The clocks tried include ones past the first half of the bucket word's 12-bit epoch tag
//! cycle (about 19 to 38 hours) and past a whole cycle (days): a correction measured at any other
//! moment than the settle's reads the word's epoch wrongly there.

use sluicegate_core::{
    Capacity, Completion, Engine, Heap, Metric, Outcome, Policy, Request, ScopeKey, Usage,
};

const SECOND: u64 = 1_000_000_000;

/// Admission clocks: near the start, in the second half of the epoch tag's cycle, days later.
const STARTS: [u64; 4] = [SECOND, 100_000 * SECOND, 200_000 * SECOND, 9 * 86_400 * SECOND + 123_456_789];

fn engine() -> Engine<Heap> {
    Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap()
}

fn key() -> ScopeKey<'static> {
    ScopeKey::new(b"acct", b"model")
}

fn generated_left(e: &Engine<Heap>, now: u64) -> u64 {
    e.limits(key(), now).unwrap().remaining(Metric::GeneratedTokens)
}

fn admit(e: &Engine<Heap>, max_tokens: u64, now: u64) -> sluicegate_core::Permit {
    let d = e.admit(key(), &Request::new(0).max_tokens(max_tokens), now).unwrap();
    *d.permit().unwrap_or_else(|| panic!("expected admission, got {:?}", d.outcome))
}

/// An overrun settled 30 s after admission is charged at the settle: the reservation (10 s of
/// refill) has drained by then, and the 8,000 extra tokens are 80 s of debt from the settle on.
#[test]
fn an_overrun_is_charged_at_the_settle_time() {
    for t in STARTS {
        let e = engine();
        let p = admit(&e, 1_000, t);
        assert_eq!(generated_left(&e, t), 5_000, "start {t}");
        assert_eq!(generated_left(&e, t + 10 * SECOND), 6_000, "start {t}");
        e.settle(&p, &Usage::new(0, 9_000), Completion::Success, t + 30 * SECOND).unwrap();
        // 80 s of debt at t+30: none left until t+50, then 100 a second.
        assert_eq!(generated_left(&e, t + 30 * SECOND), 0, "start {t}");
        assert_eq!(generated_left(&e, t + 50 * SECOND), 0, "start {t}");
        assert_eq!(generated_left(&e, t + 60 * SECOND), 1_000, "start {t}");
        assert_eq!(generated_left(&e, t + 90 * SECOND), 4_000, "start {t}");
        assert_eq!(generated_left(&e, t + 109 * SECOND), 5_900, "start {t}");
        assert_eq!(generated_left(&e, t + 110 * SECOND), 6_000, "start {t}");
    }
}

/// A stream charge beyond the reservation is charged when it is reported.
#[test]
fn a_stream_charge_is_charged_at_its_own_time() {
    for t in STARTS {
        let e = engine();
        let p = admit(&e, 1_000, t);
        e.charge(&p, 4_000, t + 20 * SECOND).unwrap();
        // 3,000 beyond the reservation, 30 s of debt at t+20.
        assert_eq!(generated_left(&e, t + 20 * SECOND), 3_000, "start {t}");
        assert_eq!(generated_left(&e, t + 35 * SECOND), 4_500, "start {t}");
        e.settle(&p, &Usage::new(0, 4_000), Completion::Success, t + 40 * SECOND).unwrap();
        assert_eq!(generated_left(&e, t + 40 * SECOND), 5_000, "start {t}");
        assert_eq!(generated_left(&e, t + 50 * SECOND), 6_000, "start {t}");
    }
}

/// A refund is measured at the settle too: it returns what the request did not use, and never
/// fills the bucket past full at the settle (no credit for time already passed).
#[test]
fn a_refund_applies_at_the_settle_time_and_stops_at_a_full_bucket() {
    for t in STARTS {
        let e = engine();
        let p = admit(&e, 6_000, t);
        assert_eq!(generated_left(&e, t), 0, "start {t}");
        // 30 s later 3,000 have refilled; 2,000 unused come back.
        e.settle(&p, &Usage::new(0, 4_000), Completion::Success, t + 30 * SECOND).unwrap();
        assert_eq!(generated_left(&e, t + 30 * SECOND), 5_000, "start {t}");
        assert_eq!(generated_left(&e, t + 40 * SECOND), 6_000, "start {t}");

        // The whole reservation unused, settled when only 1,000 are still owed: a full bucket,
        // and exactly 6,000 more fit.
        let p = admit(&e, 6_000, t + 40 * SECOND);
        e.settle(&p, &Usage::new(0, 0), Completion::Success, t + 90 * SECOND).unwrap();
        assert_eq!(generated_left(&e, t + 90 * SECOND), 6_000, "start {t}");
        admit(&e, 6_000, t + 90 * SECOND);
        let d = e.admit(key(), &Request::new(0).max_tokens(1), t + 90 * SECOND).unwrap();
        assert!(matches!(d.outcome, Outcome::RejectRateLimited(_)), "start {t}: {:?}", d.outcome);
    }
}

/// Settle corrects exactly the metrics [`Metric::is_tokens`] names: every token metric, never
/// the request count.
#[test]
fn settle_corrects_exactly_the_token_metrics() {
    let e = engine();
    let t = 7 * SECOND;
    let d = e.admit(key(), &Request::new(1_000).max_tokens(1_000), t).unwrap();
    let p = *d.permit().unwrap();
    let before = e.limits(key(), t).unwrap();
    e.settle(&p, &Usage::new(3_000, 3_000), Completion::Success, t).unwrap();
    let after = e.limits(key(), t).unwrap();
    for m in Metric::ALL {
        let corrected = after.used(m) != before.used(m);
        assert_eq!(corrected, m.is_tokens(), "{m:?}: {} then {}", before.used(m), after.used(m));
        let expected = if m.is_tokens() { 3_000 } else { 1 };
        assert_eq!(after.used(m), expected, "{m:?}");
    }
}

/// A settle that corrects nothing (usage exactly as reserved) writes nothing to the buckets: a
/// reader whose clock lags the settler's, within the same tick, sees the levels as they were.
#[test]
fn a_settle_without_corrections_leaves_the_buckets_untouched() {
    let e = engine();
    let d = e.admit(key(), &Request::new(100).max_tokens(100), 10 * SECOND).unwrap();
    let p = *d.permit().unwrap();
    // By 20 s every bucket is full again (the request refilled in 1 s, the tokens in 0.1 s and 1 s).
    let before = e.limits(key(), 20 * SECOND).unwrap();
    for m in Metric::ALL {
        assert_eq!(before.used(m), 0, "{m:?}");
    }
    e.settle(&p, &Usage::new(100, 100), Completion::Success, 50 * SECOND).unwrap();
    assert_eq!(e.limits(key(), 20 * SECOND).unwrap(), before);
}
