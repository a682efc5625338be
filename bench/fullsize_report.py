"""The full-size rows of bench/run.sh: one markdown table from the JSON lines of
examples/bench_fullsize.rs (chitu) and bench/fullsize_diffusers.py (diffusers)."""
import json
import sys


def gb(b):
    return f"{b / 1e9:.2f} GB" if b else "?"


def pred(r):
    """chitu's own estimate, and how far it is from the measured peak."""
    if "estimate_bytes" not in r or not r.get("peak_rss_bytes"):
        return "-"
    off = (r["estimate_bytes"] - r["peak_rss_bytes"]) / r["peak_rss_bytes"]
    return f"{gb(r['estimate_bytes'])} ({off:+.1%})"


def main(lines_file):
    rows = [json.loads(l) for l in open(lines_file) if l.startswith("{")]
    if not rows:
        sys.exit("no full-size results")
    print(f"Full-size Wan2.1-T2V-1.3B, {rows[0]['request']}, 512 text tokens, VAE in f32\n")
    print("| run | weights | load s | text s | DiT step s (each) | decode s | total s | peak RSS | predicted peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        steps = ", ".join(f"{s:.1f}" for s in r["step_s"])
        load = r["load_s"] + r.get("dit_reload_s", 0.0)
        print(f"| {r['side']} | {r['dtype']} | {load:.1f} | {r['text_s']:.1f} | {steps} | "
              f"{r['decode_s']:.1f} | {r['total_s']:.1f} | {gb(r['peak_rss_bytes'])} | "
              f"{pred(r)} |")


if __name__ == "__main__":
    main(sys.argv[1])
