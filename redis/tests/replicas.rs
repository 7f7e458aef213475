//! Replicas sharing one scope's limits through a real redis-server (issue 18's proofs).

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::RedisServer;
use sluicegate_core::{
    Capacity, Completion, Metric, MetricLimits, Outcome, PerMetric, Policy, Request, ScopeKey, Usage,
};
use sluicegate_redis::{Mode, Options, Replica};

const KEY: ScopeKey<'static> = ScopeKey::new(b"acct", b"model");

/// 600 requests per minute, no over-limit band, tokens not limited.
fn policy_600_rpm() -> Policy {
    let mut p = Policy::fixed();
    p.limits = PerMetric([
        MetricLimits::fixed(600.0),
        MetricLimits::UNLIMITED,
        MetricLimits::UNLIMITED,
        MetricLimits::UNLIMITED,
    ]);
    p.hard_factor = 1.0;
    p
}

/// The scope's hash: namespace, hex account, hex model, variant.
const HASH: &str = "sg1:scope:61636374:6d6f64656c:regular";

/// Net requests the global bucket counts as used.
fn used_globally(server: &RedisServer) -> i64 {
    redis::cmd("HGET")
        .arg(HASH)
        .arg("u0")
        .query::<Option<i64>>(&mut server.connection())
        .unwrap()
        .unwrap_or(0)
}

fn now() -> u64 {
    sluicegate_core::clock::now_ns()
}

fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// How a replica is driven: flat out, or one request per `pace`; with `report`, printing its
/// count after each admission (so a process killed mid-run has said it).
#[derive(Clone, Copy)]
struct Drive {
    pace: Duration,
    report: bool,
}

const FLAT_OUT: Drive = Drive { pace: Duration::ZERO, report: false };

/// Admits through `replica` until `until`, settling each admission at once; counts admissions.
fn hammer(replica: &Replica, until: Instant, drive: Drive) -> u64 {
    let mut admitted = 0;
    while Instant::now() < until {
        let d = replica.admit(KEY, &Request::new(0).max_tokens(0), now()).unwrap();
        match d.outcome {
            Outcome::Admit(p) => {
                admitted += 1;
                replica.settle(&p, &Usage::new(0, 0), Completion::Success, now()).unwrap();
                if drive.report {
                    println!("admitted {admitted}");
                }
                std::thread::sleep(drive.pace);
            }
            Outcome::RejectRateLimited(r) => {
                assert_eq!(r.metric, Metric::Requests);
                std::thread::sleep(Duration::from_millis(1));
            }
            other => panic!("{other:?}"),
        }
    }
    admitted
}

/// A scope's first request on a replica is served at once (its lease is fetched for it).
#[test]
fn a_scopes_first_request_is_admitted() {
    let server = RedisServer::start();
    let replica =
        Replica::connect(&server.url(), policy_600_rpm(), Capacity::scopes(64), Options::default()).unwrap();
    let d = replica.admit(KEY, &Request::new(0), now()).unwrap();
    assert!(matches!(d.outcome, Outcome::Admit(_)), "{d:?}");
    assert_eq!(replica.hosts().mode(), Mode::Leased);
}

/// One replica process of the multi-process tests, driven as `SG_CHILD_PACE_MS` and
/// `SG_CHILD_REPORT` say.
#[test]
fn child_replica() {
    let (Ok(url), Ok(start), Ok(seconds)) = (
        std::env::var("SG_CHILD_URL"),
        std::env::var("SG_CHILD_START_MS"),
        std::env::var("SG_CHILD_SECONDS"),
    ) else {
        return;
    };
    let replica = Replica::connect(&url, policy_600_rpm(), Capacity::scopes(64), Options::default()).unwrap();
    let start: u64 = start.parse().unwrap();
    while epoch_ms() < start {
        std::thread::sleep(Duration::from_millis(1));
    }
    let began = Instant::now();
    let drive = Drive {
        pace: Duration::from_millis(std::env::var("SG_CHILD_PACE_MS").map_or(0, |p| p.parse().unwrap())),
        report: std::env::var_os("SG_CHILD_REPORT").is_some(),
    };
    let admitted = hammer(&replica, began + Duration::from_secs(seconds.parse().unwrap()), drive);
    let calls_per_s = replica.hosts().redis_calls() as f64 / began.elapsed().as_secs_f64();
    println!("admitted {admitted} calls_per_s {calls_per_s:.1}");
}

/// Starts a `child_replica` process driving the scope for `seconds` from `start_ms`.
fn child(server: &RedisServer, start_ms: u64, seconds: u64, drive: Drive) -> std::process::Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "child_replica", "--nocapture", "--test-threads", "1"])
        .env("SG_CHILD_URL", server.url())
        .env("SG_CHILD_START_MS", start_ms.to_string())
        .env("SG_CHILD_SECONDS", seconds.to_string())
        .stdout(Stdio::piped());
    if drive.report {
        command.env("SG_CHILD_REPORT", "1");
    }
    command.env("SG_CHILD_PACE_MS", drive.pace.as_millis().to_string());
    command.spawn().unwrap()
}

/// The last admission count a child printed (0 if none).
fn last_count(stdout: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find_map(|l| l.split_once("admitted ")).map_or("0", |(_, rest)| rest);
    println!("replica: {line}");
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// Proof 1: four replica processes hammer one scope limited to 600 RPM for 20 s. Together they
/// admit at most 600 + 600 × 20/60 (E = 0: requests are reserved exactly), and at least 95 %
/// of it: the limit is neither exceeded nor starved.
#[test]
fn four_replica_processes_admit_the_global_limit_and_no_more() {
    let server = RedisServer::start();
    let seconds = 20;
    let start = epoch_ms() + 1_500;
    let children: Vec<_> = (0..4).map(|_| child(&server, start, seconds, FLAT_OUT)).collect();
    let mut total = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        total += last_count(&out.stdout);
    }
    let bound = 600 + 600 * seconds / 60;
    println!("global total {total} of at most {bound}");
    assert_eq!(
        used_globally(&server),
        total as i64,
        "every unleased unit given back, every admission counted once"
    );
    assert!(total <= bound, "{total} admitted, more than {bound}");
    assert!(total * 100 >= bound * 95, "{total} admitted, less than 95 % of {bound}");
}

/// A replica process killed (`SIGKILL`) while it holds a lease: it serves 10 requests a second
/// for 5 s on a nearly full bucket, and dies. The units it had leased and not used stay counted
/// as used — what its rate asked for, never more than a quarter of the 600-request bucket — so
/// the limit holds; a second replica then hammers the scope for 20 s and takes everything else
/// (the full bucket, 20 s of refill), so the kill does not starve it.
#[test]
fn a_replica_killed_holding_a_lease_neither_breaks_nor_starves_the_limit() {
    let server = RedisServer::start();
    let start = epoch_ms() + 1_500;
    let paced = Drive { pace: Duration::from_millis(100), report: true };
    let mut doomed = child(&server, start, 60, paced);
    std::thread::sleep(Duration::from_millis(start + 5_000 - epoch_ms()));
    doomed.kill().unwrap();
    let doomed = doomed.wait_with_output().unwrap();
    assert!(!doomed.status.success(), "killed, not finished");
    let killed_admitted = last_count(&doomed.stdout);
    let seconds = 20;
    let survivor = child(&server, epoch_ms(), seconds, FLAT_OUT).wait_with_output().unwrap();
    assert!(survivor.status.success());
    let survivor_admitted = last_count(&survivor.stdout);
    let elapsed_s = (epoch_ms() - start) / 1_000 + 1;
    let used = used_globally(&server) as u64;
    let lost = used - survivor_admitted - killed_admitted;
    let bound = 600 + 600 * elapsed_s / 60;
    println!(
        "killed after {killed_admitted}, holding {lost} unused; survivor {survivor_admitted}; used {used} of {bound}"
    );
    assert!(killed_admitted >= 40, "the killed replica was serving: {killed_admitted}");
    assert!(lost <= 600 / 4, "{lost} units lost with the killed replica, more than a lease");
    assert!(used <= bound, "{used} units granted, more than {bound}");
    let achievable = killed_admitted + 600 + 600 * seconds / 60;
    assert!(used * 100 >= achievable * 95, "{used} used, {achievable} could be: the survivor was starved");
}

/// Redis forgets a lease's sums (as it does once a lease is silent as long as its scope's hash
/// lives; here the test deletes them) after the lease gave units back. Its next call is refused
/// rather than its give-backs applied a second time, and the lease goes on under a new name:
/// Redis still counts exactly what was admitted.
#[test]
fn a_lease_whose_sums_redis_forgot_goes_on_under_a_new_name() {
    let server = RedisServer::start();
    let replica =
        Replica::connect(&server.url(), policy_600_rpm(), Capacity::scopes(64), Options::default()).unwrap();
    let paced = Drive { pace: Duration::from_millis(50), report: false };
    let mut admitted = hammer(&replica, Instant::now() + Duration::from_secs(1), paced);
    // Idle for more than a second: the lease gives back what it holds.
    std::thread::sleep(Duration::from_millis(1_500));
    let mut connection = server.connection();
    let sums: Vec<String> = redis::cmd("HKEYS").arg(HASH).query::<Vec<String>>(&mut connection).unwrap();
    let sums: Vec<&String> = sums.iter().filter(|k| k.contains(':')).collect();
    assert!(!sums.is_empty());
    redis::cmd("HDEL").arg(HASH).arg(&sums).query::<i64>(&mut connection).unwrap();
    admitted += hammer(&replica, Instant::now() + Duration::from_secs(1), paced);
    drop(replica);
    assert_eq!(used_globally(&server), admitted as i64, "every give-back applied once");
    let fields: Vec<String> = redis::cmd("HKEYS").arg(HASH).query::<Vec<String>>(&mut connection).unwrap();
    assert!(!fields.iter().any(|k| k.contains(':')), "a lease's sums are deleted when it ends: {fields:?}");
}

/// Proof 4: Redis restarts with its data lost. The replica reloads the function library by
/// itself and carries on; the scope's hash is written again in the new server.
#[test]
fn a_restarted_redis_is_used_again_without_help() {
    let mut server = RedisServer::start();
    let replica =
        Replica::connect(&server.url(), policy_600_rpm(), Capacity::scopes(64), Options::default()).unwrap();
    assert!(hammer(&replica, Instant::now() + Duration::from_millis(300), FLAT_OUT) > 0);
    redis::cmd("SET").arg("marker").arg(1).query::<()>(&mut server.connection()).unwrap();
    server.restart();
    let mut c = server.connection();
    let marker = redis::cmd("EXISTS").arg("marker").query::<u64>(&mut c).unwrap();
    assert_eq!(marker, 0, "the data was lost");
    let exists = |c: &mut redis::Connection| {
        redis::cmd("KEYS").arg("sg1:scope:*").query::<Vec<String>>(c).map(|k| k.len()).unwrap_or(0)
    };
    let mut admitted = hammer(&replica, Instant::now() + Duration::from_millis(500), FLAT_OUT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && (exists(&mut c) == 0 || replica.hosts().mode() != Mode::Leased) {
        admitted += hammer(&replica, Instant::now() + Duration::from_millis(50), FLAT_OUT);
    }
    assert_eq!(replica.hosts().mode(), Mode::Leased);
    assert_eq!(exists(&mut c), 1, "the scope's hash is back");
    let libraries = redis::cmd("FUNCTION").arg("LIST").query::<redis::Value>(&mut c).unwrap();
    assert!(format!("{libraries:?}").contains("sluicegate_v2"));
    assert!(admitted > 0);
}

/// Proof 3: Redis stops answering for 10 s (`SIGSTOP`), then answers again. The replicas serve
/// from their leases, then from their split share (600 RPM / 2 replicas); over the outage they
/// admit at most the limit's 10 s (100) plus what their leases held when it began; after it,
/// Redis counts exactly what they admitted, nothing twice.
#[test]
fn an_outage_is_ridden_out_on_leases_then_the_split_share_and_counted_after() {
    let server = RedisServer::start();
    let options = || Options {
        heartbeat_ttl: Duration::from_secs(3),
        lease_ttl: Duration::from_secs(2),
        ..Options::default()
    };
    let replicas: Vec<Replica> = (0..2)
        .map(|_| Replica::connect(&server.url(), policy_600_rpm(), Capacity::scopes(64), options()).unwrap())
        .collect();
    let both = |until: Instant| -> u64 {
        std::thread::scope(|s| {
            let runs: Vec<_> = replicas.iter().map(|r| s.spawn(move || hammer(r, until, FLAT_OUT))).collect();
            runs.into_iter().map(|r| r.join().unwrap()).sum()
        })
    };
    let mut total = both(Instant::now() + Duration::from_secs(4));
    assert!(replicas.iter().all(|r| r.hosts().live_replicas() == 2));
    let held_at_stop: u64 = replicas.iter().map(|r| r.hosts().held().0[0]).sum();
    server.signal("-STOP");
    let stopped = Instant::now();
    let riding = both(stopped + Duration::from_secs(1));
    assert!(
        replicas.iter().all(|r| r.hosts().mode() == Mode::Riding),
        "{:?}",
        replicas.iter().map(|r| r.hosts().mode()).collect::<Vec<_>>()
    );
    let during = riding + both(stopped + Duration::from_secs(10));
    assert!(replicas.iter().all(|r| r.hosts().mode() == Mode::Outage));
    server.signal("-CONT");
    let bound = 600 * 10 / 60 + held_at_stop;
    println!("admitted during the outage {during} of at most {bound} (held at stop {held_at_stop})");
    assert!(during <= bound, "{during} admitted during the outage, more than {bound}");
    assert!(during >= 600 * 7 / 60, "{during}: the split share kept serving");
    total += during;
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas.iter().any(|r| r.hosts().mode() != Mode::Leased) && Instant::now() < deadline {
        total += both(Instant::now() + Duration::from_millis(100));
    }
    assert!(replicas.iter().all(|r| r.hosts().mode() == Mode::Leased));
    total += both(Instant::now() + Duration::from_secs(1));
    drop(replicas);
    assert_eq!(used_globally(&server), total as i64, "after recovery Redis counts what was admitted");
}

/// Proof 2: adaptation is global. Four replicas share one scope's traffic at its limit under
/// `fireworks_2024`, on a test clock that runs two hours in seconds (the Redis function reads
/// it too). The limit the leader writes follows the published ramp — 60 → 120 → 720 → 1440 RPM
/// at 0 / 10 min / 1 h / 2 h — within 2 %, though each replica serves only a quarter of it.
#[test]
fn four_replicas_together_earn_the_published_ramp() {
    const SECOND: u64 = 1_000_000_000;
    let server = RedisServer::start();
    // On a tick boundary, as are the checkpoints.
    let t0 = 16_667 * 60 * SECOND;
    let clock = Arc::new(AtomicU64::new(t0));
    let c = Arc::clone(&clock);
    let options = Options {
        clock: Arc::new(move || c.load(Ordering::Acquire)),
        function_clock: true,
        refresh: Duration::from_millis(2),
        // A loaded test machine must not pass for an outage.
        timeout: Duration::from_secs(2),
        lease_ttl: Duration::from_secs(3_600),
        heartbeat_ttl: Duration::from_secs(3_600),
        ..Options::default()
    };
    let replicas: Vec<Replica> = (0..4)
        .map(|_| {
            Replica::connect(&server.url(), Policy::fireworks_2024(), Capacity::scopes(64), options.clone())
                .unwrap()
        })
        .collect();
    // The level for the tick the clock is in. The test clock would outrun the leader: at each
    // tick it waits (in real time) until the leader has applied it, as real time would.
    let level = |now: u64| {
        let mut c = server.connection();
        let deadline = Instant::now() + Duration::from_secs(10);
        let tick = now / (60 * SECOND);
        while redis::cmd("HGET").arg(HASH).arg("k").query::<Option<u64>>(&mut c).unwrap().unwrap_or(0) < tick
        {
            assert!(Instant::now() < deadline, "the leader did not apply tick {tick}");
            std::thread::sleep(Duration::from_millis(5));
        }
        redis::cmd("HGET").arg(HASH).arg("l0").query::<Option<f64>>(&mut c).unwrap().unwrap_or(60.0)
    };
    let mut admitted = [0u64; 4];
    let mut seen = Vec::new();
    let step = 5 * SECOND;
    for i in 1..=(2 * 3_600 / 5) {
        let now = t0 + i * step;
        clock.store(now, Ordering::Release);
        if now % (60 * SECOND) == 0 {
            let limit = level(now);
            if [10 * 60 / 5, 3_600 / 5, 2 * 3_600 / 5].contains(&i) {
                seen.push(limit);
            }
        }
        std::thread::sleep(Duration::from_millis(8));
        for (r, count) in replicas.iter().zip(&mut admitted) {
            for _ in 0..10_000 {
                let d = r.admit(KEY, &Request::new(0).max_tokens(0), now).unwrap();
                let Some(p) = d.permit() else { break };
                *count += 1;
                r.settle(p, &Usage::new(0, 0), Completion::Success, now).unwrap();
            }
        }
    }
    println!("levels at 10 min, 1 h, 2 h: {seen:?}; admitted per replica {admitted:?}");
    for (got, want) in seen.iter().zip([120.0, 720.0, 1_440.0]) {
        assert!((got - want).abs() <= want * 0.02, "level {got}, published {want}");
    }
    assert!(admitted.iter().all(|a| *a > 0), "every replica served: {admitted:?}");
}

/// Proof 6's call rate: at 10,000 admissions a second on one busy scope, far under its limit, a
/// replica calls Redis only in the background, a few dozen times a second, never per request.
#[test]
fn ten_thousand_admissions_a_second_need_few_redis_calls() {
    let server = RedisServer::start();
    let mut p = policy_600_rpm();
    p.limits.0[0] = MetricLimits::fixed(6_000_000.0);
    let replica = Replica::connect(&server.url(), p, Capacity::scopes(64), Options::default()).unwrap();
    // Warm the lease (its first sizing) before counting.
    hammer(&replica, Instant::now() + Duration::from_millis(200), FLAT_OUT);
    let calls_before = replica.hosts().redis_calls();
    let began = Instant::now();
    let mut admitted = 0u64;
    for i in 0..20_000u64 {
        // Paced: request i is due at i × 100 µs.
        while began.elapsed() < Duration::from_micros(100 * i) {
            std::hint::spin_loop();
        }
        let d = replica.admit(KEY, &Request::new(0).max_tokens(0), now()).unwrap();
        if let Some(p) = d.permit() {
            admitted += 1;
            replica.settle(p, &Usage::new(0, 0), Completion::Success, now()).unwrap();
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    let calls = replica.hosts().redis_calls() - calls_before;
    println!(
        "{:.0} admissions/s, {:.1} Redis calls/s, {admitted} of 20000 admitted",
        20_000.0 / seconds,
        calls as f64 / seconds
    );
    assert!(admitted >= 19_900, "a limit far above the traffic refuses nothing much: {admitted}");
    assert!(calls * 50 < admitted, "{calls} Redis calls for {admitted} admissions");
}
