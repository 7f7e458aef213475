//! A replica's hot path never allocates: once a scope holds its lease, a counting allocator sees
//! no allocation by the calling thread across 10,000 admit + settle calls, refusals included
//! (the lease thread's background work is its own).

mod common;
#[path = "../../core/tests/counting/mod.rs"]
mod counting;

use std::time::Duration;

use common::RedisServer;
use sluicegate_core::{Capacity, Completion, Metric, Policy, Request, ScopeKey, Usage};
use sluicegate_redis::{Options, Replica};

#[test]
fn a_replicas_admit_and_settle_never_allocate() {
    let server = RedisServer::start();
    // 600 requests a minute: the loop below is refused most of the time, as a hot scope is.
    let policy = Policy::fixed().with_fixed_limit(Metric::Requests, 600.0);
    let replica = Replica::connect(&server.url(), policy, Capacity::scopes(64), Options::default()).unwrap();
    let key = ScopeKey::new(b"acct", b"model");
    let now = sluicegate_core::clock::now_ns;
    // The scope's first request fetches its lease (and may allocate doing so).
    assert!(replica.admit(key, &Request::new(10).max_tokens(10), now()).unwrap().admitted());
    std::thread::sleep(Duration::from_millis(50));
    counting::start();
    let (mut admitted, mut refused) = (0, 0);
    for _ in 0..10_000 {
        let d = replica.admit(key, &Request::new(10).max_tokens(10), now()).unwrap();
        match d.permit() {
            Some(p) => {
                admitted += 1;
                replica.settle(p, &Usage::new(10, 3), Completion::Success, now()).unwrap();
            }
            None => refused += 1,
        }
    }
    let allocations = counting::stop();
    assert_eq!(allocations, 0, "{admitted} admitted, {refused} refused");
    assert!(admitted > 0 && refused > 0, "both paths ran: {admitted} admitted, {refused} refused");
}
