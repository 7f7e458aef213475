//! SPEC §10 under traffic: a snapshot written while other threads admit, settle, create keys and
//! reclaim them always restores, and each scope comes back as it was at some moment of the write.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use sluicegate_core::{
    Capacity, Completion, Engine, Error, Heap, Metric, Policy, Request, ScopeKey, SnapshotError, Usage,
};

const SECOND: u64 = 1_000_000_000;
const THREADS: usize = 2;
/// Accounts each traffic thread creates, one after another, while snapshots are taken.
const ACCOUNTS: usize = 1_000;
const LIMIT: u64 = 1_000;
/// Snapshots the first test takes: `SLUICEGATE_LIVE_SNAPSHOTS`, 200 unless set (mutation runs
/// take fewer); the key-churn test takes five times as many.
fn snapshots() -> usize {
    std::env::var("SLUICEGATE_LIVE_SNAPSHOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

/// Stops the traffic threads when dropped, also when an assertion fails mid-test.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn name(thread: usize, k: usize) -> String {
    format!("t{thread}-acct-{k}")
}

/// Writes a snapshot, growing the buffer when keys added meanwhile need more room. The buffer
/// has slack, as a caller's would, so that keys added during the write go in.
fn take(e: &Engine<Heap>, now: u64) -> Vec<u8> {
    let mut size = 2 * e.snapshot_size();
    loop {
        let mut buf = vec![0; size];
        match e.snapshot(&mut buf, now) {
            Ok(n) => {
                buf.truncate(n);
                return buf;
            }
            Err(SnapshotError::BufferTooSmall { needed }) => {
                assert!(needed > size, "a retry size must grow: {needed} after {size}");
                size = needed;
            }
            Err(e) => panic!("snapshot failed: {e}"),
        }
    }
}

/// Admits once for `account` at `now` and settles at once; true if admitted.
fn once(e: &Engine<Heap>, account: &str, now: u64) -> bool {
    let key = ScopeKey::new(account.as_bytes(), b"model");
    match e.admit(key, &Request::new(10).max_tokens(5), now) {
        Ok(d) => match d.permit() {
            Some(p) => {
                e.settle(p, &Usage::new(10, 3), Completion::Success, now).unwrap();
                true
            }
            None => false,
        },
        Err(Error::TableFull(_)) => false,
        Err(e) => panic!("admit failed: {e}"),
    }
}

/// With the clock standing still nothing is reclaimed, so each scope's request count only grows:
/// the restored count lies between what was admitted before the write and what was started by its
/// end, and a scope that had admitted anything before the write is in the file.
#[test]
fn a_live_snapshot_holds_each_scope_as_it_was_during_the_write() {
    let policy = Policy::fixed().with_fixed_limit(Metric::Requests, LIMIT as f64);
    let capacity = Capacity::scopes(THREADS * ACCOUNTS + 1_024);
    let source = Engine::new(policy, capacity).unwrap();
    let mut restored = Engine::new(policy, capacity).unwrap();
    // Per account: admissions started, and admissions that returned admitted. An admission in
    // flight while the write runs may or may not be in the file.
    let counters = || -> Vec<Vec<AtomicU32>> {
        (0..THREADS).map(|_| (0..ACCOUNTS).map(|_| AtomicU32::new(0)).collect()).collect()
    };
    let (started, admitted) = (counters(), counters());
    let stop = AtomicBool::new(false);
    let now = SECOND;
    let rounds = AtomicUsize::new(0);
    let snapshots = snapshots();
    let mut checked = 0u64;
    std::thread::scope(|s| {
        for (t, (starts, counts)) in started.iter().zip(&admitted).enumerate() {
            let (source, stop, rounds) = (&source, &stop, &rounds);
            s.spawn(move || {
                let (mut k, mut rng) = (0usize, t as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    // New accounts paced over the rounds, so that some appear during every write;
                    // between them, existing accounts again.
                    let due = (rounds.load(Ordering::Relaxed) + 1) * ACCOUNTS / snapshots;
                    rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    let target = if k < due.min(ACCOUNTS) {
                        k += 1;
                        k - 1
                    } else {
                        (rng >> 33) as usize % k.max(1)
                    };
                    if starts[target].load(Ordering::Relaxed) >= (LIMIT as u32) / 2 {
                        continue;
                    }
                    starts[target].fetch_add(1, Ordering::SeqCst);
                    if once(source, &name(t, target), now) {
                        counts[target].fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        let _stop = StopOnDrop(&stop);
        for round in 0..snapshots {
            rounds.store(round, Ordering::Relaxed);
            let read = |c: &Vec<Vec<AtomicU32>>| -> Vec<Vec<u32>> {
                c.iter().map(|c| c.iter().map(|a| a.load(Ordering::SeqCst)).collect()).collect()
            };
            let before = read(&admitted);
            let bytes = take(&source, now);
            let after = read(&started);
            restored.restore(&bytes, now).unwrap_or_else(|e| panic!("snapshot {round} did not restore: {e}"));
            // Every account on some rounds, a spread of them on the others.
            let step = if round % 50 == 0 { 1 } else { 97 };
            for t in 0..THREADS {
                for k in (round % step..ACCOUNTS).step_by(step) {
                    let (lo, hi) = (u64::from(before[t][k]), u64::from(after[t][k]));
                    let name = name(t, k);
                    let levels = restored.limits(ScopeKey::new(name.as_bytes(), b"model"), now).unwrap();
                    let used = levels.used(Metric::Requests);
                    assert!(
                        (lo..=hi).contains(&used),
                        "snapshot {round}, {name}: restored {used} admitted, source had admitted {lo} before the write and started {hi} by its end"
                    );
                    assert_eq!(levels.remaining(Metric::Requests), LIMIT - used);
                    checked += 1;
                }
            }
        }
    });
    // Conservation after the last restore: a scope admits exactly what its restored level leaves.
    let name = name(0, 0);
    let key = ScopeKey::new(name.as_bytes(), b"model");
    let used = restored.limits(key, now).unwrap().used(Metric::Requests);
    let more = (0..2 * LIMIT).take_while(|_| once(&restored, &name, now)).count() as u64;
    assert_eq!(used + more, LIMIT);
    assert!(checked > 50 * snapshots as u64, "{checked}");
}

/// With the clock moving and small tables, keys are created and reclaimed all the time; every
/// snapshot still restores, and the restored engine never admits past a limit.
#[test]
fn snapshots_under_key_churn_always_restore() {
    let policy = Policy::fixed().with_fixed_limit(Metric::Requests, 600.0);
    let capacity = Capacity { scopes: 64, accounts: 64, models: 256, permits: 1_024 };
    let source = Engine::new(policy, capacity).unwrap();
    let mut restored = Engine::new(policy, capacity).unwrap();
    let clock = AtomicU64::new(SECOND);
    let stop = AtomicBool::new(false);
    let (snapshots, mut taken) = (5 * self::snapshots(), 0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (source, stop, clock) = (&source, &stop, &clock);
            s.spawn(move || {
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    once(source, &name(t, k % 4_096), clock.load(Ordering::Relaxed));
                    k += 1;
                }
            });
        }
        let _stop = StopOnDrop(&stop);
        for _ in 0..snapshots {
            // A tenth of a second a round: a scope with one request owes it back in 0.1 s.
            let now = clock.fetch_add(SECOND / 10, Ordering::Relaxed);
            let bytes = take(&source, now);
            restored.restore(&bytes, now).unwrap_or_else(|e| panic!("snapshot {taken} did not restore: {e}"));
            taken += 1;
        }
    });
    assert_eq!(taken, snapshots);
    let now = clock.load(Ordering::Relaxed);
    let name = name(1, 7);
    let more = (0..2_000).take_while(|_| once(&restored, &name, now)).count();
    assert!(more <= 600, "{more}");
}

/// A snapshot holds the keys it writes only while it writes: afterwards idle keys are reclaimed
/// for newcomers as if no snapshot had been taken.
#[test]
fn a_snapshot_lets_go_of_the_keys_it_held() {
    let capacity = Capacity { scopes: 64, accounts: 64, models: 256, permits: 1_024 };
    let e = Engine::new(Policy::fixed(), capacity).unwrap();
    for k in 0..64 {
        assert!(once(&e, &name(0, k), 0), "account {k}");
    }
    take(&e, 0);
    // An hour later every first account is idle, its state a new key's: all can make room.
    for k in 0..64 {
        assert!(once(&e, &name(1, k), 3_600 * SECOND), "newcomer {k}");
    }
}
