//! The Redis function library against a real redis-server: lease arithmetic, reloading, and
//! hostile answers and data.

mod common;

use std::time::Duration;

use common::RedisServer;
use redis::Value;
use sluicegate_redis::Error;
use sluicegate_redis::functions::{Functions, LeaseAnswer, LeaseCall, MetricAsk, parse_lease};

const T0: u64 = 1_000_000_000_000;
const WINDOW: u64 = 60_000_000;
/// 600 requests per minute.
const RPM_600: f64 = 100_000.0;

fn connect(server: &RedisServer) -> Functions {
    Functions::connect(&server.url(), Duration::from_secs(2)).unwrap()
}

/// One lease's side of the protocol: its call numbers and running sums.
struct Lessee {
    name: &'static str,
    seq: u64,
    sent: i64,
    received: u64,
    answered: bool,
}

impl Lessee {
    fn new(name: &'static str) -> Self {
        Lessee { name, seq: 0, sent: 0, received: 0, answered: false }
    }

    /// The next call, limiting requests only (tokens unlimited), at `now_us`.
    fn call(&mut self, now_us: u64, delta: i64, need: u64, want: u64) -> LeaseCall {
        self.seq += 1;
        self.sent += delta;
        let requests =
            MetricAsk { interval_us: RPM_600, sent: self.sent, received: self.received, need, want };
        LeaseCall {
            now_us: Some(now_us),
            window_us: WINDOW,
            hard_us: WINDOW,
            ttl_ms: 60_000,
            caller: self.name.into(),
            seq: self.seq,
            done: false,
            metrics: [requests, MetricAsk::default(), MetricAsk::default(), MetricAsk::default()],
            answered: self.answered,
        }
    }

    /// Sends `call` and takes in its answer.
    fn send(&mut self, f: &mut Functions, call: &LeaseCall) -> LeaseAnswer {
        let a = f.lease(b"s", b"scopes", call).unwrap();
        self.received += a.metrics[0].grant;
        self.answered = true;
        a
    }

    fn lease(&mut self, f: &mut Functions, now_us: u64, delta: i64, need: u64, want: u64) -> LeaseAnswer {
        let call = self.call(now_us, delta, need, want);
        self.send(f, &call)
    }

    fn grant(&mut self, f: &mut Functions, now_us: u64, delta: i64, need: u64, want: u64) -> u64 {
        self.lease(f, now_us, delta, need, want).metrics[0].grant
    }
}

fn used(server: &RedisServer) -> i64 {
    redis::cmd("HGET").arg("s").arg("u0").query::<Option<i64>>(&mut server.connection()).unwrap().unwrap_or(0)
}

/// A full bucket of 600 is granted in shrinking slices, never a unit more than it holds;
/// a second later ten more units have flowed in.
#[test]
fn leases_grant_exactly_what_the_bucket_holds() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut a = Lessee::new("a");
    let mut granted = Vec::new();
    loop {
        let g = a.grant(&mut f, T0, 0, 1, 1_000);
        if g == 0 {
            break;
        }
        granted.push(g);
    }
    assert_eq!(granted.iter().sum::<u64>(), 600);
    assert_eq!(granted[..3], [150, 150, 150], "a quarter of the bucket while it is half full or more");
    assert!(granted[3] < 150 && granted.windows(2).all(|w| w[1] <= w[0]), "{granted:?}");
    assert_eq!(
        a.grant(&mut f, T0 + 1_000_000, 0, 1, 1_000),
        2,
        "a quarter of the ten units back, or the need"
    );
    assert_eq!(a.grant(&mut f, T0 + 1_000_000, 0, 8, 8), 8);
    assert_eq!(a.grant(&mut f, T0 + 1_000_000, 0, 1, 1), 0);
    assert_eq!(used(&server), 610);
}

/// Giving back frees units for others, but never more than a full bucket; usage beyond a lease
/// is charged even past the hard limit, and refuses everyone until it has drained.
#[test]
fn returns_stop_at_a_full_bucket_and_overruns_go_into_debt() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut a = Lessee::new("a");
    assert_eq!(a.grant(&mut f, T0, 0, 150, 150), 150);
    let back = a.lease(&mut f, T0, -10_000, 0, 0);
    assert_eq!(back.metrics[0].debt_us, 0, "a refund stops at a full bucket");
    let charged = a.lease(&mut f, T0, 700, 1, 1);
    assert_eq!((charged.metrics[0].grant, charged.metrics[0].debt_us), (0, 70_000_000));
    assert!(charged.over, "past its window");
    // 10 s later the debt is 60 s: the bucket is exactly empty.
    assert_eq!(a.grant(&mut f, T0 + 10_000_000, 0, 1, 1), 0);
    assert_eq!(a.grant(&mut f, T0 + 10_100_000, 0, 1, 1), 1);
}

/// A lease is all-or-nothing across metrics: requests to spare are not granted when the
/// tokens a request needs are not there.
#[test]
fn a_lease_grants_nothing_unless_every_metric_meets_its_need() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut lessee = Lessee::new("a");
    let mut call = lessee.call(T0, 0, 1, 10);
    // 1,000 prompt tokens per minute, and a request needing 1,001.
    call.metrics[1] = MetricAsk { interval_us: 60_000.0, sent: 0, received: 0, need: 1_001, want: 1_001 };
    let a = f.lease(b"s", b"scopes", &call).unwrap();
    assert_eq!(a.metrics.map(|m| m.grant), [0; 4]);
    call.metrics[1].need = 250;
    call.seq += 1;
    let a = f.lease(b"s", b"scopes", &call).unwrap();
    assert_eq!(a.metrics.map(|m| m.grant), [10, 250, 0, 0]);
    assert_eq!(a.metrics.map(|m| m.interval_ns), [100_000_000, 60_000_000, 0, 0]);
}

/// Redis lost its functions (a restart, a FUNCTION FLUSH): the next call loads them again.
#[test]
fn a_flushed_library_is_loaded_again_by_itself() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut a = Lessee::new("a");
    assert_eq!(a.grant(&mut f, T0, 0, 1, 1), 1);
    redis::cmd("FUNCTION").arg("FLUSH").query::<()>(&mut server.connection()).unwrap();
    assert_eq!(a.grant(&mut f, T0, 0, 1, 1), 1);
    let live = f.heartbeat(b"replicas", Some(T0), "a", 1_000_000).unwrap();
    assert_eq!(live, 1);
}

/// Garbage in a scope's hash never stops the scope and never lets it admit more: a damaged
/// debt reads as an empty bucket, which refills; a damaged level reads as the caller's.
#[test]
fn garbage_fields_read_as_an_empty_bucket() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut c = server.connection();
    redis::cmd("HSET")
        .arg("s")
        .arg("d0")
        .arg("not a number")
        .arg("i0")
        .arg("nan")
        .arg("t")
        .arg("inf")
        .query::<()>(&mut c)
        .unwrap();
    let mut lessee = Lessee::new("a");
    let a = lessee.lease(&mut f, T0, 0, 1, 1);
    assert_eq!((a.metrics[0].grant, a.metrics[0].interval_ns), (0, 100_000_000));
    assert_eq!(lessee.grant(&mut f, T0 + 100_000, 0, 1, 1), 1, "it refills");
    redis::cmd("HSET").arg("s").arg("q:a").arg("garbage").arg("c0:a").arg("x").query::<()>(&mut c).unwrap();
    assert_eq!(lessee.grant(&mut f, T0 + 200_000, 0, 1, 1), 1, "damaged sums read as none");
    redis::cmd("SET").arg("t").arg("a string, not a hash").query::<()>(&mut c).unwrap();
    match f.lease(b"t", b"scopes", &lessee.call(T0, 0, 1, 1)) {
        Err(Error::Redis(e)) => assert!(e.contains("WRONGTYPE"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// Answers of the wrong shape are typed errors, never a panic: from a library of our name
/// that is not ours, and every shape `parse_lease` can be handed.
#[test]
fn answers_of_the_wrong_shape_are_typed_errors() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let impostor = "#!lua name=sluicegate_v2\nredis.register_function('sg_lease_v2', function() return 'hello' end)\n\
                    redis.register_function('sg_heartbeat_v2', function() return {1} end)";
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(impostor)
        .query::<String>(&mut server.connection())
        .unwrap();
    assert!(matches!(f.lease(b"s", b"scopes", &Lessee::new("a").call(T0, 0, 1, 1)), Err(Error::Answer(_))));
    assert!(matches!(f.heartbeat(b"r", None, "a", 1), Err(Error::Answer(_))));

    let ints = |v: &[i64]| Value::Array(v.iter().map(|i| Value::Int(*i)).collect());
    let good = [T0 as i64, 0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert!(parse_lease(&ints(&good)).is_ok());
    assert!(matches!(parse_lease(&ints(&good[..13])), Err(Error::Answer(_))));
    let mut negative = good;
    negative[2] = -1;
    assert!(matches!(parse_lease(&ints(&negative)), Err(Error::Answer(_))));
    let mut band = good;
    band[1] = 2;
    assert!(matches!(parse_lease(&ints(&band)), Err(Error::Answer(_))));
    assert!(matches!(parse_lease(&ints(&[T0 as i64, 2])), Err(Error::Forgotten)));
    assert!(matches!(parse_lease(&ints(&[T0 as i64, 1])), Err(Error::Answer(_))));
    assert!(matches!(parse_lease(&Value::Nil), Err(Error::Answer(_))));
    let mut nested: Vec<Value> = good.iter().map(|i| Value::Int(*i)).collect();
    nested[5] = Value::BulkString(b"5".to_vec());
    assert!(matches!(parse_lease(&Value::Array(nested)), Err(Error::Answer(_))));
}

/// Nothing listening: a typed error at once, not a hang.
#[test]
fn a_refused_connection_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused = Functions::connect(&format!("redis://127.0.0.1:{port}/0"), Duration::from_secs(1));
    assert!(matches!(refused, Err(Error::Unreachable(_))), "{:?}", refused.err());
    assert!(matches!(Functions::connect("not a url", Duration::from_secs(1)), Err(Error::Redis(_))));
}

/// Heartbeats count the replicas heard from within their TTL.
#[test]
fn heartbeats_count_the_live_replicas() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    assert_eq!(f.heartbeat(b"r", Some(T0), "a", 3_000_000).unwrap(), 1);
    assert_eq!(f.heartbeat(b"r", Some(T0 + 1_000_000), "b", 3_000_000).unwrap(), 2);
    assert_eq!(f.heartbeat(b"r", Some(T0 + 2_000_000), "a", 3_000_000).unwrap(), 2);
    assert_eq!(f.heartbeat(b"r", Some(T0 + 4_500_000), "a", 3_000_000).unwrap(), 1, "b fell silent");
}

/// A call that timed out may still arrive, late: it then changes nothing. Its corrections are
/// made good by the next call, once; the units it granted, whose answer never arrived, go back
/// into the bucket; and Redis counts exactly what was used.
#[test]
fn a_late_call_counts_once_and_a_lost_grant_goes_back() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut a = Lessee::new("a");
    assert_eq!(a.grant(&mut f, T0, 0, 100, 100), 100);
    // Call 2 gives back 40 and is granted 100 more, but its answer is lost.
    let lost = a.call(T0, -40, 100, 100);
    assert_eq!(f.lease(b"s", b"scopes", &lost).unwrap().metrics[0].grant, 100);
    // Call 3 carries the sums again (40 given back) and takes 10 more.
    let next = a.lease(&mut f, T0, 0, 10, 10);
    assert_eq!(next.metrics[0].grant, 10);
    assert_eq!(next.metrics[0].debt_us, (100 - 40 + 10) * 100_000, "the 40 once, the lost 100 back");
    // Call 2 arrives again, late: nothing changes, nothing is granted.
    let late = f.lease(b"s", b"scopes", &lost).unwrap();
    assert_eq!((late.metrics[0].grant, late.metrics[0].debt_us), (0, next.metrics[0].debt_us));
    assert_eq!(used(&server), 70);
    // Done: the lessee's sums are forgotten, so the next lease of that name starts afresh.
    let mut done = a.call(T0, -70, 0, 0);
    done.done = true;
    a.send(&mut f, &done);
    assert_eq!(used(&server), 0);
    let fields = fields(&server);
    assert!(fields.iter().all(|k| !k.ends_with(":a")), "{fields:?}");
    assert_eq!(Lessee::new("a").grant(&mut f, T0, 0, 1, 1), 1);
}

fn fields(server: &RedisServer) -> Vec<String> {
    redis::cmd("HKEYS").arg("s").query::<Vec<String>>(&mut server.connection()).unwrap()
}

/// Leases of crashed replicas never call again. In a scope that is never idle for as long as
/// its hash lives (60 s here), their sums are swept once they have been silent that long, so
/// the hash does not grow with every crash; what they leased stays counted as used.
#[test]
fn callers_silent_as_long_as_the_hash_lives_are_swept_from_a_busy_scope() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    const DEAD: [&str; 40] = [
        "d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8", "d9", "d10", "d11", "d12", "d13", "d14", "d15",
        "d16", "d17", "d18", "d19", "d20", "d21", "d22", "d23", "d24", "d25", "d26", "d27", "d28", "d29",
        "d30", "d31", "d32", "d33", "d34", "d35", "d36", "d37", "d38", "d39",
    ];
    for name in DEAD {
        assert_eq!(Lessee::new(name).grant(&mut f, T0, 0, 1, 1), 1);
    }
    assert!(fields(&server).len() > DEAD.len() * 10, "each lease's sums and last call are kept");
    let mut live = Lessee::new("live");
    // Every 2 s for 3 minutes: the dead fall silent for the hash's 60 s after the first minute.
    for k in 0..90 {
        live.lease(&mut f, T0 + k * 2_000_000, 0, 0, 0);
    }
    let left = fields(&server);
    assert!(left.iter().all(|k| !DEAD.iter().any(|d| k.ends_with(&format!(":{d}")))), "{left:?}");
    assert!(left.iter().any(|k| k == "q:live"), "the live caller is kept: {left:?}");
    assert_eq!(used(&server), 40, "what the dead leased stays used");
}

/// A caller that was forgotten (silent for as long as the hash lives) and calls again, having
/// had answers before, is told so: its sums are not applied a second time, nothing changes,
/// and under a new name it leases as any new caller.
#[test]
fn a_forgotten_caller_is_told_so_and_changes_nothing() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut sleeper = Lessee::new("sleeper");
    assert_eq!(sleeper.grant(&mut f, T0, 0, 300, 300), 300);
    let mut busy = Lessee::new("busy");
    for k in 0..40 {
        busy.lease(&mut f, T0 + k * 2_000_000, 0, 0, 0);
    }
    assert!(!fields(&server).iter().any(|k| k.ends_with(":sleeper")), "swept");
    let before = busy.lease(&mut f, T0 + 80_000_000, 0, 0, 0).metrics[0].debt_us;
    // It gives back the 300 it holds: to a hash that no longer knows its sums, the call would
    // apply them whole (they could as well have been applied already), so it is refused.
    let back = sleeper.call(T0 + 80_000_000, -300, 0, 0);
    assert!(matches!(f.lease(b"s", b"scopes", &back), Err(Error::Forgotten)));
    assert_eq!(busy.lease(&mut f, T0 + 80_000_000, 0, 0, 0).metrics[0].debt_us, before, "nothing changed");
    assert_eq!(used(&server), 300);
    // A caller that never had an answer is new, not forgotten.
    assert_eq!(Lessee::new("sleeper-2").grant(&mut f, T0 + 80_000_000, -300, 1, 1), 1);
    assert_eq!(used(&server), 1, "the give-back, once, under the new name, and one unit");
}

/// A damaged last-call time (another program's write, a bad restore) reads as long ago: the
/// caller is swept and, when it calls again, told it was forgotten; nothing is applied twice.
#[test]
fn a_damaged_last_call_time_forgets_the_caller_safely() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut a = Lessee::new("a");
    assert_eq!(a.grant(&mut f, T0, 0, 50, 50), 50);
    redis::cmd("HSET").arg("s").arg("s:a").arg("not a time").query::<i64>(&mut server.connection()).unwrap();
    // Another caller's call a second later sweeps.
    Lessee::new("b").lease(&mut f, T0 + 2_000_000, 0, 0, 0);
    assert!(!fields(&server).iter().any(|k| k.ends_with(":a")), "swept: {:?}", fields(&server));
    let back = a.call(T0 + 2_000_000, -50, 0, 0);
    assert!(matches!(f.lease(b"s", b"scopes", &back), Err(Error::Forgotten)));
    assert_eq!(used(&server), 50, "the give-back was not applied to a forgotten caller's sums");
}
