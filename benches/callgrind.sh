#!/usr/bin/env bash
# Instructions per call under valgrind's callgrind: repeatable where wall time is not.
# Runs each harness twice (N and 2N calls) and divides the difference by N, so set-up cost drops
# out. Needs valgrind (Debian: apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
# governor's map hashes with a random seed, so its set-up differs between the two runs: at 20,000
# calls that moved its figure between 240 and 670; at 100,000 it holds within a few percent.
calls=${CALLS:-100000}
# COUNT_BIN: a harness built elsewhere (counters_cost.sh builds one without the counters);
# arguments: the harnesses to count, all of them by default.
if [[ -z ${COUNT_BIN:-} ]]; then
    cargo build --release -q -p sluicegate-benches --bin count_instructions
fi
bin=${COUNT_BIN:-${CARGO_TARGET_DIR:-target}/release/count_instructions}

refs() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 |
        sed -n 's/.*I[[:space:]]*refs:[[:space:]]*//p' | tr -d ,
}

printf '%-44s %s\n' "measure" "instructions per call"
harnesses=("$@")
((${#harnesses[@]})) || harnesses=(sluicegate sluicegate-scope sluicegate-backing sluicegate-c sluicegate-admit governor)
for which in "${harnesses[@]}"; do
    small=$(refs "$which" "$calls")
    large=$(refs "$which" $((2 * calls)))
    case $which in
        sluicegate) label="sluicegate keyed 4-metric admit + settle" ;;
        sluicegate-scope) label="sluicegate resolved scope admit + settle" ;;
        sluicegate-backing) label="sluicegate keyed, the C engine's storage" ;;
        sluicegate-c) label="sluicegate keyed admit + settle through C" ;;
        sluicegate-admit) label="sluicegate keyed 4-metric admit" ;;
        governor) label="governor keyed check_key (1000 keys)" ;;
    esac
    printf '%-44s %d\n' "$label" $(((large - small) / calls))
done
