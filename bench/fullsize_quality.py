"""Latent rel-L2 and frame PSNR of full-size runs against a reference run, from the raw outputs
examples/bench_fullsize writes with SAVE_OUTPUT=PREFIX (PREFIX.latents.f32, PREFIX.frames.f32,
frames in [-1, 1]).

Usage: fullsize_quality.py REF_PREFIX PREFIX [PREFIX...]
"""
import sys
import numpy as np


def load(prefix):
    return (np.fromfile(prefix + ".latents.f32", dtype="<f4").astype(np.float64),
            np.fromfile(prefix + ".frames.f32", dtype="<f4").astype(np.float64))


def main(ref, others):
    rl, rf = load(ref)
    print(f"| run | latent rel_l2 vs {ref.split('/')[-1]} | frame PSNR dB |")
    print("|---|---|---|")
    for p in others:
        l, f = load(p)
        rel = np.linalg.norm(l - rl) / np.linalg.norm(rl)
        # Frames on the 0..1 scale the 8-bit video is written from.
        mse = np.mean(((f - rf) / 2.0) ** 2)
        psnr = 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")
        print(f"| {p.split('/')[-1]} | {rel:.3e} | {psnr:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
