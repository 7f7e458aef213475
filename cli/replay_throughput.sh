#!/usr/bin/env bash
# Replay throughput, end to end (parsing included): the bundled Azure trace, 200,000 requests on
# one scope and on 40,000 (the work per request must not grow with the scopes), and 1,000,000
# synthetic requests over skewed tenants, four models and three tiers. Best of three runs; prints
# README table rows.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p sluicegate-cli
bin="${CARGO_TARGET_DIR:-target}/release/sluicegate"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$dir" <<'PY'
import random, sys
d = sys.argv[1]
header = "t_ms,account,model,variant,priority,n,prompt_tokens,cached_tokens,max_tokens,generated_tokens\n"
for name, scopes in (("one_scope", 1), ("40k_scopes", 40_000)):
    with open(f"{d}/{name}.csv", "w") as f:
        f.write(header)
        f.writelines(f"{i * 5},acct-{i % scopes},m,regular,0,1,500,0,100,80\n" for i in range(200_000))
random.seed(7)
with open(f"{d}/synthetic_1m.csv", "w") as f:
    f.write(header)
    t = 0
    for i in range(1_000_000):
        t += random.randint(0, 12)
        tenant = int(random.paretovariate(1.1)) % 5_000
        variant = "fast" if i % 10 == 0 else "regular"
        tier = ("default", "priority", "flex")[i % 3]
        prompt, cached, generated = random.randint(50, 4_000), random.randint(0, 50), random.randint(1, 256)
        f.write(f"{t},tenant-{tenant},model-{i % 4},{variant},{tier},1,{prompt},{cached},256,{generated}\n")
PY
row() {
    local label=$1 trace=$2 scopes=$3
    local best=""
    for _ in 1 2 3; do
        local start end
        start=$(date +%s%N)
        "$bin" replay "$trace" --accounts 1 > "$dir/out.txt" 2> /dev/null
        end=$(date +%s%N)
        local ns=$((end - start))
        if [[ -z $best || $ns -lt $best ]]; then best=$ns; fi
    done
    local requests
    requests=$(awk '$1 == "requests" { print $2 }' "$dir/out.txt")
    awk -v l="$label" -v r="$requests" -v s="$scopes" -v ns="$best" '
        function commas(n,  s, out) {
            s = sprintf("%d", n); out = ""
            while (length(s) > 3) { out = "," substr(s, length(s) - 2) out; s = substr(s, 1, length(s) - 3) }
            return s out
        }
        BEGIN { printf "| %s | %s | %s | %.2f s | %s |\n", l, commas(r), commas(s), ns / 1e9, commas(r / (ns / 1e9)) }'
}
scopes() { awk -F, 'NR > 1 { print $2, $3, $4 }' "$1" | sort -u | wc -l; }
row "Azure conversation 2023 (58 min)" data/azure_llm_2023_conv.csv 1
row "synthetic, one scope" "$dir/one_scope.csv" 1
row "synthetic, 40,000 scopes" "$dir/40k_scopes.csv" "$(scopes "$dir/40k_scopes.csv")"
row "synthetic 1M, skewed tenants" "$dir/synthetic_1m.csv" "$(scopes "$dir/synthetic_1m.csv")"
