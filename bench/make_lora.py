#!/usr/bin/env python3
"""A random Wan-format LoRA (lightx2v/ComfyUI keys) that fits a Wan DiT folder, for merge-time and memory benchmarks.

Usage: make_lora.py TRANSFORMER_DIR OUT.safetensors [RANK]

Keys are those of lightx2v's step-distillation LoRAs: `diffusion_model.blocks.N.{self_attn,cross_attn}.{q,k,v,o}`,
`ffn.{0,2}` and `head.head`, each with `lora_down.weight`, `lora_up.weight` and `alpha` (= rank), plus a `diff_b` on
every one of them. bf16, as they ship. Rank 64 by default (lightx2v's). The values are random and small, so a merged
model stays finite; the LoRA means nothing.
"""
import json, sys
import torch
from safetensors.torch import save_file

cfg = json.load(open(f"{sys.argv[1]}/config.json"))
rank = int(sys.argv[3]) if len(sys.argv) > 3 else 64
dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
ffn = cfg["ffn_dim"]
out_head = cfg["out_channels"] * cfg["patch_size"][0] * cfg["patch_size"][1] * cfg["patch_size"][2]
gen = torch.Generator().manual_seed(0)
tensors = {}


def add(name, out_dim, in_dim):
    p = f"diffusion_model.{name}"
    tensors[f"{p}.lora_down.weight"] = (torch.randn(rank, in_dim, generator=gen) / in_dim**0.5).bfloat16()
    tensors[f"{p}.lora_up.weight"] = (1e-3 * torch.randn(out_dim, rank, generator=gen)).bfloat16()
    tensors[f"{p}.alpha"] = torch.tensor(float(rank))
    tensors[f"{p}.diff_b"] = (1e-3 * torch.randn(out_dim, generator=gen)).bfloat16()


for i in range(cfg["num_layers"]):
    for attn in ("self_attn", "cross_attn"):
        for o in "qkvo":
            add(f"blocks.{i}.{attn}.{o}", dim, dim)
    add(f"blocks.{i}.ffn.0", ffn, dim)
    add(f"blocks.{i}.ffn.2", dim, ffn)
add("head.head", out_head, dim)
save_file(tensors, sys.argv[2])
print(f"{sys.argv[2]}: {len(tensors)} tensors, rank {rank}")
