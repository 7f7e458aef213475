#!/usr/bin/env bash
# What SPEC §12's counters cost the hot path (issue 17: within 3% of the build without them).
#
# Wall time: the admission benchmark is built twice (core feature `counters` off, then on) and
# the two binaries run alternately, ROUNDS times each, the order swapped every round, so that
# the VM's drift (which moves one run by up to 25%) falls on both alike. Each round gives a
# ratio with/without per benchmark; the median of those ratios is the figure.
# Instructions: the count_instructions harness built both ways, under callgrind (exact).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
rounds=${ROUNDS:-10}
out=$target/counters-cost
rm -rf "$out"
mkdir -p "$out"

# The path of the executable cargo built for one target of sluicegate-benches.
built() {
    local name=$1
    shift
    python3 -c '
import json, sys
name = sys.argv[1]
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name]
print(paths[-1])' "$name" < <(cargo "$@" -q -p sluicegate-benches --message-format=json)
}

for variant in without with; do
    features=()
    [[ $variant == without ]] && features=(--no-default-features)
    cp "$(built admission bench --bench admission --no-run "${features[@]}")" "$out/admission-$variant"
    cp "$(built count_instructions build --release --bin count_instructions "${features[@]}")" \
        "$out/count-$variant"
done

filter='^(admit_settle/sluicegate (keyed 4-metric admit\+settle, caller time|resolved scope)|ffi/sluicegate admit\+settle through the C ABI)'
for round in $(seq "$rounds"); do
    order=(without with)
    ((round % 2 == 0)) && order=(with without)
    for variant in "${order[@]}"; do
        CRITERION_HOME="$out/criterion-$variant" "$out/admission-$variant" --bench "$filter" \
            --warm-up-time 1 --measurement-time 2 --noplot >"$out/round-$round-$variant.txt" 2>/dev/null
    done
done

harnesses=(sluicegate sluicegate-scope sluicegate-c)
for variant in without with; do
    # callgrind.sh prints a header, then one line per harness ending in its count.
    COUNT_BIN="$out/count-$variant" bash benches/callgrind.sh "${harnesses[@]}" | tail -n +2 |
        awk -v variant="$variant" -v names="${harnesses[*]}" \
            'BEGIN { split(names, n, " ") } { printf "%s\t%s\t%d\n", variant, n[NR], $NF }'
done >"$out/instructions.tsv"

python3 - "$out" "$rounds" <<'EOF'
import re, statistics, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
units = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6}

def medians(text):
    """Benchmark id -> criterion's middle estimate in ns."""
    found, name = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "/" in line:
            name = line.split("time:")[0].strip()
        m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if m and name:
            found.setdefault(name, float(m.group(1)) * units[m.group(2)])
    return found

ratios, times = {}, {}
for r in range(1, rounds + 1):
    without = medians((out / f"round-{r}-without.txt").read_text())
    with_ = medians((out / f"round-{r}-with.txt").read_text())
    for name, t in with_.items():
        ratios.setdefault(name, []).append(t / without[name])
        times.setdefault(name, []).append((without[name], t))

print(f"wall time, {rounds} alternating rounds (median of the per-round ratios; min..max):")
for name, rs in ratios.items():
    w = statistics.median(t for t, _ in times[name])
    c = statistics.median(t for _, t in times[name])
    print(f"  {name:70} {w:7.1f} ns -> {c:7.1f} ns  {100 * (statistics.median(rs) - 1):+5.1f}%"
          f"  ({100 * (min(rs) - 1):+.1f}%..{100 * (max(rs) - 1):+.1f}%)")
print("instructions per call (callgrind, exact):")
counts = {}
for line in (out / "instructions.tsv").read_text().splitlines():
    variant, which, n = line.split("\t")
    counts.setdefault(which, {})[variant] = int(n)
for which, c in counts.items():
    print(f"  {which:70} {c['without']:7} -> {c['with']:7}  {100 * (c['with'] / c['without'] - 1):+5.1f}%")
EOF
