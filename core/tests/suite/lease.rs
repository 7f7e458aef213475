//! Engines that admit from a lease (SPEC §11, many hosts): the lease alone decides how much is
//! admitted, and every permit's corrections reach it exactly once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluicegate_core::lease::{Grant, Lease, LeasedScope};
use sluicegate_core::{
    Band, Capacity, Completion, Engine, Heap, Levels, Metric, Outcome, PerMetric, Policy, RateLimited,
    Request, ScopeKey, SettleError, Usage, Variant,
};

const KEY: ScopeKey<'static> = ScopeKey::new(b"acct", b"model");
const SECOND: u64 = 1_000_000_000;

/// Units left per metric, and every call made: all-or-nothing takes under a mutex.
struct Pool {
    left: Mutex<[i128; 4]>,
    band: Band,
    takes: AtomicUsize,
    adjusts: Mutex<Vec<(LeasedScope, [i128; 4])>>,
}

impl Pool {
    fn new(left: [i128; 4]) -> Self {
        Pool {
            left: Mutex::new(left),
            band: Band::Normal,
            takes: AtomicUsize::new(0),
            adjusts: Mutex::new(Vec::new()),
        }
    }

    fn left(&self) -> [i128; 4] {
        *self.left.lock().unwrap()
    }
}

impl Lease for Pool {
    fn take(&self, _: LeasedScope, key: ScopeKey<'_>, cost: PerMetric<u64>, _: u64) -> (Grant, Levels) {
        assert_eq!(key, KEY, "the lease is told whose scope it charges");
        self.takes.fetch_add(1, Ordering::Relaxed);
        let mut left = self.left.lock().unwrap();
        let short = left.iter().zip(cost.0).position(|(l, c)| *l < i128::from(c));
        let grant = match short {
            Some(m) => Grant::Refused(RateLimited {
                metric: Metric::ALL[m],
                retry_after_ns: 3 * SECOND,
                too_large: false,
            }),
            None => {
                left.iter_mut().zip(cost.0).for_each(|(l, c)| *l -= i128::from(c));
                Grant::Taken(self.band)
            }
        };
        (grant, Levels::from_raw([7; 4], [11; 4]))
    }

    fn adjust(&self, scope: LeasedScope, delta: [i128; 4], _: u64) {
        self.left.lock().unwrap().iter_mut().zip(delta).for_each(|(l, d)| *l -= d);
        self.adjusts.lock().unwrap().push((scope, delta));
    }
}

fn engine(policy: Policy) -> Engine<Heap> {
    Engine::new(policy, Capacity::scopes(64)).unwrap()
}

/// Eight threads race for a lease of 1,000 requests: exactly 1,000 are admitted, whatever the
/// scope's own (much higher) limit says, and settling with less than reserved gives exactly the
/// unused tokens back.
#[test]
fn threads_admit_exactly_what_the_lease_holds_and_refunds_reach_it_once() {
    let e = engine(Policy::fixed().with_fixed_limit(Metric::Requests, 1.0e9));
    let pool = Pool::new([1_000, 1_000_000, 1_000_000, 1_000_000]);
    let admitted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for i in 0..250 {
                    let d = e.admit_leased(KEY, &Request::new(100).max_tokens(50), i, &pool).unwrap();
                    match d.outcome {
                        Outcome::Admit(p) => {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            e.settle_leased(&p, &Usage::new(100, 20), Completion::Success, i, &pool).unwrap();
                            let again =
                                e.settle_leased(&p, &Usage::new(100, 20), Completion::Success, i, &pool);
                            assert_eq!(again, Err(SettleError::AlreadySettled));
                        }
                        Outcome::RejectRateLimited(r) => assert_eq!(r.metric, Metric::Requests),
                        other => panic!("{other:?}"),
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    // Prompt tokens were reserved as used; 30 of each request's 50 generated tokens came back.
    assert_eq!(pool.left(), [0, 1_000_000 - 100_000, 1_000_000 - 100_000, 1_000_000 - 20_000]);
    let adjusts = pool.adjusts.lock().unwrap();
    assert_eq!(adjusts.len(), 1_000, "one correction per permit, none for the second settles");
    let scope = adjusts[0].0;
    assert!(adjusts.iter().all(|(s, d)| *s == scope && *d == [0, 0, 0, -30]));
    assert!(scope.slot < 64);
}

/// A refusal by the lease is a 429 that names the lease's metric and retry, with the lease's
/// levels; it holds nothing: the account's one place in flight is free for the next request.
#[test]
fn a_refusal_by_the_lease_holds_nothing() {
    let e = engine(Policy::fixed());
    e.set_max_in_flight(b"acct", Some(1)).unwrap();
    let pool = Pool::new([1, 0, 0, 0]);
    let refused = e.admit_leased(KEY, &Request::new(5), 0, &pool).unwrap();
    let Outcome::RejectRateLimited(r) = refused.outcome else { panic!("{refused:?}") };
    assert_eq!((r.metric, r.retry_after_ns), (Metric::PromptTokens, 3 * SECOND));
    assert_eq!(refused.levels, Levels::from_raw([7; 4], [11; 4]));
    assert_eq!(pool.left(), [1, 0, 0, 0]);
    let fits = e.admit_leased(KEY, &Request::new(0), 0, &pool).unwrap();
    assert!(matches!(fits.outcome, Outcome::Admit(_)), "{fits:?}");
    assert!(e.account(b"acct").unwrap().in_flight == 1);
}

/// The lease's band is the permit's; spend and concurrency refusals come first and never touch
/// the lease; a shed request gives back everything it took.
#[test]
fn bands_refusals_and_sheds_go_through_the_lease_as_they_should() {
    let e = engine(Policy::fixed());
    let mut pool = Pool::new([10, 1_000, 1_000, 1_000]);
    pool.band = Band::OverLimit;
    let over = e.admit_leased(KEY, &Request::new(10), 0, &pool).unwrap();
    let Outcome::AdmitOverLimit(p) = over.outcome else { panic!("{over:?}") };
    assert!(p.over_limit());

    e.set_max_in_flight(b"acct", Some(1)).unwrap();
    let capped = e.admit_leased(KEY, &Request::new(10), 0, &pool).unwrap();
    assert!(matches!(capped.outcome, Outcome::RejectConcurrency(_)), "{capped:?}");
    assert_eq!(pool.takes.load(Ordering::Relaxed), 1, "the lease was not asked");
    e.settle_leased(&p, &Usage::new(10, 0), Completion::Success, 0, &pool).unwrap();

    e.set_load(b"model", Variant::Regular, 5_000).unwrap();
    let before = pool.left();
    let shed = e.admit_leased(KEY, &Request::new(10).max_tokens(7), 0, &pool).unwrap();
    assert!(matches!(shed.outcome, Outcome::Shed(_)), "{shed:?}");
    assert_eq!(pool.left(), before, "what the shed request took went back");
    assert_eq!(pool.takes.load(Ordering::Relaxed), 2);
}

/// A stream's tokens beyond its reservation are charged to the lease as they come, and its
/// settle charges only what the stream has not; an expired permit's reservation stays taken.
#[test]
fn streams_are_charged_and_expired_permits_keep_their_reservation() {
    let e = engine(Policy::fixed());
    let pool = Pool::new([10, 1_000, 1_000, 1_000]);
    let d = e.admit_leased(KEY, &Request::new(10).max_tokens(20), 0, &pool).unwrap();
    let p = *d.permit().unwrap();
    e.charge_leased(&p, 15, 0, &pool).unwrap();
    e.charge_leased(&p, 15, 0, &pool).unwrap();
    e.settle_leased(&p, &Usage::new(10, 35), Completion::Success, 0, &pool).unwrap();
    let deltas: Vec<_> = pool.adjusts.lock().unwrap().iter().map(|(_, d)| *d).collect();
    assert_eq!(deltas, [[0, 0, 0, 10], [0, 0, 0, 5]]);
    assert_eq!(pool.left(), [9, 990, 990, 965]);

    let d = e.admit_leased(KEY, &Request::new(10).max_tokens(20), 0, &pool).unwrap();
    let p = *d.permit().unwrap();
    let late = p.expires_at_ns() + SECOND;
    let settled = e.settle_leased(&p, &Usage::new(0, 0), Completion::Success, late, &pool);
    assert_eq!(settled, Err(SettleError::Expired));
    assert_eq!(pool.left(), [8, 980, 980, 945], "nothing given back for an expired permit");
}
