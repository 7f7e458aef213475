//! SPEC §8, per-account concurrency: at most `max_in_flight` permits of one account outstanding,
//! so that no tenant can take the whole permit ledger; beyond it, 429 `concurrency_limited`.

use sluicegate_core::error_body::write_error_body;
use sluicegate_core::headers::for_each_header;
use sluicegate_core::response::{Dialect, Render};
use sluicegate_core::{
    Capacity, Completion, Engine, Outcome, Overrides, Permit, Policy, Request, ScopeKey, Usage,
};

const SECOND: u64 = 1_000_000_000;

fn key(account: &[u8]) -> ScopeKey<'_> {
    ScopeKey::new(account, b"model")
}

fn unlimited() -> Policy {
    let mut o = Overrides::default();
    for m in sluicegate_core::Metric::ALL {
        o.set(m.limit_parameter(), f64::INFINITY).unwrap();
    }
    Policy::fireworks_2024().with(&o).unwrap()
}

/// One account opening 100,000 permits it never settles gets a quarter of the ledger; a second
/// account is admitted at every instant.
#[test]
fn one_account_can_never_take_the_whole_ledger() {
    let e = Engine::new(unlimited(), Capacity { permits: 4_096, ..Capacity::scopes(256) }).unwrap();
    let mut held = 0;
    for i in 0..100_000u64 {
        let d = e.admit(key(b"greedy"), &Request::new(1), i).unwrap();
        match d.outcome {
            Outcome::Admit(_) => held += 1,
            Outcome::RejectConcurrency(c) => assert_eq!(c.max_in_flight, 1_024),
            other => panic!("{other:?}"),
        }
        if i % 1_000 == 0 {
            let other = e.admit(key(b"other"), &Request::new(1), i).unwrap();
            let p = other.permit().unwrap_or_else(|| panic!("at {i}: {:?}", other.outcome));
            e.settle(p, &Usage::new(1, 0), Completion::Success, i).unwrap();
        }
    }
    assert_eq!(held, 1_024);
    assert_eq!(e.account(b"greedy").unwrap().in_flight, 1_024);
}

/// The policy's cap, an account's own, and every way a permit ends giving its place back.
#[test]
fn each_ending_gives_the_place_back() {
    let mut o = Overrides::default();
    o.set("max_in_flight", 2.0).unwrap();
    let e = Engine::new(unlimited().with(&o).unwrap(), Capacity::scopes(64)).unwrap();
    let admit = || e.admit(key(b"a"), &Request::new(1), 0).unwrap();
    let two: Vec<Permit> = (0..2).map(|_| *admit().permit().unwrap()).collect();
    assert!(matches!(admit().outcome, Outcome::RejectConcurrency(c) if c.max_in_flight == 2));
    e.settle(&two[0], &Usage::new(1, 0), Completion::Success, 0).unwrap();
    let third = *admit().permit().unwrap();
    e.cancel(&third, &Usage::new(1, 0), 0).unwrap();
    let fourth = *admit().permit().unwrap();
    e.settle(&fourth, &Usage::new(1, 0), Completion::UpstreamFailure, 0).unwrap();
    // A second settle gives nothing back twice.
    assert!(e.settle(&fourth, &Usage::new(1, 0), Completion::Success, 0).is_err());
    assert_eq!(e.account(b"a").unwrap().in_flight, 1);
    // Expiry gives the place back.
    let late = e.policy().permit_ttl_ns + 3_600 * SECOND;
    assert!(e.settle(&two[1], &Usage::new(1, 0), Completion::Success, late).is_err());
    assert_eq!(e.account(b"a").unwrap().in_flight, 0);
    // The account's own cap overrides the policy's, and None returns to it.
    e.set_max_in_flight(b"a", Some(3)).unwrap();
    let three: Vec<Permit> = (0..3).map(|_| *admit().permit().unwrap()).collect();
    assert!(matches!(admit().outcome, Outcome::RejectConcurrency(c) if c.max_in_flight == 3));
    assert_eq!(e.account(b"a").unwrap().max_in_flight, Some(3));
    e.set_max_in_flight(b"a", None).unwrap();
    assert!(matches!(admit().outcome, Outcome::RejectConcurrency(c) if c.max_in_flight == 2));
    for p in &three {
        e.settle(p, &Usage::new(1, 0), Completion::Success, 0).unwrap();
    }
    assert_eq!(e.account(b"a").unwrap().in_flight, 0);
    assert!(e.set_max_in_flight(b"a", Some(0)).is_err());
}

/// Refusals by the rate limits or for spend hold no place.
#[test]
fn a_refused_request_holds_no_place() {
    let policy = Policy::fixed().with_fixed_limit(sluicegate_core::Metric::Requests, 1.0);
    let e = Engine::new(policy, Capacity::scopes(64)).unwrap();
    e.set_max_in_flight(b"a", Some(1)).unwrap();
    let first = e.admit(key(b"a"), &Request::new(1), 0).unwrap();
    e.settle(first.permit().unwrap(), &Usage::new(1, 0), Completion::Success, 0).unwrap();
    assert!(matches!(
        e.admit(key(b"a"), &Request::new(1), 0).unwrap().outcome,
        Outcome::RejectRateLimited(_)
    ));
    assert_eq!(e.account(b"a").unwrap().in_flight, 0);
}

/// The refusal is a 429 with its own error type, a retry-after, and `x-should-retry: true`.
#[test]
fn concurrency_limited_is_its_own_429_in_every_dialect() {
    let e = Engine::new(unlimited(), Capacity::scopes(64)).unwrap();
    e.set_max_in_flight(b"a", Some(1)).unwrap();
    assert!(e.admit(key(b"a"), &Request::new(1), 0).unwrap().admitted());
    let d = e.admit(key(b"a"), &Request::new(1), 0).unwrap();
    assert_eq!(d.retry_after_ns(), Some(SECOND));
    for dialect in [Dialect::Fireworks, Dialect::Together, Dialect::OpenAi, Dialect::Anthropic, Dialect::Ietf]
    {
        let render = Render::new(dialect);
        assert_eq!(render.status(&d), 429);
        let mut headers = Vec::new();
        for_each_header(&d, &render, 0, |n, v| headers.push((n.to_string(), v.to_string())));
        let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!((get("retry-after"), get("x-should-retry")), (Some("1"), Some("true")), "{dialect:?}");
        let mut buf = [0u8; 1024];
        let n = write_error_body(&d, &render, &mut buf).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(body["error"]["type"], "concurrency_limited", "{dialect:?}");
        assert!(body["error"]["message"].as_str().unwrap().contains("at most 1 "), "{body}");
    }
}

/// An account's own cap survives a snapshot; its permits do not, nor the places they held.
#[test]
fn a_restore_keeps_the_cap_and_frees_the_places() {
    let e = Engine::new(unlimited(), Capacity::scopes(64)).unwrap();
    e.set_max_in_flight(b"a", Some(5)).unwrap();
    for _ in 0..5 {
        assert!(e.admit(key(b"a"), &Request::new(1), 0).unwrap().admitted());
    }
    let mut buf = vec![0; e.snapshot_size()];
    let n = e.snapshot(&mut buf, 0).unwrap();
    let mut restored = Engine::new(unlimited(), Capacity::scopes(64)).unwrap();
    restored.restore(&buf[..n], 0).unwrap();
    let a = restored.account(b"a").unwrap();
    assert_eq!((a.in_flight, a.max_in_flight), (0, Some(5)));
    for _ in 0..5 {
        assert!(restored.admit(key(b"a"), &Request::new(1), 0).unwrap().admitted());
    }
    assert!(matches!(
        restored.admit(key(b"a"), &Request::new(1), 0).unwrap().outcome,
        Outcome::RejectConcurrency(_)
    ));
}

/// Abandoned permits hold their places only until they expire and are met: every refusal for
/// concurrency meets a stretch of 64 ledger entries, so an account that retries frees its own
/// places within ledger / 64 refusals, and the engine's tick sweep frees them within a tick.
#[test]
fn abandoned_permits_give_their_places_back_once_expired() {
    let e = Engine::new(unlimited(), Capacity::scopes(64)).unwrap();
    let ledger = 1_024; // Capacity::scopes(64)'s permits
    e.set_max_in_flight(b"a", Some(2)).unwrap();
    for _ in 0..2 {
        assert!(e.admit(key(b"a"), &Request::new(1), 0).unwrap().admitted());
    }
    let ttl = e.policy().permit_ttl_ns;
    assert!(matches!(
        e.admit(key(b"a"), &Request::new(1), ttl).unwrap().outcome,
        Outcome::RejectConcurrency(_)
    ));
    let later = ttl + 2 * SECOND;
    let refusals =
        (0..).take_while(|_| !e.admit(key(b"a"), &Request::new(1), later).unwrap().admitted()).count();
    assert!(refusals <= ledger / 64, "{refusals} refusals before the places came back");
    assert_eq!(e.account(b"a").unwrap().in_flight, 1);
}

/// On a ledger one sweep covers, the first request after the abandoned permits expired is
/// admitted: its refusal path meets them before deciding.
#[test]
fn the_first_request_after_expiry_meets_the_abandoned_permits() {
    let e = Engine::new(unlimited(), Capacity { permits: 64, ..Capacity::scopes(64) }).unwrap();
    e.set_max_in_flight(b"a", Some(2)).unwrap();
    for _ in 0..2 {
        assert!(e.admit(key(b"a"), &Request::new(1), 0).unwrap().admitted());
    }
    let later = e.policy().permit_ttl_ns + 2 * SECOND;
    assert!(e.admit(key(b"a"), &Request::new(1), later).unwrap().admitted());
    assert_eq!(e.account(b"a").unwrap().in_flight, 1);
}
