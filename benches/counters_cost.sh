#!/usr/bin/env bash
# What SPEC §12's counters cost the hot path: the admit+settle benchmarks built without them
# (core feature `counters` off) saved as a criterion baseline, then built with them and compared
# against it in the same criterion run of the same machine. Criterion prints each "change".
set -euo pipefail
cd "$(dirname "$0")/.."
filter='admit_settle/sluicegate|ffi/sluicegate'
cargo bench -p sluicegate-benches --bench admission --no-default-features -- "$filter" --save-baseline without_counters
cargo bench -p sluicegate-benches --bench admission -- "$filter" --baseline without_counters
