//! Restores arbitrary bytes: the parser must refuse or accept without panicking, and a refusal
//! must leave the engine exactly as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluicegate_core::{Capacity, Engine, Policy, Request, ScopeKey};

fuzz_target!(|data: &[u8]| {
    let capacity = Capacity { scopes: 64, accounts: 64, models: 8, permits: 64 };
    let Ok(mut engine) = Engine::new(Policy::fireworks_2024(), capacity) else { return };
    let _ = engine.admit(ScopeKey::new(b"acct", b"model"), &Request::new(10), 0);
    let mut before = vec![0; engine.snapshot_size()];
    let Ok(n) = engine.snapshot(&mut before, 0) else { return };
    before.truncate(n);
    if engine.restore(data, 0).is_err() {
        let mut after = vec![0; engine.snapshot_size()];
        let m = engine.snapshot(&mut after, 0).unwrap_or(0);
        after.truncate(m);
        assert_eq!(before, after, "a refused restore changed the engine");
    }
});
