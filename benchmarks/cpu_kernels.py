"""The CPU kernel choices behind the rollout and the fused projection, each against its alternative.

    python benchmarks/cpu_kernels.py                # one thread, CPU seconds (steadier on a shared machine)
    python benchmarks/cpu_kernels.py --threads 2

Three tables, minimum CPU time (process time, all threads) over --repeats runs:

1. A decode step's linear products (8 rows): torch's default kernel (``F.linear``) against oneDNN on a
   prepacked weight (``rollout/packed_linear.py``), in fp32 and bf16, on the shapes of
   ``benchmarks/rollout.py``'s model (hidden 768, ffn 2048, vocab 32,000) and vs_trl.py's output layer.
2. One chunk's bf16 weight-gradient product added to the fp32 accumulator (110 rows, V=151,936, H=256):
   ``losses/projected.py``'s ``_add_product_`` against a bf16 product added with one mixed-dtype ``add_``
   and against an fp32 product on upcast copies.
3. Padded attention, forward + backward (b=8, 4 heads / 2 KV groups, 384 tokens, d=64, fp32, a causal +
   key-padding mask): SDPA with the mask (``models/attention.py``) against megatron-core's unfused
   path's operations (scores, masked softmax kept for backward, product), with the peak of the torch
   profiler's allocation events.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_opsd.losses.projected import _add_product_  # noqa: E402


def cpu_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def linears(repeats: int) -> None:
    print("\n| weight [out, in] | dtype | F.linear ms | packed ms | ratio |\n|---|---|---|---|---|")
    for shape in ((2304, 768), (768, 768), (4096, 768), (768, 2048), (32000, 768), (151936, 256)):
        for dtype in (torch.float32, torch.bfloat16):
            weight, x = torch.randn(*shape, dtype=dtype), torch.randn(8, shape[1], dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
            default = cpu_ms(lambda: F.linear(x, weight), repeats)
            fast = cpu_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats)
            name = "fp32" if dtype == torch.float32 else "bf16"
            print(f"| {list(shape)} | {name} | {default:.3f} | {fast:.3f} | {default / fast:.2f}x |")


def weight_gradient(repeats: int) -> None:
    v, h, c = 151936, 256, 110
    grad, hidden = torch.randn(c, v).bfloat16(), torch.randn(c, h).bfloat16()
    acc, product = torch.zeros(v, h), torch.empty(v, h, dtype=torch.bfloat16)
    runs = {"_add_product_ (bf16 blocks, reused fp32 buffer)": lambda: _add_product_(acc, grad.t(), hidden),
            "bf16 product + mixed-dtype add_": lambda: acc.add_(torch.mm(grad.t(), hidden, out=product)),
            "fp32 product on upcast copies (addmm_)": lambda: acc.addmm_(grad.t().float(), hidden.float())}
    print(f"\n| dW of one chunk ({c} rows, V={v}, H={h}) into fp32 | CPU ms |\n|---|---|")
    for name, fn in runs.items():
        print(f"| {name} | {cpu_ms(fn, repeats):.0f} |")


def attention(repeats: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    b, heads, groups, s, d = 8, 4, 2, 384, 64
    q = torch.randn(b, heads, s, d, requires_grad=True)
    k, v = (torch.randn(b, groups, s, d, requires_grad=True) for _ in range(2))
    lengths = torch.randint(200, s, (b,), generator=torch.Generator().manual_seed(0))
    keep = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :] & torch.ones(s, s, dtype=torch.bool).tril()
    keep = keep | torch.eye(s, dtype=torch.bool)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True).sum().backward()

    def unfused():
        kk, vv = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
        scores = (q @ kk.transpose(-1, -2)) / d ** 0.5
        (scores.masked_fill(~keep, -1e4).softmax(-1) @ vv).sum().backward()

    print(f"\n| padded attention, fwd + bwd (b={b}, {heads} heads / {groups} KV, {s} tokens, d={d}, fp32) "
          "| CPU ms | peak allocated MiB |\n|---|---|---|")
    for name, fn in (("SDPA with the mask", sdpa), ("unfused (megatron-core's operations)", unfused)):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        live = peak = 0
        for event in prof.profiler.kineto_results.events():
            if event.name() == "[memory]":
                live += event.nbytes()
                peak = max(peak, live)
        print(f"| {name} | {cpu_ms(fn, repeats):.0f} | {peak / 2 ** 20:.0f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# CPU kernels, {args.threads} thread(s), best of {args.repeats} (CPU time)")
    linears(args.repeats)
    weight_gradient(args.repeats)
    attention(args.repeats)


if __name__ == "__main__":
    main()
