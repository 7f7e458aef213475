//! Structure-aware restore fuzzing (issue 20, "fuzzing past the checksum").
//!
//! Random bytes never pass the magic number and the CRC, so they never reach the validator
//! behind it. Here the bytes are a recipe instead: the first ones pick a policy, capacities, a
//! seed and a few operations (admits, settles, charges, credits, spend limits, overrides, tiers,
//! quotas, loads, prices, clock jumps) that build an engine; the rest are mutations of its
//! snapshot — a record and a field of the layout in `docs/snapshot.md` set to an interesting value
//! (0, 1, all ones, `u32::MAX`, ±k, a flipped bit, the largest debt a word holds and one more,
//! NaN, −1.0, ±∞, −0.0, ...), records swapped, duplicated or removed, counts changed, a scope
//! pointed at another account or model, a raw byte — after which the CRC is re-sealed.
//!
//! The restore must refuse with a typed `SnapshotError` and leave the engine byte-for-byte
//! unchanged, or accept a state on which the engine keeps its invariants: admits and settles on
//! the restored and on new keys never panic, remaining ≤ limit, a permit settles at most once,
//! admissions stay within the hard band, what was accepted snapshots back as it was, and
//! snapshots of the restored engine restore again. A failed assertion is a crash.
//!
//! The recipe decoder and the property are shared with the stable proptest
//! (`core/tests/suite/snapshot.rs`), which runs the same check on every CI build.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../core/tests/suite/snapshot_mutation/mod.rs"]
mod snapshot_mutation;

fuzz_target!(|data: &[u8]| {
    snapshot_mutation::check(&snapshot_mutation::Bytes::new(data).case());
});
