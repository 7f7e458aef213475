//! A fixed number of admit + settle calls (or of governor `check_key` calls), for
//! `valgrind --tool=callgrind`: instruction counts are repeatable where wall time is not.
//!
//! Usage: `count_instructions sluicegate|sluicegate-scope|sluicegate-backing|sluicegate-c|sluicegate-admit|governor CALLS`

use std::hint::black_box;

use sluicegate_benches::{
    CEngine, KEYS, MODEL, accounts, admit_settle, admit_settle_scope, backed_engine, engine,
    engine_with_permits, governor_keyed, governor_keys, request, scopes,
};
use sluicegate_core::{Engine, ScopeKey, Storage};

/// Keyed admit + settle: each key once to create its scope, then `calls` more.
fn keyed<S: Storage>(e: &Engine<S>, names: &[String], calls: usize) {
    for (i, name) in names.iter().enumerate() {
        admit_settle(e, name, i as u64 * 1_000);
    }
    for i in 0..calls {
        admit_settle(e, black_box(&names[i % KEYS]), (KEYS + i) as u64 * 1_000);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_default();
    let calls: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let names = accounts(KEYS);
    match which.as_str() {
        "sluicegate" => keyed(&engine(KEYS), &names, calls),
        "sluicegate-scope" => {
            let e = engine(KEYS);
            let handles = scopes(&e, &names);
            for (i, h) in handles.iter().enumerate() {
                admit_settle_scope(&e, h, i as u64 * 1_000);
            }
            for i in 0..calls {
                admit_settle_scope(&e, black_box(&handles[i % KEYS]), (KEYS + i) as u64 * 1_000);
            }
        }
        // The C engine's storage, from Rust: what the C row is compared with.
        "sluicegate-backing" => keyed(&backed_engine(KEYS), &names, calls),
        "sluicegate-c" => {
            let e = CEngine::new(KEYS);
            for (i, name) in names.iter().enumerate() {
                e.admit_settle(name, i as u64 * 1_000);
            }
            for i in 0..calls {
                e.admit_settle(black_box(&names[i % KEYS]), (KEYS + i) as u64 * 1_000);
            }
        }
        "sluicegate-admit" => {
            // Admits only: permits stay outstanding, so the ledger is sized for all of them.
            let e = engine_with_permits(KEYS, calls + 2 * KEYS);
            for (i, name) in names.iter().enumerate() {
                let _ = e.admit(ScopeKey::new(name.as_bytes(), MODEL), &request(), i as u64 * 1_000);
            }
            for i in 0..calls {
                let key = ScopeKey::new(black_box(&names[i % KEYS]).as_bytes(), MODEL);
                let _ = black_box(e.admit(key, &request(), (KEYS + i) as u64 * 1_000));
            }
        }
        "governor" => {
            let keyed = governor_keyed();
            let keys = governor_keys(&names);
            for k in &keys {
                let _ = keyed.check_key(k);
            }
            for i in 0..calls {
                black_box(keyed.check_key(black_box(&keys[i % KEYS])).is_ok());
            }
        }
        _ => {
            eprintln!(
                "usage: count_instructions sluicegate|sluicegate-scope|sluicegate-backing|sluicegate-c|sluicegate-admit|governor CALLS"
            );
            std::process::exit(2);
        }
    }
}
