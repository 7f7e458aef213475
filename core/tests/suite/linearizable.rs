//! Multi-threaded linearizability spot check (Knossos-style, on small histories): 4 threads
//! admit and settle on two scopes at one instant, logging each call's invocation and response
//! order and its result. Some sequential order of the log that respects real time must give
//! the same results in the reference model (`tests/suite/model/`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::model;
use crate::model::{Adapt, Key, Model, Outcome, SettleResult};
use sluicegate_core::{
    Capacity, Completion, Engine, Metric, MetricLimits, PerMetric, Permit, Policy, Request, ScopeKey,
    SettleError, Usage,
};

const NOW: u64 = 7_200_000_000_000;
const THREADS: usize = 4;
const CALLS: usize = 6;
const KEYS: [&[u8]; 2] = [b"acct-a", b"acct-b"];

#[derive(Clone, Copy, Debug)]
enum Call {
    Admit {
        key: usize,
        max_tokens: u64,
    },
    /// Settles the permit of this thread's `admit`-th call, with `generated` tokens.
    Settle {
        admit: usize,
        generated: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Seen {
    Admitted,
    Refused,
    Settled,
    SettleRefused,
}

#[derive(Clone, Copy, Debug)]
struct Event {
    thread: usize,
    index: usize,
    call: Call,
    seen: Seen,
    start: u64,
    end: u64,
}

/// 6 RPM and 6,000 generated TPM, nothing else: both bind within a few calls.
fn policy() -> Policy {
    let mut p = Policy::fixed();
    p.limits = PerMetric([MetricLimits::UNLIMITED; 4]);
    *p.limits.get_mut(Metric::Requests) = MetricLimits::fixed(6.0);
    *p.limits.get_mut(Metric::GeneratedTokens) = MetricLimits::fixed(6_000.0);
    p
}

fn model() -> Model {
    Model::new(crate::differential::config_of(&policy(), Adapt::Fixed))
}

fn key(k: usize) -> Key {
    Key { account: KEYS[k].to_vec(), model: b"m".to_vec(), fast: false }
}

/// Each thread's calls: admits of 1,500 max tokens, and settles of its own earlier admits.
fn calls(seed: u64, thread: usize) -> Vec<Call> {
    let mut x = seed ^ (thread as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::new();
    for i in 0..CALLS {
        let admits: Vec<usize> = (0..i).filter(|j| matches!(out[*j], Call::Admit { .. })).collect();
        if !admits.is_empty() && next() % 3 == 0 {
            let admit = admits[(next() as usize) % admits.len()];
            out.push(Call::Settle { admit, generated: next() % 3_000 });
        } else {
            out.push(Call::Admit { key: (next() % 2) as usize, max_tokens: 1_500 });
        }
    }
    out
}

/// Runs the threads against one engine and returns the log.
fn record(seed: u64) -> Vec<Event> {
    let e = Engine::new(policy(), Capacity::scopes(64)).unwrap();
    let clock = AtomicU64::new(0);
    let start_together = std::sync::Barrier::new(THREADS);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (e, clock, start_together) = (&e, &clock, &start_together);
                s.spawn(move || {
                    start_together.wait();
                    let mut permits: Vec<Option<Permit>> = Vec::new();
                    let mut log = Vec::new();
                    for (index, call) in calls(seed, thread).into_iter().enumerate() {
                        // A few µs apart, so the threads' calls interleave rather than run in turn.
                        for _ in 0..(seed * 7 + index as u64 * 13 + thread as u64 * 31) % 4_000 {
                            std::hint::spin_loop();
                        }
                        let start = clock.fetch_add(1, Ordering::SeqCst);
                        let seen = match call {
                            Call::Admit { key, max_tokens } => {
                                let k = ScopeKey::new(KEYS[key], b"m");
                                let d = e.admit(k, &Request::new(0).max_tokens(max_tokens), NOW).unwrap();
                                permits.push(d.permit().copied());
                                if d.admitted() { Seen::Admitted } else { Seen::Refused }
                            }
                            Call::Settle { admit, generated } => {
                                permits.push(None);
                                match permits[admit] {
                                    Some(p) => match e.settle(
                                        &p,
                                        &Usage::new(0, generated),
                                        Completion::Success,
                                        NOW,
                                    ) {
                                        Ok(()) => Seen::Settled,
                                        Err(SettleError::AlreadySettled) => Seen::SettleRefused,
                                        Err(other) => panic!("{other:?}"),
                                    },
                                    None => Seen::SettleRefused,
                                }
                            }
                        };
                        let end = clock.fetch_add(1, Ordering::SeqCst);
                        log.push(Event { thread, index, call, seen, start, end });
                    }
                    log
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

/// Depth-first search for a sequential order consistent with real time and the model.
struct Search<'a> {
    events: &'a [Event],
    tried: std::collections::HashSet<(u64, Vec<Option<usize>>)>,
}

impl Search<'_> {
    /// `done` is a bitmask of applied events; `permits` maps event → the model's permit.
    fn from(&mut self, m: &mut Model, done: u64, permits: &mut Vec<Option<usize>>) -> bool {
        if done.count_ones() as usize == self.events.len() {
            return true;
        }
        // Histories this small revisit states: remember the (done, permits) pairs that failed.
        if !self.tried.insert((done, permits.clone())) {
            return false;
        }
        for (i, ev) in self.events.iter().enumerate() {
            if done & (1 << i) != 0 {
                continue;
            }
            // Every event that responded before this one was invoked must come first.
            let ready =
                self.events.iter().enumerate().all(|(j, other)| done & (1 << j) != 0 || other.end > ev.start);
            if !ready {
                continue;
            }
            let saved = m.clone_state();
            let saved_permits = permits.clone();
            if self.apply(m, i, permits) && self.from(m, done | (1 << i), permits) {
                return true;
            }
            m.restore_state(saved);
            *permits = saved_permits;
        }
        false
    }

    /// Applies event `i` to the model; false if the model's result differs from the log's.
    fn apply(&self, m: &mut Model, i: usize, permits: &mut [Option<usize>]) -> bool {
        let ev = self.events[i];
        match ev.call {
            Call::Admit { key: k, max_tokens } => {
                let r = model::Request { prompt: 0, cached: 0, max_tokens, n: 1, tier: model::DEFAULT };
                let (d, p) = m.admit(&key(k), &r, NOW);
                permits[i] = p;
                let admitted = matches!(d.outcome, Outcome::Admit { .. });
                admitted == (ev.seen == Seen::Admitted)
            }
            Call::Settle { admit, generated } => {
                let source = self.events.iter().position(|e| e.thread == ev.thread && e.index == admit);
                let permit = source.and_then(|s| permits[s]);
                let result =
                    permit.map_or(SettleResult::AlreadySettled, |p| m.settle(p, 0, 0, generated, true, NOW));
                (result == SettleResult::Ok) == (ev.seen == Seen::Settled)
            }
        }
    }
}

/// Whether calls of two threads overlapped in time (else the history proves little).
fn concurrent(events: &[Event]) -> bool {
    events.iter().any(|a| events.iter().any(|b| a.thread != b.thread && a.start < b.end && b.start < a.end))
}

fn linearizable(events: &[Event]) -> bool {
    let mut search = Search { events, tried: Default::default() };
    search.from(&mut model(), 0, &mut vec![None; events.len()])
}

#[test]
fn concurrent_admits_and_settles_are_linearizable() {
    let runs =
        std::env::var("SLUICEGATE_LINEARIZABLE_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200u64);
    let mut overlapping = 0;
    for seed in 1..=runs {
        let events = record(seed);
        overlapping += u64::from(concurrent(&events));
        assert!(linearizable(&events), "run {seed}: no sequential order agrees with the model: {events:#?}");
    }
    assert!(overlapping > 0, "no run had calls of two threads overlapping");
}

/// The checker is not vacuous: seven admits one after another, all reported admitted against a
/// 6 RPM limit, have no sequential explanation.
#[test]
fn an_impossible_history_is_refused() {
    let admit = |i: u64| Event {
        thread: 0,
        index: i as usize,
        call: Call::Admit { key: 0, max_tokens: 10 },
        seen: Seen::Admitted,
        start: 2 * i,
        end: 2 * i + 1,
    };
    let six: Vec<Event> = (0..6).map(admit).collect();
    assert!(linearizable(&six));
    let seven: Vec<Event> = (0..7).map(admit).collect();
    assert!(!linearizable(&seven));
}
