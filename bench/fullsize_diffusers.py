#!/usr/bin/env python3
"""The diffusers side of the full-size benchmark: WanPipeline on a make_fullsize.py folder.

Usage: fullsize_diffusers.py FULL_DIR DTYPE THREADS [HEIGHT WIDTH FRAMES STEPS]

The same request as examples/bench_fullsize.rs (240x416, 9 frames, 2 steps, guidance 5, 512 text
tokens), with the transformer and text encoder in DTYPE and the VAE in f32, as diffusers' Wan
examples load it. Prints one JSON line: load time, text encode, each step, decode, peak RSS.
"""
import json, resource, sys, time

FULL, DT, THREADS = sys.argv[1], sys.argv[2], int(sys.argv[3])
H, W, F, STEPS = (int(v) for v in (sys.argv[4:8] if len(sys.argv) > 4 else (240, 416, 9, 2)))

import torch
torch.set_num_threads(THREADS)
torch.set_grad_enabled(False)
from diffusers import AutoencoderKLWan, WanPipeline

dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[DT]
t0 = time.perf_counter()
vae = AutoencoderKLWan.from_pretrained(FULL, subfolder="vae", torch_dtype=torch.float32)
pipe = WanPipeline.from_pretrained(FULL, vae=vae, torch_dtype=dtype)
load_s = time.perf_counter() - t0
load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

prompt = "a red fox running through fresh snow at dawn"
t = time.perf_counter()
cond, uncond = pipe.encode_prompt(prompt, "", do_classifier_free_guidance=True, max_sequence_length=512)
text_s = time.perf_counter() - t

marks = []
def on_step(pipe, i, ts, kwargs):
    marks.append(time.perf_counter())
    return kwargs

t = time.perf_counter()
pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=H, width=W, num_frames=F,
     num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
     generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step)
end = time.perf_counter()
steps = [b - a for a, b in zip([t] + marks[:-1], marks)]
print(json.dumps({
    "side": "diffusers", "dtype": DT, "vae_dtype": "f32",
    "request": f"{W}x{H}, {F} frames, {STEPS} steps, CFG",
    "load_s": load_s, "text_s": text_s, "step_s": steps, "decode_s": end - marks[-1],
    "total_s": end - t0, "peak_rss_after_load_bytes": load_rss,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
