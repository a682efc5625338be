#!/usr/bin/env bash
# Where a workload's CPU time goes, by kind of work: GEMM, the attention's softmax, chitu's fused
# passes, burn-flex's own ops, memory (page faults, copies), thread hand-offs. Samples with
# `perf record` (Debian's linux-perf; the cpu-clock event, which every machine has) one
# `bench_compare` workload and prints a markdown table (bench/profile_report.py).
#
#   bash bench/profile.sh dit            # the DiT workload of bench/run.sh, 3 runs after a warm-up
#   THREADS=2 RUNS=5 bash bench/profile.sh umt5
#
# Needs the random models that bench/run.sh writes to BENCH_WORK (run it once first). The
# table leaves out the load (reading the weights), which perf cannot tell apart by time.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD=${1:-dit}
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-3}
BENCH_WORK=${BENCH_WORK:-$HOME/.cache/chitu-bench/work}
command -v perf >/dev/null || { echo "perf is missing: apt-get install linux-perf" >&2; exit 1; }
cargo build --release --example bench_compare >&2
DATA=$(mktemp)
RAYON_NUM_THREADS=$THREADS perf record -q -e cpu-clock -F 499 -o "$DATA" -- \
    target/release/examples/bench_compare "$WORKLOAD" "$BENCH_WORK" "$RUNS" >&2
perf report -i "$DATA" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.05 2>/dev/null |
    python3 bench/profile_report.py "$WORKLOAD" "$THREADS"
rm -f "$DATA"
