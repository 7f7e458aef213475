//! loom models of the engine's atomics: every interleaving of two threads (up to a preemption
//! bound) on a tiny engine. Run:
//! `RUSTFLAGS="--cfg loom" cargo test -p sluicegate-core --release --lib --target-dir target/loom loom_models`

use loom::sync::Arc;
use loom::thread;

use crate::{
    Capacity, Completion, Engine, Heap, Metric, Outcome, Policy, Request, ScopeKey, SettleError, Usage,
};

const KEY: ScopeKey<'static> = ScopeKey::new(b"acct", b"model");

fn tiny(policy: Policy) -> Arc<Engine<Heap>> {
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
        let mut policy = Policy::fixed();
        policy.permit_ttl_ns = SECOND;
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
        slot.begin_exclusive();
        slot.end_tick(None);
    });
}
