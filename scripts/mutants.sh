#!/usr/bin/env bash
# Mutation testing of the core (issue 24): cargo-mutants changes the core's code one small
# mutation at a time and runs the WORKSPACE's tests against each (so the ffi, C and CLI suites
# count too); then this prints the score: detected / viable, where a mutant is detected when the
# tests fail (caught) or hang past the timeout (as PIT and Stryker count it), and viable unless
# it does not build.
#
#   scripts/mutants.sh                       every core mutant (hours on 2 cores)
#   scripts/mutants.sh --shard 1/4           a quarter of them
#   scripts/mutants.sh --in-diff my.diff     those in lines a diff touches
#   scripts/mutants.sh --file core/src/headers.rs -j 2
#
# Arguments are passed to cargo-mutants. Results go to $MUTANTS_OUT/mutants.out (default
# target/mutants/mutants.out): caught.txt, missed.txt, timeout.txt, unviable.txt.
# Needs cargo-mutants: `cargo install cargo-mutants --locked`. Mutants no test can tell from the
# code (equivalent ones) are excluded in .cargo/mutants.toml, each with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."

# The differential test runs 256 cases of 2,000 operations by default (a minute in a debug
# build); a few hundred operations per mutant still compare every operation with the model.
export SLUICEGATE_DIFF_CASES="${SLUICEGATE_DIFF_CASES:-16}"
export SLUICEGATE_DIFF_OPS="${SLUICEGATE_DIFF_OPS:-500}"
# The live-snapshot test's 200 snapshots under traffic take 14 s; 20 still race every write.
export SLUICEGATE_LIVE_SNAPSHOTS="${SLUICEGATE_LIVE_SNAPSHOTS:-20}"
# cargo-mutants times its baseline on the core's tests alone but runs the workspace's for each
# mutant (the C tests rebuild the library with sanitizers): give each mutant room for those.
export CARGO_MUTANTS_MINIMUM_TEST_TIMEOUT="${CARGO_MUTANTS_MINIMUM_TEST_TIMEOUT:-300}"
out="${MUTANTS_OUT:-target/mutants}"
mkdir -p "$out"

status=0
cargo mutants -p sluicegate-core --test-workspace=true --output "$out" "$@" || status=$?

# 0: all caught; 2: some missed; 3: some timed out (takes precedence over 2). Anything else
# (1 usage, 4 failing baseline, 5/6 bad diff, 70 internal) means no score to report.
case "$status" in
    0 | 2 | 3) ;;
    *)
        echo "cargo-mutants failed (exit $status): no score" >&2
        exit "$status"
        ;;
esac

dir="$out/mutants.out"
count() {
    if [[ -s "$dir/$1.txt" ]]; then grep -c . "$dir/$1.txt"; else echo 0; fi
}
caught=$(count caught)
missed=$(count missed)
timeout=$(count timeout)
unviable=$(count unviable)
viable=$((caught + missed + timeout))
echo
echo "caught $caught, missed $missed, timeout $timeout, unviable $unviable"
if ((viable > 0)); then
    detected=$((caught + timeout))
    # Tenths of a percent, in integer arithmetic.
    permille=$((detected * 1000 / viable))
    printf 'mutation score: %d/%d = %d.%d%% of viable mutants detected\n' \
        "$detected" "$viable" $((permille / 10)) $((permille % 10))
else
    echo "mutation score: no viable mutants"
fi
if ((missed > 0)); then
    echo "missed:"
    sed 's/^/  /' "$dir/missed.txt"
fi
exit "$status"
