//! loom models of the engine's atomics: every interleaving of two threads (up to a preemption
//! bound) on a tiny engine. Run:
//! `RUSTFLAGS="--cfg loom" cargo test -p sluicegate-core --release --lib --target-dir target/loom loom_models`

use loom::sync::Arc;
use loom::thread;

use crate::{
    Capacity, Completion, Engine, Heap, Metric, Outcome, Policy, Request, ScopeKey, SettleError, Usage,
};

const KEY: ScopeKey<'static> = ScopeKey::new(b"acct", b"model");

/// A tiny engine; its one account may hold every permit unless the policy says otherwise.
fn tiny(policy: Policy) -> Arc<Engine<Heap>> {
    let policy = Policy { max_in_flight: policy.max_in_flight.or(Some(4)), ..policy };
    let capacity = Capacity { scopes: 2, accounts: 1, models: 1, permits: 4 };
    match Engine::with_storage(policy, Heap::new(capacity).unwrap_or_else(|e| panic!("{e}")), 7) {
        Ok(e) => Arc::new(e),
        Err(e) => panic!("{e}"),
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(f);
}

fn admitted(e: &Engine<Heap>, r: &Request) -> bool {
    e.admit(KEY, r, 0).unwrap_or_else(|e| panic!("{e}")).admitted()
}

/// Two threads create the same new scope at once: one slot is published, so a one-request
/// limit admits exactly one of them.
#[test]
fn racing_claims_publish_one_scope() {
    model(|| {
        let e = tiny(Policy::fixed().with_fixed_limit(Metric::Requests, 1.0));
        let other = Arc::clone(&e);
        let t = thread::spawn(move || admitted(&other, &Request::new(0)));
        let here = admitted(&e, &Request::new(0));
        let there = t.join().unwrap_or_else(|_| panic!("thread panicked"));
        assert_eq!(u8::from(here) + u8::from(there), 1);
    });
}

/// Two requests that fit alone but not together on one metric: exactly one is admitted, and
/// the other leaves no charge on any metric.
#[test]
fn admission_is_all_or_nothing_across_metrics() {
    model(|| {
        let e = tiny(Policy::fixed());
        // Create the scope first so the model explores the bucket, not the claim.
        let _ = e.limits(KEY, 0);
        assert!(admitted(&e, &Request::new(0).max_tokens(1)));
        let big = Request::new(10).max_tokens(4_000);
        let other = Arc::clone(&e);
        let t = thread::spawn(move || admitted(&other, &Request::new(10).max_tokens(4_000)));
        let here = admitted(&e, &big);
        let there = t.join().unwrap_or_else(|_| panic!("thread panicked"));
        assert_eq!(u8::from(here) + u8::from(there), 1);
        let l = e.limits(KEY, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.remaining(Metric::Requests), 58);
        assert_eq!(l.remaining(Metric::PromptTokens), 59_990);
        assert_eq!(l.remaining(Metric::GeneratedTokens), 6_000 - 1 - 4_000);
    });
}

/// Two threads settle copies of one permit: one succeeds, one is told it was settled, and the
/// refund is applied once.
#[test]
fn a_permit_settles_once_whatever_the_interleaving() {
    model(|| {
        let e = tiny(Policy::fixed());
        let d = e.admit(KEY, &Request::new(0).max_tokens(3_000), 0).unwrap_or_else(|e| panic!("{e}"));
        let Outcome::Admit(p) = d.outcome else { panic!("not admitted") };
        let other = Arc::clone(&e);
        let t = thread::spawn(move || other.settle(&p, &Usage::new(0, 1_000), Completion::Success, 0));
        let here = e.settle(&p, &Usage::new(0, 1_000), Completion::Success, 0);
        let there = t.join().unwrap_or_else(|_| panic!("thread panicked"));
        let results = [here, there];
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(results.contains(&Err(SettleError::AlreadySettled)));
        let l = e.limits(KEY, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.remaining(Metric::GeneratedTokens), 5_000);
    });
}

const SECOND: u64 = 1_000_000_000;
const MINUTE: u64 = 60 * SECOND;

/// A permit expires (its deadline is 1 s) while its gateway settles it late: a second admission
/// needs its ledger entry and expires it, racing the settle. Exactly one of them wins, and the
/// scope's in-flight count is released exactly once.
#[test]
fn expiry_races_a_late_settle() {
    model(|| {
        // The account may hold more than the one ledger entry: the ledger is what is raced.
        let policy = Policy { permit_ttl_ns: SECOND, max_in_flight: Some(4), ..Policy::fixed() };
        let capacity = Capacity { scopes: 2, accounts: 1, models: 1, permits: 1 };
        let e = Arc::new(
            Engine::with_storage(policy, Heap::new(capacity).unwrap_or_else(|e| panic!("{e}")), 7)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let d = e.admit(KEY, &Request::new(0), 0).unwrap_or_else(|e| panic!("{e}"));
        let Outcome::Admit(p) = d.outcome else { panic!("not admitted") };
        let other = Arc::clone(&e);
        let t = thread::spawn(move || other.admit(KEY, &Request::new(0), 3 * SECOND).map(|d| d.admitted()));
        let late = e.settle(&p, &Usage::new(0, 0), Completion::Success, SECOND / 2);
        let second = t.join().unwrap_or_else(|_| panic!("thread panicked"));
        let at = e.locate(KEY, 0, false).ok().flatten().unwrap_or_else(|| panic!("no scope"));
        let in_flight = e.tables().scopes[at.slot].in_flight();
        match (late, second) {
            // Settled first: the entry was free for the second admission.
            (Ok(()), Ok(true)) => assert_eq!(in_flight, 1),
            // Expired first: the settle is refused and changed nothing.
            (Err(SettleError::Expired), Ok(true)) => assert_eq!(in_flight, 1),
            other => panic!("unexpected outcome {other:?}"),
        }
    });
}

/// A caller looked a scope up, then a reclaim gave its slot to another account (with its own,
/// higher limits) before the caller applied the minute's tick. The stale tick must not touch
/// the new scope: it keeps its own limits, and the tick lock is free afterwards.
#[test]
fn a_stale_tick_never_touches_a_reclaimed_slot() {
    model(|| {
        let capacity = Capacity { scopes: 1, accounts: 2, models: 1, permits: 2 };
        let e = Arc::new(
            Engine::with_storage(Policy::fixed(), Heap::new(capacity).unwrap_or_else(|e| panic!("{e}")), 7)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let b = ScopeKey::new(b"b", b"model");
        e.set_limits_override(b"b", Metric::Requests, Some(crate::MetricLimits::fixed(600.0)), 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let d = e.admit(KEY, &Request::new(0), 0).unwrap_or_else(|e| panic!("{e}"));
        let Outcome::Admit(p) = d.outcome else { panic!("not admitted") };
        e.settle(&p, &Usage::new(0, 0), Completion::Success, 0).unwrap_or_else(|e| panic!("{e}"));
        let stale = e.locate(KEY, 0, false).ok().flatten().unwrap_or_else(|| panic!("no scope"));
        let other = Arc::clone(&e);
        let t = thread::spawn(move || other.admit(b, &Request::new(0), 5 * MINUTE).map(|d| d.admitted()));
        // The stale caller's clock is two ticks ahead of the new scope's.
        e.tick(stale, 7 * MINUTE);
        let b_admitted = t.join().unwrap_or_else(|_| panic!("thread panicked"));
        if b_admitted == Ok(true) {
            let at = e.locate(b, 0, false).ok().flatten().unwrap_or_else(|| panic!("no scope"));
            let limits = e.tables().adaptation[at.slot].load();
            assert_eq!(limits.get(Metric::Requests).limit, 600.0);
        }
        let slot = &e.tables().scopes[0];
        assert!(slot.begin_exclusive());
        slot.end_tick(None);
    });
}

/// Money is reserved like tokens (SPEC §8): with room for one worst case, a second admission
/// races the first permit's settle, and its own cancel follows. Whatever the interleaving, the
/// limit is never crossed, the second is admitted exactly when the settle came first, and at the
/// end nothing is reserved and spend is exactly what was billed.
#[test]
fn reservations_race_settles_and_cancels_on_one_account() {
    model(|| {
        let policy = Policy { max_in_flight: Some(4), ..Policy::fixed() };
        let e = tiny(policy);
        // $1/M prompt, $10/M generated: 100 + 100 tokens cost at most 1,100 µ$.
        let price =
            crate::Price { uncached_prompt: 1_000_000, cached_prompt: 1_000_000, generated: 10_000_000 };
        e.set_price(b"model", crate::Variant::Regular, price).unwrap_or_else(|e| panic!("{e}"));
        e.set_spend_limit(b"acct", 2_000).unwrap_or_else(|e| panic!("{e}"));
        let request = Request::new(100).max_tokens(100);
        let d = e.admit(KEY, &request, 0).unwrap_or_else(|e| panic!("{e}"));
        let Outcome::Admit(first) = d.outcome else { panic!("not admitted") };
        let other = Arc::clone(&e);
        let t = thread::spawn(move || {
            let d = other.admit(KEY, &Request::new(100).max_tokens(100), 0).unwrap_or_else(|e| panic!("{e}"));
            let admitted = d.permit().is_some();
            if let Some(p) = d.permit() {
                // Cancelled after 100 prompt tokens: 100 µ$.
                other.cancel(p, &Usage::new(100, 0), 0).unwrap_or_else(|e| panic!("{e}"));
            }
            admitted
        });
        // Settled at 100 prompt + 10 generated tokens: 200 µ$.
        e.settle(&first, &Usage::new(100, 10), Completion::Success, 0).unwrap_or_else(|e| panic!("{e}"));
        let second = t.join().unwrap_or_else(|_| panic!("thread panicked"));
        let a = e.account(b"acct").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.reserved, 0);
        assert_eq!(a.in_flight, 0);
        assert_eq!(a.period_spend, if second { 300 } else { 200 });
        assert!(a.period_spend <= 2_000);
    });
}
