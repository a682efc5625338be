#!/usr/bin/env python3
"""A random-weight folder shaped like Wan2.2-T2V-A14B, for the memory plan's 24 GB check (issue: 8-bit
weights and an automatic memory plan). A variant of ../shared/tools/make_fullsize.py, whose writer it
uses: the DiT is Wan2.2-A14B's expert (40 blocks at dim 5120, ffn 13824, bf16, 28.6 GB), written once
as shards; transformer_2 (the low-noise expert) is hard links to the same shards, so the two experts
take 28.6 GB of disk, not 57. The UMT5-XXL encoder, the VAE, the tokenizer and the scheduler are hard
links into FULLSIZE_DIR (a make_fullsize.py folder). Never commit; never make it in CI.

Usage: make_a14b.py OUT_DIR FULLSIZE_DIR
"""
import importlib.util, json, os, shutil, sys
import torch

OUT, FULL = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "make_fullsize", os.path.join(HERE, "..", "..", "shared", "tools", "make_fullsize.py"))
# make_fullsize reads its own argv at import: give it ours (OUT, fixtures) and bf16.
argv = sys.argv
sys.argv = [argv[0], OUT, os.path.join(HERE, "..", "tests", "fixtures", "parity"), "bf16"]
mf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mf)
sys.argv = argv

from diffusers import WanTransformer3DModel

EXPERT = dict(mf.DIT, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)


def link_tree(src, dst):
    """Hard links every file of src under dst."""
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            os.link(os.path.join(root, f), os.path.join(dst, rel, f))


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    for sub in ("tokenizer", "scheduler", "text_encoder", "vae"):
        link_tree(os.path.join(FULL, sub), os.path.join(OUT, sub))
    index = json.load(open(os.path.join(FULL, "model_index.json")))
    index["boundary_ratio"] = 0.875
    index["transformer_2"] = index["transformer"]
    json.dump(index, open(os.path.join(OUT, "model_index.json"), "w"), indent=2)
    torch.set_grad_enabled(False)
    with torch.device("meta"):
        dit = WanTransformer3DModel(**EXPERT)
    dit.save_config(os.path.join(OUT, "transformer"))
    mf.write_sharded({k: tuple(v.shape) for k, v in dit.state_dict().items()}, os.path.join(OUT, "transformer"),
                     "diffusion_pytorch_model", torch.Generator().manual_seed(14))
    link_tree(os.path.join(OUT, "transformer"), os.path.join(OUT, "transformer_2"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
