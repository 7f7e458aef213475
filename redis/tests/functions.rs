//! The Redis function library against a real redis-server: lease arithmetic, reloading, and
//! hostile answers and data.

mod common;

use std::time::Duration;

use common::RedisServer;
use redis::Value;
use sluicegate_redis::Error;
use sluicegate_redis::functions::{Functions, LeaseCall, MetricAsk, parse_lease};

const T0: u64 = 1_000_000_000_000;
const WINDOW: u64 = 60_000_000;
/// 600 requests per minute.
const RPM_600: f64 = 100_000.0;

fn connect(server: &RedisServer) -> Functions {
    Functions::connect(&server.url(), Duration::from_secs(2)).unwrap()
}

/// A call limiting requests only (tokens unlimited), at `now_us`.
fn ask(now_us: u64, delta: i64, need: u64, want: u64) -> LeaseCall {
    let requests = MetricAsk { interval_us: RPM_600, delta, need, want };
    LeaseCall {
        now_us: Some(now_us),
        window_us: WINDOW,
        hard_us: WINDOW,
        ttl_ms: 60_000,
        metrics: [requests, MetricAsk::default(), MetricAsk::default(), MetricAsk::default()],
    }
}

/// A full bucket of 600 is granted in shrinking slices, never a unit more than it holds;
/// a second later ten more units have flowed in.
#[test]
fn leases_grant_exactly_what_the_bucket_holds() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut granted = Vec::new();
    loop {
        let a = f.lease(b"s", &ask(T0, 0, 1, 1_000)).unwrap();
        if a.metrics[0].grant == 0 {
            break;
        }
        granted.push(a.metrics[0].grant);
    }
    assert_eq!(granted.iter().sum::<u64>(), 600);
    assert_eq!(granted[..3], [150, 150, 150], "a quarter of the bucket while it is half full or more");
    assert!(granted[3] < 150 && granted.windows(2).all(|w| w[1] <= w[0]), "{granted:?}");
    let later = f.lease(b"s", &ask(T0 + 1_000_000, 0, 1, 1_000)).unwrap();
    assert_eq!(later.metrics[0].grant, 2, "a quarter of the ten units back, or the need");
    let rest = f.lease(b"s", &ask(T0 + 1_000_000, 0, 8, 8)).unwrap();
    assert_eq!(rest.metrics[0].grant, 8);
    assert_eq!(f.lease(b"s", &ask(T0 + 1_000_000, 0, 1, 1)).unwrap().metrics[0].grant, 0);
}

/// Giving back frees units for others, but never more than a full bucket; usage beyond a lease
/// is charged even past the hard limit, and refuses everyone until it has drained.
#[test]
fn returns_stop_at_a_full_bucket_and_overruns_go_into_debt() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    assert_eq!(f.lease(b"s", &ask(T0, 0, 150, 150)).unwrap().metrics[0].grant, 150);
    let back = f.lease(b"s", &ask(T0, -10_000, 0, 0)).unwrap();
    assert_eq!(back.metrics[0].debt_us, 0, "a refund stops at a full bucket");
    let charged = f.lease(b"s", &ask(T0, 700, 1, 1)).unwrap();
    assert_eq!((charged.metrics[0].grant, charged.metrics[0].debt_us), (0, 70_000_000));
    assert!(charged.over, "past its window");
    // 10 s later the debt is 60 s: the bucket is exactly empty.
    assert_eq!(f.lease(b"s", &ask(T0 + 10_000_000, 0, 1, 1)).unwrap().metrics[0].grant, 0);
    assert_eq!(f.lease(b"s", &ask(T0 + 10_100_000, 0, 1, 1)).unwrap().metrics[0].grant, 1);
}

/// A lease is all-or-nothing across metrics: requests to spare are not granted when the
/// tokens a request needs are not there.
#[test]
fn a_lease_grants_nothing_unless_every_metric_meets_its_need() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    let mut call = ask(T0, 0, 1, 10);
    // 1,000 prompt tokens per minute, and a request needing 1,001.
    call.metrics[1] = MetricAsk { interval_us: 60_000.0, delta: 0, need: 1_001, want: 1_001 };
    let a = f.lease(b"s", &call).unwrap();
    assert_eq!(a.metrics.map(|m| m.grant), [0; 4]);
    call.metrics[1].need = 250;
    let a = f.lease(b"s", &call).unwrap();
    assert_eq!(a.metrics.map(|m| m.grant), [10, 250, 0, 0]);
    assert_eq!(a.metrics.map(|m| m.interval_ns), [100_000_000, 60_000_000, 0, 0]);
}

/// Redis lost its functions (a restart, a FUNCTION FLUSH): the next call loads them again.
#[test]
fn a_flushed_library_is_loaded_again_by_itself() {
    let server = RedisServer::start();
    let mut f = connect(&server);
    assert_eq!(f.lease(b"s", &ask(T0, 0, 1, 1)).unwrap().metrics[0].grant, 1);
    redis::cmd("FUNCTION").arg("FLUSH").query::<()>(&mut server.connection()).unwrap();
    assert_eq!(f.lease(b"s", &ask(T0, 0, 1, 1)).unwrap().metrics[0].grant, 1);
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
    let a = f.lease(b"s", &ask(T0, 0, 1, 1)).unwrap();
    assert_eq!((a.metrics[0].grant, a.metrics[0].interval_ns), (0, 100_000_000));
    assert_eq!(f.lease(b"s", &ask(T0 + 100_000, 0, 1, 1)).unwrap().metrics[0].grant, 1, "it refills");
    redis::cmd("SET").arg("t").arg("a string, not a hash").query::<()>(&mut c).unwrap();
    match f.lease(b"t", &ask(T0, 0, 1, 1)) {
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
    let impostor = "#!lua name=sluicegate_v1\nredis.register_function('sg_lease_v1', function() return 'hello' end)\n\
                    redis.register_function('sg_heartbeat_v1', function() return {1} end)";
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(impostor)
        .query::<String>(&mut server.connection())
        .unwrap();
    assert!(matches!(f.lease(b"s", &ask(T0, 0, 1, 1)), Err(Error::Answer(_))));
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
