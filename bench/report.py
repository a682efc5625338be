"""Joins the per-workload JSON lines of bench/run.sh into a markdown table and a results file."""
import json
import platform
import subprocess
import sys
import time

LABELS = {
    "dit": "DiT forward, Wan2.1-1.3B width, 2 blocks, 1,950 tokens, f32",
    "vae": "VAE decode, base_dim 96, latent 2x30x52 (5 frames, 240x416)",
    "umt5": "UMT5 encoder, XXL width, 2 layers, 512 tokens",
    "pipeline": "whole pipeline, parity model, 10 steps, CFG",
}


def gib(b):
    return f"{b / 2**30:.2f} GiB" if b else "?"


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(lines_file, out_dir):
    rows = [json.loads(l) for l in open(lines_file) if l.strip().startswith("{")]
    by = {(r["impl"], r["workload"]): r for r in rows}
    threads = rows[0]["threads"] if rows else 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    versions = next((r.get("versions") for r in rows if r.get("versions")), {})
    runs = {r["workload"]: len(r["times_s"]) for r in rows if r["impl"] == "chitu"}
    if len(set(runs.values())) <= 1:
        counts = f"{next(iter(runs.values()), 0)} runs"
    else:
        counts = "runs: " + ", ".join(f"{w} {n}" for w, n in runs.items())
    chitu = next((r for r in rows if r["impl"] == "chitu" and r.get("machine")), {})
    machine = chitu.get("machine") or f"{cpu_name()}, {threads} threads"
    gemm = chitu.get("gemm", "gemm")
    head = (
        f"Machine: {machine} (the same threads on each side); chitu-rs {commit} (burn-flex, f32, "
        f"GEMM: {gemm}); "
        f"PyTorch {versions.get('torch', '?')}, diffusers {versions.get('diffusers', '?')}; "
        f"{time.strftime('%Y-%m-%d')}. Medians after a warm-up ({counts}).\n"
    )
    table = [
        "| workload | chitu median s | PyTorch median s | ratio PyTorch/chitu | chitu peak RSS | PyTorch peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for w in ["dit", "vae", "umt5", "pipeline"]:
        c, p = by.get(("chitu", w)), by.get(("pytorch", w))
        if not c or not p:
            continue
        ratio = p["median_s"] / c["median_s"]
        table.append(
            f"| {LABELS[w]} | {c['median_s']:.3f} | {p['median_s']:.3f} | {ratio:.2f} | "
            f"{gib(c['peak_rss_bytes'])} | {gib(p['peak_rss_bytes'])} |"
        )
        summary.append({"workload": w, "chitu": c, "pytorch": p, "ratio_pytorch_over_chitu": ratio})
    text = head + "\n" + "\n".join(table) + "\n"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(f"{out_dir}/{stamp}.json", "w") as f:
        json.dump({"machine": cpu_name(), "threads": threads, "commit": commit, "rows": summary}, f, indent=1)
    with open(f"{out_dir}/latest.md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
