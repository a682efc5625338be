#!/usr/bin/env bash
# Times chitu-rs against PyTorch/diffusers on identical workloads and random weights, on this
# machine, and prints one markdown table (also written to bench/results/latest.md and a JSON file).
#
#   bash bench/run.sh                 # all workloads, all cores, 3 runs each after a warm-up (30 for the pipeline)
#   THREADS=2 RUNS=5 WORKLOADS="dit umt5" bash bench/run.sh
#   FULLSIZE_DIR=/data/wan-full WORKLOADS=fullsize THREADS=2 bash bench/run.sh
#   WORKLOADS=lora bash bench/run.sh  # LoRA merge cost, few-step vs base (FULLSIZE_DIR adds full size)
#   WORKLOADS=serve bash bench/run.sh # chitu serve: job order, load-test latency and throughput
#   WORKLOADS=gemm bash bench/run.sh  # GEMM GFLOP/s per kernel (gemm crate, BLIS, OpenBLAS, PyTorch)
#
# Every table names the machine (CPU, family/model, ISA, threads) and the GEMM chitu used
# (CHITU_GEMM, default auto: see README). bench/profile.sh shows where a workload's time goes.
#
# `fullsize` is the memory benchmark: one request (240x416, 9 frames, 2 steps, CFG) on a full-size
# random Wan2.1-T2V-1.3B folder that ../shared/tools/make_fullsize.py wrote to FULLSIZE_DIR (about
# 14 GB; never in CI), by chitu at each of FULLSIZE_DTYPES (default "f32 bf16") and by diffusers'
# WanPipeline at each of TORCH_DTYPES (default "bf16"), one process each, so that each peak RSS
# is its own. It prints its own table (bench/results/fullsize.md).
#
# On first use it creates a throwaway venv outside the repository (BENCH_VENV, default
# ~/.cache/chitu-bench/venv) and installs torch, diffusers and transformers into it. Model weights
# and inputs go to BENCH_WORK (default ~/.cache/chitu-bench/work; about 5 GB, mostly the UMT5
# embedding table). Not part of CI: it downloads PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-3}
WORKLOADS=${WORKLOADS:-"dit vae umt5 pipeline"}
BENCH_VENV=${BENCH_VENV:-$HOME/.cache/chitu-bench/venv}
BENCH_WORK=${BENCH_WORK:-$HOME/.cache/chitu-bench/work}
PY="$BENCH_VENV/bin/python"

if ! "$PY" -c "import torch, diffusers, transformers, accelerate" 2>/dev/null; then
    echo "installing the PyTorch reference into $BENCH_VENV" >&2
    python3 -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/pip" install --quiet --upgrade pip
    "$BENCH_VENV/bin/pip" install --quiet torch diffusers transformers accelerate sentencepiece safetensors numpy
fi
# Only the PyTorch comparisons need the random models and inputs.
needs_work=no
for w in $WORKLOADS; do
    case $w in dit | vae | umt5 | pipeline) needs_work=yes ;; esac
done
if [ "$needs_work" = yes ] && [ ! -f "$BENCH_WORK/.done" ]; then
    echo "writing random-weight models and inputs to $BENCH_WORK" >&2
    mkdir -p "$BENCH_WORK"
    "$PY" bench/torch_side.py make "$BENCH_WORK"
    touch "$BENCH_WORK/.done"
fi
cargo build --release --example bench_compare >&2

LINES=$(mktemp)
for w in $WORKLOADS; do
    if [ "$w" = serve ]; then
        # How the server should order jobs (to completion or interleaved), then the load test's
        # latency and throughput figures.
        cargo build --release --example bench_serve >&2
        mkdir -p bench/results
        RAYON_NUM_THREADS=$THREADS target/release/examples/bench_serve | tee bench/results/serve.md
        cargo test --release --test integration serve_load:: -- --nocapture 2>&1 | grep '^load:' | tee -a bench/results/serve.md
        continue
    fi
    if [ "$w" = gemm ]; then
        # GFLOP/s of every GEMM kernel this machine has at the DiT's shapes, PyTorch's beside them.
        cargo build --release --example bench_gemm >&2
        mkdir -p bench/results
        RAYON_NUM_THREADS=$THREADS target/release/examples/bench_gemm "$RUNS" | tee bench/results/gemm.md
        OMP_NUM_THREADS=$THREADS "$PY" bench/torch_side.py gemm "$THREADS" "$RUNS" | tee -a bench/results/gemm.md
        continue
    fi
    if [ "$w" = lora ]; then
        # LoRA merge time and memory, and 4 unguided steps against 50 with CFG: on the embedded
        # default, then (with FULLSIZE_DIR) on the full-size folder with a random rank-64 LoRA
        # (LORA_BASE_STEPS base steps there, 0 by default: 50 with CFG take most of an hour).
        cargo build --release --example bench_lora >&2
        mkdir -p bench/results
        RAYON_NUM_THREADS=$THREADS target/release/examples/bench_lora | tee bench/results/lora.md
        if [ -n "${FULLSIZE_DIR:-}" ]; then
            LORA=$(mktemp -d)/lora_r64.safetensors
            "$PY" bench/make_lora.py "$FULLSIZE_DIR/transformer" "$LORA" >&2
            RAYON_NUM_THREADS=$THREADS target/release/examples/bench_lora "$FULLSIZE_DIR" "$LORA" 240 416 9 \
                "${LORA_BASE_STEPS:-0}" | tee -a bench/results/lora.md
            rm -f "$LORA"
        fi
        continue
    fi
    if [ "$w" = fullsize ]; then
        : "${FULLSIZE_DIR:?set FULLSIZE_DIR to a make_fullsize.py folder}"
        cargo build --release --example bench_fullsize >&2
        FULL_LINES=$(mktemp)
        OUTS=$(mktemp -d)
        DTS=${FULLSIZE_DTYPES:-f32 bf16 int8}
        for dt in $DTS; do
            echo "full size: chitu $dt" >&2
            SAVE_OUTPUT="$OUTS/$dt" RAYON_NUM_THREADS=$THREADS target/release/examples/bench_fullsize "$FULLSIZE_DIR" "$dt" | tee -a "$FULL_LINES" >&2
        done
        for dt in ${TORCH_DTYPES:-bf16}; do
            echo "full size: diffusers $dt" >&2
            OMP_NUM_THREADS=$THREADS "$PY" bench/fullsize_diffusers.py "$FULLSIZE_DIR" "$dt" "$THREADS" | tee -a "$FULL_LINES" >&2
        done
        mkdir -p bench/results
        "$PY" bench/fullsize_report.py "$FULL_LINES" | tee bench/results/fullsize.md
        # Each run's latents and frames against the first dtype's (f32 by default).
        set -- $DTS
        first=$1
        shift
        "$PY" bench/fullsize_quality.py "$OUTS/$first" $(for d in "$@"; do echo "$OUTS/$d"; done) | tee -a bench/results/fullsize.md
        rm -rf "$OUTS"
        continue
    fi
    # The pipeline on the parity model takes tens of milliseconds, so a few runs give a median
    # that moves by half between sessions; ten times as many keep it steady.
    runs=$RUNS
    [ "$w" = pipeline ] && runs=$((RUNS * 10))
    echo "timing $w: chitu" >&2
    RAYON_NUM_THREADS=$THREADS target/release/examples/bench_compare "$w" "$BENCH_WORK" "$runs" | tee -a "$LINES" >&2
    echo "timing $w: pytorch" >&2
    OMP_NUM_THREADS=$THREADS "$PY" bench/torch_side.py time "$w" "$BENCH_WORK" "$THREADS" "$runs" | tee -a "$LINES" >&2
done
mkdir -p bench/results
if [ -s "$LINES" ]; then
    "$PY" bench/report.py "$LINES" bench/results
fi
