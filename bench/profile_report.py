"""Sorts `perf report --sort dso,symbol` lines (on stdin) into kinds of work and prints a table.

Used by bench/profile.sh. Each symbol goes to the first kind whose pattern it matches; the
weights' load is counted apart and left out of the shares. Release builds carry no debug info,
so inlined closures are known by their wrappers (see the patterns): a guide, not a ledger.
"""
import re
import sys

KINDS = [
    ("load (left out)", r"safetensors|chitu_store|layout::|read_to|zip::|pickle|TensorReader|file::"),
    ("GEMM (gemm crate, BLIS, OpenBLAS)", r"gemm|bli_|blis|openblas|sgemm|dgemm|microkernel|pack_|kernel_.*(haswell|zen|skylake)"),
    # Without debug info the attention task shows as its thread-local score buffer's `with`, and
    # the fused passes as the rayon chunk closures they are (`FnMut ... for &F`).
    ("attention softmax (chitu host)", r"chitu_host::attention|LocalKey<T>::with"),
    ("fused passes (chitu: norms, modulation, residuals, RoPE, GELU)", r"chitu_dit::host|gelu_tanh|chitu_dit::embed|FnMut<A> for &F"),
    ("libm exp (burn-flex's softmax, the GELU before it was fused)", r"__expf|__exp"),
    ("bf16/int8 widening and bias fill (chitu)", r"chitu_host::mixed|widen"),
    ("VAE conv prologue and copies (chitu)", r"chitu_vae"),
    ("burn-flex elementwise, reductions, softmax, layer norm", r"burn_flex|burn_backend|burn_tensor|macerator|StridedIter"),
    ("memory: page faults, zeroing, copies", r"clear_page|memcpy|memset|memmove|page_fault|do_anonymous|alloc_pages|mi_|mimalloc|__folio|zap_|free_pages|unmap|_raw_spin|rmqueue|lru"),
    ("threads: rayon hand-offs, waiting", r"rayon|crossbeam|futex|sched|schedule|yield|pthread|__switch|finish_task"),
]


def main():
    workload, threads = sys.argv[1], sys.argv[2]
    totals = {name: 0.0 for name, _ in KINDS}
    other = 0.0
    top_other = []
    for line in sys.stdin:
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.kH]\]\s+(.*)", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3).strip()
        text = f"{dso} {sym}"
        for name, pattern in KINDS:
            if re.search(pattern, text):
                totals[name] += pct
                break
        else:
            other += pct
            top_other.append((pct, sym[:70]))
    load = totals.pop("load (left out)")
    rest = sum(totals.values()) + other
    print(f"| {workload}, {threads} threads: kind of work | share of samples (load left out, {load:.1f}% of all) |")
    print("|---|---|")
    for name, pct in totals.items():
        print(f"| {name} | {100 * pct / rest:.1f}% |")
    print(f"| other | {100 * other / rest:.1f}% |")
    top_other.sort(reverse=True)
    if top_other:
        print()
        print("Largest 'other' symbols: " + "; ".join(f"{s} {p:.1f}%" for p, s in top_other[:6]))


if __name__ == "__main__":
    main()
