//! Multi-threaded stress on one scope: exact conservation, whatever the interleaving.

use std::sync::{Barrier, mpsc};
use std::thread;

use sluicegate_core::{
    Capacity, Completion, Engine, Heap, Metric, MetricLimits, Permit, Policy, Request, ScopeKey, SettleError,
    Usage,
};

const THREADS: usize = 4;
const SECOND: u64 = 1_000_000_000;
const KEY: ScopeKey<'static> = ScopeKey::new(b"hot", b"model");

fn engine(requests_per_minute: f64, generated_per_minute: f64, permits: usize) -> Engine<Heap> {
    let mut policy = Policy::fixed().with_fixed_limit(Metric::Requests, requests_per_minute);
    // One hot account holds thousands of permits at once here: no per-account cap.
    policy.max_in_flight = Some(u32::MAX);
    *policy.limits.get_mut(Metric::GeneratedTokens) = MetricLimits::fixed(generated_per_minute);
    Engine::new(policy, Capacity { scopes: 64, accounts: 64, models: 4, permits }).unwrap()
}

/// Every thread admits `attempts` requests at `now`; returns the permits admitted.
fn hammer(e: &Engine<Heap>, now: u64, attempts: usize, request: Request) -> Vec<Permit> {
    let barrier = Barrier::new(THREADS);
    thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    (0..attempts)
                        .filter_map(|_| e.admit(KEY, &request, now).unwrap().permit().copied())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_hot_scope_admits_exactly_what_the_bucket_allows_over_simulated_time() {
    // 6,000 requests a minute: 100 a second.
    let e = engine(6_000.0, 1e12, 16_384);
    let phases = [(0, 6_000), (SECOND, 100), (10 * SECOND, 900), (10 * SECOND + SECOND / 2, 50)];
    for (now, allowed) in phases {
        let admitted = hammer(&e, now, 3_000, Request::new(0)).len();
        assert_eq!(admitted, allowed, "at {now} ns");
    }
}

#[test]
fn settles_from_other_threads_refund_exactly_once() {
    // 100,000 generated tokens a minute; 1,000 permits of 100 tokens fill it exactly.
    let e = engine(1e9, 100_000.0, 4_096);
    let permits = hammer(&e, 0, 1_000, Request::new(0).max_tokens(100));
    assert_eq!(permits.len(), 1_000);
    assert_eq!(e.limits(KEY, 0).unwrap().remaining(Metric::GeneratedTokens), 0);

    // Two settler threads each receive every permit and try to settle it with 40 tokens used.
    let (outcomes_tx, outcomes_rx) = mpsc::channel();
    thread::scope(|s| {
        let mut senders = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = mpsc::channel::<Permit>();
            senders.push(tx);
            let e = &e;
            let outcomes = outcomes_tx.clone();
            s.spawn(move || {
                for p in rx {
                    outcomes.send(e.settle(&p, &Usage::new(0, 40), Completion::Success, 0)).unwrap();
                }
            });
        }
        for p in &permits {
            for tx in &senders {
                tx.send(*p).unwrap();
            }
        }
    });
    drop(outcomes_tx);
    let outcomes: Vec<_> = outcomes_rx.into_iter().collect();
    assert_eq!(outcomes.iter().filter(|r| r.is_ok()).count(), 1_000);
    assert_eq!(outcomes.iter().filter(|r| **r == Err(SettleError::AlreadySettled)).count(), 1_000);
    // Each permit refunded 60 tokens, once.
    assert_eq!(e.limits(KEY, 0).unwrap().remaining(Metric::GeneratedTokens), 60_000);
}

#[test]
fn concurrent_admits_and_settles_conserve_every_token() {
    let e = engine(1e9, 600_000.0, 8_192);
    let barrier = Barrier::new(THREADS);
    // Each thread admits and settles its own requests at t = 0: 300 tokens reserved, 120 used.
    let settled: usize = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let mut n = 0;
                    for _ in 0..1_000 {
                        if let Some(p) =
                            e.admit(KEY, &Request::new(0).max_tokens(300), 0).unwrap().permit().copied()
                        {
                            e.settle(&p, &Usage::new(0, 120), Completion::Success, 0).unwrap();
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    // Every reservation was refunded down to its 120 used tokens: nothing lost, nothing doubled.
    let used = 600_000 - e.limits(KEY, 0).unwrap().remaining(Metric::GeneratedTokens);
    assert_eq!(used, settled as u64 * 120);
    // 4,000 requests × 120 = 480,000 < 600,000: refunds keep room for every one of them.
    assert_eq!(settled, 4_000);
}
