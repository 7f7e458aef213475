//! A replica's hot path never allocates: once a scope holds its lease, a counting allocator sees
//! no allocation by the calling thread across 10,000 admit + settle calls, refusals included
//! (the lease thread's background work is its own).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use common::RedisServer;
use sluicegate_core::{Capacity, Completion, Metric, Policy, Request, ScopeKey, Usage};
use sluicegate_redis::{Options, Replica};

struct Counting;

thread_local! {
    /// Allocations made by this thread while counting is on.
    static COUNT: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note() {
    COUNT.with(|c| {
        if let Some(n) = c.get() {
            c.set(Some(n + 1));
        }
    });
}

// SAFETY: forwards every call to the system allocator unchanged; counting touches only a
// thread-local Cell that needs no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

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
    COUNT.with(|c| c.set(Some(0)));
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
    let allocations = COUNT.with(|c| c.replace(None)).unwrap_or(0);
    assert_eq!(allocations, 0, "{admitted} admitted, {refused} refused");
    assert!(admitted > 0 && refused > 0, "both paths ran: {admitted} admitted, {refused} refused");
}
