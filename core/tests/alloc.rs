//! The hot path never allocates: a counting global allocator sees zero allocations across
//! 100,000 admit + settle calls after construction (first-time keys, rejections and stream
//! charges included), nor in rendering the metrics into a buffer.

mod counting;

use sluicegate_core::{Capacity, Completion, Engine, Policy, Request, ScopeKey, Usage};

#[test]
fn admit_and_settle_never_allocate() {
    let engine = Engine::new(Policy::fireworks_2024(), Capacity::scopes(16_384)).unwrap();
    let accounts: Vec<Vec<u8>> = (0..2_000).map(|i| format!("acct-{i}").into_bytes()).collect();
    let models = [b"llama-v3p1-70b".as_slice(), b"mixtral-8x22b", b"qwen-72b"];
    counting::start();
    let mut admitted = 0u32;
    for i in 0..100_000u64 {
        let key = ScopeKey::new(&accounts[i as usize % accounts.len()], models[i as usize % 3]);
        let now = i * 1_000_000;
        // Big requests on some scopes are rejected; all go through the same path.
        let request = Request::new(if i % 7 == 0 { 50_000 } else { 500 }).max_tokens(200);
        let decision = engine.admit(key, &request, now).unwrap();
        if let Some(p) = decision.permit() {
            admitted += 1;
            engine.charge(p, 50, now).unwrap();
            engine.settle(p, &Usage::new(500, 120), Completion::Success, now).unwrap();
        }
    }
    // So does rendering the metrics into a caller's buffer, as a C gateway's /metrics does.
    let mut buf = [0u8; 1 << 16];
    let rendered = engine.render_prometheus(&mut buf).unwrap();
    let allocations = counting::stop();
    assert!(admitted > 50_000, "the test must exercise admissions: {admitted}");
    assert!(rendered > 1_000, "the metrics must have been rendered: {rendered} bytes");
    assert_eq!(allocations, 0);
}

/// Resolving a scope and admitting through its handle allocate nothing either, also when the
/// handle's scope was reclaimed and is looked up again.
#[test]
fn resolving_and_admitting_through_handles_never_allocate() {
    let capacity = Capacity { scopes: 64, accounts: 64, models: 4, permits: 1_024 };
    let engine = Engine::new(Policy::fireworks_2024(), capacity).unwrap();
    let accounts: Vec<Vec<u8>> = (0..256).map(|i| format!("acct-{i}").into_bytes()).collect();
    counting::start();
    let mut admitted = 0u32;
    for round in 0..100u64 {
        // A minute apart: the last round's scopes are idle and give way to this round's.
        let now = round * 60_000_000_000;
        let handles: [_; 32] = core::array::from_fn(|k| {
            let account = &accounts[(round as usize * 32 + k) % accounts.len()];
            engine.scope(ScopeKey::new(account, b"llama-v3p1-70b"), now)
        });
        for i in 0..3_200u64 {
            let Ok(handle) = &handles[i as usize % 32] else { continue };
            let decision = engine.admit_scope(handle, &Request::new(500).max_tokens(200), now + i).unwrap();
            if let Some(p) = decision.permit() {
                admitted += 1;
                engine.settle(p, &Usage::new(500, 120), Completion::Success, now + i).unwrap();
            }
        }
    }
    let allocations = counting::stop();
    assert!(admitted > 50_000, "the test must exercise admissions: {admitted}");
    assert_eq!(allocations, 0);
}
