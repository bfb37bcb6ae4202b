"""The fused output projection + loss (losses.projected) vs materialised logits, on CPU, one process.

    python benchmarks/projection.py              # R=512 response tokens, H=256, V=151,936
    python benchmarks/projection.py --tokens 128
    python benchmarks/projection.py --dtype bf16 # bf16 hidden states and weights (fp32 divergence math)

One micro-batch's loss forward+backward (forward KL, clip 0.05, live teacher sharing W), minimum over
--repeats (the machine is shared): materialised [R, V] logits vs the fused path at the automatic chunk
and at other chunk sizes.
Peak memory of the whole step is measured by benchmarks/opsd_step.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_opsd.losses import vocab_parallel_divergence  # noqa: E402
from megatron_opsd.losses.projected import projected_token_loss, projection_rows  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, float]:
    """Minimum wall and CPU (process, all threads) seconds: CPU time suffers less from other jobs."""
    fn()  # warm-up
    best = best_cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="hidden states and weights (the divergence math is fp32 either way)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows_total, hidden, vocab = args.tokens, args.hidden, args.vocab
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.05).to(dtype)

    h_s = torch.randn(rows_total, hidden, generator=gen).to(dtype).requires_grad_()
    h_t = torch.randn(rows_total, hidden, generator=gen).to(dtype)
    w = weight.clone().requires_grad_()
    mask = torch.ones(rows_total)

    def divergence(s, t):
        return vocab_parallel_divergence(s, t, clip=0.05, vocab_size=vocab)

    def materialised():
        s = F.linear(h_s, w)
        with torch.no_grad():
            t = F.linear(h_t, w)
        (divergence(s, t) * mask).sum().backward()

    def fused(chunk):
        loss, _ = projected_token_loss(h_s, w, h_t, w, lambda s, t, rows: divergence(s, t), mask,
                                       chunk_tokens=chunk)
        loss.backward()

    auto = projection_rows(None, vocab, torch.device("cpu"))
    print(f"# one micro-batch's loss fwd+bwd: R={rows_total}, H={hidden}, V={vocab}, forward KL clip 0.05, {args.dtype}, "
          f"{args.threads} threads")
    print("| path | seconds | vs materialised | CPU seconds | vs materialised (CPU) |")
    print("|---|---|---|---|---|")
    base, base_cpu = best_of(materialised, args.repeats)
    print(f"| materialised [R, V] logits | {base:.3f} | 1.00 | {base_cpu:.3f} | 1.00 |")
    for chunk in (None, 64, 256, rows_total):
        label = f"fused, automatic chunk ({auto} rows)" if chunk is None else f"fused, {chunk}-row chunks"
        seconds, cpu = best_of(lambda: fused(chunk), args.repeats)
        print(f"| {label} | {seconds:.3f} | {seconds / base:.2f} | {cpu:.3f} | {cpu / base_cpu:.2f} |")


if __name__ == "__main__":
    main()
