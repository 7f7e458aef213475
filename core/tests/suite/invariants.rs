//! proptest: random sequences of admit / settle / charge / cancel / time steps keep the
//! invariants of SPEC §3, §4 and §7.

use proptest::prelude::*;
use sluicegate_core::{
    Capacity, Completion, Engine, Heap, Metric, Permit, Policy, Request, ScopeKey, SettleError, Usage,
};

const KEY: ScopeKey<'static> = ScopeKey::new(b"acct", b"model");
const SECOND: u64 = 1_000_000_000;

#[derive(Clone, Debug)]
enum Op {
    Admit { prompt: u64, max_tokens: u64, n: u64 },
    Settle { which: usize, generated: u64 },
    Charge { which: usize, tokens: u64 },
    SettleAgain { which: usize },
    Step { ms: u64 },
    StepBack { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..40_000, 0u64..4_000, 1u64..4).prop_map(|(prompt, max_tokens, n)| Op::Admit { prompt, max_tokens, n }),
        3 => (any::<usize>(), 0u64..5_000).prop_map(|(which, generated)| Op::Settle { which, generated }),
        1 => (any::<usize>(), 0u64..2_000).prop_map(|(which, tokens)| Op::Charge { which, tokens }),
        1 => any::<usize>().prop_map(|which| Op::SettleAgain { which }),
        2 => (0u64..20_000).prop_map(|ms| Op::Step { ms }),
        1 => (0u64..5_000).prop_map(|ms| Op::StepBack { ms }),
    ]
}

/// Remaining never exceeds the limit; the debt never exceeds ρ·L plus what settles may add.
fn check_levels(e: &Engine<Heap>, now: u64) -> Result<(), TestCaseError> {
    let l = e.limits(KEY, now).unwrap();
    for m in Metric::ALL {
        prop_assert!(l.remaining(m) <= l.limit(m), "{m:?}: {} > {}", l.remaining(m), l.limit(m));
    }
    Ok(())
}

fn run(policy: Policy, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let hard = policy.hard_factor;
    let e = Engine::new(policy, Capacity::scopes(64)).unwrap();
    let mut now = 10 * SECOND;
    let mut live: Vec<Permit> = Vec::new();
    let mut settled: Vec<Permit> = Vec::new();
    for op in ops {
        let before = e.limits(KEY, now).unwrap();
        match op {
            Op::Admit { prompt, max_tokens, n } => {
                let d = e.admit(KEY, &Request::new(prompt).max_tokens(max_tokens).n(n), now).unwrap();
                match d.permit() {
                    Some(p) => {
                        // Admission never goes beyond the hard band on any metric it charges.
                        for m in Metric::ALL {
                            if *d.cost.get(m) > 0 {
                                let used = d.levels.used(m) as f64;
                                prop_assert!(used <= hard * d.levels.limit(m) as f64 + 1.0, "{m:?} {used}");
                            }
                        }
                        live.push(*p);
                    }
                    // A refusal changes nothing.
                    None => prop_assert_eq!(e.limits(KEY, now).unwrap(), before),
                }
            }
            Op::Settle { which, generated } if !live.is_empty() => {
                let p = live.swap_remove(which % live.len());
                let prompt = p.reserved().prompt_tokens;
                e.settle(&p, &Usage::new(prompt, generated), Completion::Success, now).unwrap();
                settled.push(p);
            }
            Op::Charge { which, tokens } if !live.is_empty() => {
                let p = live[which % live.len()];
                e.charge(&p, tokens, now).unwrap();
            }
            Op::SettleAgain { which } if !settled.is_empty() => {
                let p = settled[which % settled.len()];
                prop_assert_eq!(
                    e.settle(&p, &Usage::new(0, 0), Completion::Success, now),
                    Err(SettleError::AlreadySettled)
                );
                prop_assert_eq!(e.limits(KEY, now).unwrap(), before);
            }
            Op::Step { ms } => now += ms * 1_000_000,
            // A clock going backwards never refills a bucket.
            Op::StepBack { ms } => {
                let back = now.saturating_sub(ms * 1_000_000);
                let then = e.limits(KEY, back).unwrap();
                for m in Metric::ALL {
                    prop_assert!(
                        then.remaining(m) <= before.remaining(m) || then.limit(m) != before.limit(m)
                    );
                }
            }
            _ => {}
        }
        check_levels(&e, now)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_operations_keep_the_invariants_under_fixed(ops in prop::collection::vec(op(), 1..80)) {
        run(Policy::fixed(), ops)?;
    }

    #[test]
    fn random_operations_keep_the_invariants_under_fireworks_2024(ops in prop::collection::vec(op(), 1..80)) {
        run(Policy::fireworks_2024(), ops)?;
    }

    /// With limits whose per-token cost is a whole number of µs, the arithmetic is exact: the
    /// generated-token bucket holds exactly reservations − refunds + stream charges.
    #[test]
    fn charges_minus_refunds_equal_recorded_usage(
        requests in prop::collection::vec((1u64..500, 0u64..800, 0u64..300), 1..40)
    ) {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap(); // 6,000 TPM: 10 ms a token
        let mut expected_used = 0u64;
        for (reserve, actual, streamed) in requests {
            let d = e.admit(KEY, &Request::new(0).max_tokens(reserve), 0).unwrap();
            let Some(p) = d.permit().copied() else { continue };
            e.charge(&p, streamed, 0).unwrap();
            e.settle(&p, &Usage::new(0, actual), Completion::Success, 0).unwrap();
            // Extra usage may push the bucket past its capacity; refunds stop at a full bucket.
            expected_used += actual;
            let after = e.limits(KEY, 0).unwrap();
            prop_assert_eq!(after.used(Metric::GeneratedTokens), expected_used);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn packing_round_trips(offset in prop::array::uniform4(0u64..(1 << 28)), epoch in 0u64..4096, version in 0u8..16) {
        let w = sluicegate_core::bucket::Word { offset, epoch, version };
        let back = sluicegate_core::bucket::Word::unpack(w.pack());
        prop_assert_eq!(back.epoch, epoch);
        prop_assert_eq!(back.version, version);
        // Exact in the linear range; beyond it, rounded up (never forgiven) by < 2^-13 + one step.
        for (a, b) in back.offset.iter().zip(offset) {
            if b < sluicegate_core::bucket::LINEAR_END {
                prop_assert_eq!(*a, b);
            } else {
                prop_assert!(*a >= b && *a - b <= (1 << 18));
            }
        }
    }

    #[test]
    fn large_debts_round_up_by_less_than_one_part_in_8192(offset in prop::array::uniform4(0u64..(1 << 59)), epoch in 0u64..4096) {
        let w = sluicegate_core::bucket::Word { offset, epoch, version: 3 };
        let back = sluicegate_core::bucket::Word::unpack(w.pack());
        for (a, b) in back.offset.iter().zip(offset) {
            prop_assert!(*a >= b && *a - b <= (b >> 13).max(1 << 18), "{} stored as {}", b, a);
        }
    }

    #[test]
    fn sealed_debts_open_unchanged(now in 0u64..(1 << 50), debt in prop::array::uniform4(0u64..200_000_000)) {
        let d = sluicegate_core::bucket::open(sluicegate_core::bucket::seal(now, debt, 0), now);
        prop_assert_eq!(d.debt, debt);
    }

    /// The word alone decodes a backwards clock within ±2^36 µs (19 h); the engine clamps larger
    /// jumps with the scope's last tick (see `spec.rs`).
    #[test]
    fn a_clock_going_backwards_never_reduces_debt(now in 1u64..(1 << 50), back in 0u64..(1 << 36), debt in prop::array::uniform4(0u64..200_000_000)) {
        let w = sluicegate_core::bucket::seal(now, debt, 0);
        let earlier = sluicegate_core::bucket::open(w, now.saturating_sub(back));
        for (e, d) in earlier.debt.iter().zip(debt) {
            prop_assert!(*e >= d);
        }
    }

    #[test]
    fn cost_is_monotone_and_exact_for_dividing_limits(a in 0u64..1_000_000, b in 0u64..1_000_000) {
        let t = sluicegate_core::bucket::interval(6_000.0);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(sluicegate_core::bucket::cost(lo, t) <= sluicegate_core::bucket::cost(hi, t));
        prop_assert_eq!(sluicegate_core::bucket::cost(a, t), a * 10_000);
    }
}

/// A limit at or past `UNLIMITED_F64`, infinite or not a number is no bucket (interval 0); one
/// just below it is a bucket. `MetricLimits::is_limited`, which decides whether a limit adapts,
/// agrees with the bucket at each.
#[test]
fn limits_past_the_unlimited_mark_have_no_bucket() {
    use sluicegate_core::MetricLimits;
    use sluicegate_core::bucket::{UNLIMITED_F64, interval};
    for unlimited in [UNLIMITED_F64, 2.0 * UNLIMITED_F64, f64::MAX, f64::INFINITY, f64::NAN] {
        assert_eq!(interval(unlimited), 0, "{unlimited}");
        assert!(!MetricLimits::fixed(unlimited).is_limited(), "{unlimited}");
    }
    assert!(interval(UNLIMITED_F64 - 1.0) > 0);
    assert!(MetricLimits::fixed(UNLIMITED_F64 - 1.0).is_limited());
    assert_eq!(interval(60.0), 1_000_000 << 32, "60 a minute: one every 10^6 quanta");
}

/// A cost past the hard band is too large whatever the debt; of equal such costs, the first
/// metric binds, as requests win ties of excess.
#[test]
fn of_equal_too_large_costs_the_first_metric_binds() {
    use sluicegate_core::Metric;
    use sluicegate_core::bucket::{Bands, Fit, fit};
    let bands = Bands { normal_q: 60, hard_q: 90, max_wait_q: 0 };
    for (cost, binding) in [
        ([100, 100, 0, 0], Metric::Requests),
        ([0, 100, 100, 0], Metric::PromptTokens),
        ([0, 100, 0, 200], Metric::GeneratedTokens),
    ] {
        assert_eq!(
            fit([0; 4], cost, bands),
            Fit::Exceeds { binding, retry_after_q: 0, too_large: true },
            "{cost:?}"
        );
    }
}
