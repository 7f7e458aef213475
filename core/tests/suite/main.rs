//! The core's integration tests, as one test binary: each module was its own binary once, and
//! 22 binaries each monomorphizing the engine made a build after a core change (every mutant of
//! `scripts/mutants.sh`) three times as slow. `alloc.rs` (a counting global allocator) and
//! `shared.rs` (re-runs its own binary as child workers) stay binaries of their own.

mod model;
mod snapshot_mutation;

mod accounts;
mod bad_input;
mod concurrency_cap;
mod decisions;
mod differential;
mod handles;
mod hostile;
mod invariants;
mod json_doc;
mod keys;
mod lease;
mod linearizable;
mod live_snapshot;
mod messages;
mod metrics;
mod openai_request;
mod openai_usage;
mod responses;
mod restore_leftovers;
mod settle_timing;
mod snapshot;
mod spec;
mod spend_reservation;
mod stress;
