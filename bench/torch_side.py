"""The PyTorch/diffusers side of bench/run.sh.

`make DIR` writes random-weight models and inputs for every workload into DIR (diffusers and
transformers layouts, safetensors, f32) so that both implementations load identical weights.
`time WORKLOAD DIR THREADS RUNS` times one workload in this process and prints one JSON line.
`gemm THREADS RUNS` prints PyTorch's markdown rows for examples/bench_gemm.rs's shapes.
`wan_t5 DIR` rewrites DIR/umt5 in Wan's `t5.py` key layout in bf16, as the `.pth` Wan releases
ship and as safetensors, into DIR/umt5_wan (for `examples/bench_load.rs`).
"""
import json
import os
import resource
import statistics
import sys
import time

import torch
from safetensors.torch import load_file, save_file

DIT = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)


WAN_T5_BLOCK = {
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def wan_t5_name(key):
    """Wan's `t5.py` name of a transformers UMT5 encoder key."""
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    parts = key.split(".")
    rest = ".".join(parts[3:])
    return f"blocks.{parts[2]}." + WAN_T5_BLOCK.get(rest, rest.replace("layer.0.SelfAttention.", "attn."))


def wan_t5(root):
    src = load_file(os.path.join(root, "umt5", "model.safetensors"))
    weights = {wan_t5_name(k): v.to(torch.bfloat16).contiguous() for k, v in src.items()}
    del src
    out = os.path.join(root, "umt5_wan")
    os.makedirs(out, exist_ok=True)
    torch.save(weights, os.path.join(out, "umt5.pth"))
    save_file(weights, os.path.join(out, "umt5.safetensors"))


def make(root):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    WanTransformer3DModel(**DIT).save_pretrained(os.path.join(root, "dit"))
    save_file(
        {"latents": torch.randn(1, 16, 5, 30, 52), "context": torch.randn(1, 512, 4096)},
        os.path.join(root, "dit", "inputs.safetensors"),
    )
    AutoencoderKLWan(base_dim=96, z_dim=16).save_pretrained(os.path.join(root, "vae"))
    save_file({"latents": torch.randn(1, 16, 2, 30, 52)}, os.path.join(root, "vae", "inputs.safetensors"))
    cfg = UMT5Config(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    )
    UMT5EncoderModel(cfg).save_pretrained(os.path.join(root, "umt5"))
    save_file({"ids": torch.randint(0, 256384, (1, 512))}, os.path.join(root, "umt5", "inputs.safetensors"))


def workload(name, root, repo):
    """Returns a zero-argument callable that runs the workload once."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    if name == "dit":
        model = WanTransformer3DModel.from_pretrained(os.path.join(root, "dit")).eval()
        x = load_file(os.path.join(root, "dit", "inputs.safetensors"))
        t = torch.tensor([500.0])
        return lambda: model(x["latents"], t, x["context"], return_dict=False)[0]
    if name == "vae":
        vae = AutoencoderKLWan.from_pretrained(os.path.join(root, "vae")).eval()
        z = load_file(os.path.join(root, "vae", "inputs.safetensors"))["latents"]
        return lambda: vae.decode(z, return_dict=False)[0]
    if name == "umt5":
        enc = UMT5EncoderModel.from_pretrained(os.path.join(root, "umt5")).eval()
        ids = load_file(os.path.join(root, "umt5", "inputs.safetensors"))["ids"]
        mask = torch.ones_like(ids)
        return lambda: enc(input_ids=ids, attention_mask=mask).last_hidden_state
    if name == "pipeline":
        # The pipeline_t2v_wan21 case's request at 10 steps, as examples/bench_compare.rs runs it.
        fixtures = os.path.join(repo, "tests/fixtures/parity")
        with open(os.path.join(fixtures, "cases/pipeline_t2v_wan21.json")) as f:
            params = dict(json.load(f)["params"], num_inference_steps=10)
        pipe = WanPipeline.from_pretrained(os.path.join(fixtures, "models/wan21"))
        gen = torch.Generator().manual_seed(0)
        return lambda: pipe(**params, generator=gen, output_type="np")
    raise SystemExit(f"unknown workload {name}")


def time_it(name, root, threads, runs, repo):
    torch.set_num_threads(threads)
    with torch.inference_mode():
        run = workload(name, root, repo)
        run()  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "impl": "pytorch", "workload": name, "threads": threads, "times_s": times,
        "median_s": statistics.median(times), "peak_rss_bytes": rss,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }))


# examples/bench_gemm.rs's shapes: (name, batch, m, k, n, rhs transposed).
GEMM_SHAPES = [
    ("q/k/v/out projection", 1, 1950, 1536, 1536, False),
    ("FFN up", 1, 1950, 1536, 8960, False),
    ("FFN down", 1, 1950, 8960, 1536, False),
    ("text k/v projection", 1, 512, 1536, 1536, False),
    ("self-attn scores q kT (12 heads)", 12, 1950, 128, 1950, True),
    ("self-attn p v (12 heads)", 12, 1950, 1950, 128, False),
    ("cross-attn scores q kT (12 heads)", 12, 1950, 128, 512, True),
]


def gemm_rows(threads, runs):
    """PyTorch's rows of examples/bench_gemm.rs's table (torch.matmul, batched for the heads)."""
    torch.set_num_threads(threads)
    for name, batch, m, k, n, rhs_t in GEMM_SHAPES:
        a = torch.rand(batch, m, k) * 2 - 1
        b = torch.rand(batch, n, k).transpose(1, 2) if rhs_t else torch.rand(batch, k, n)
        if batch == 1:
            a, b = a[0], b[0]
        torch.matmul(a, b)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        dims = (f"{batch} x " if batch > 1 else "") + f"{m} x {k} x {n}"
        mode = "batched matmul" if batch > 1 else "all threads"
        print(f"| {name} | {dims} | PyTorch {torch.__version__} | {mode} | {t * 1e3:.1f} | "
              f"{2 * batch * m * k * n / t / 1e9:.1f} |")


if __name__ == "__main__":
    if sys.argv[1] == "gemm":
        gemm_rows(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    elif sys.argv[1] == "make":
        make(sys.argv[2])
    elif sys.argv[1] == "wan_t5":
        wan_t5(sys.argv[2])
    elif sys.argv[1] == "time":
        name, root, threads, runs = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        time_it(name, root, threads, runs, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    else:
        raise SystemExit(__doc__)
