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
