"""Forward+backward time and peak extra memory of vocab-parallel divergence implementations, on CPU.

    python benchmarks/divergence.py            # V = 151,936, T in {512, 2048}, TP in {1, 2}
    python benchmarks/divergence.py --quick    # a small smoke run

Implementations, all computing the paper's v3 loss (forward KL, per-entry clip 0.05, temperature 1.1)
from bf16 logits, with the gradient w.r.t. the student's bf16 logits:
  (a) ours       megatron_opsd.losses.vocab_parallel_divergence (chunked, recomputing backward)
  (b) naive      all-gather the vocabulary, then torch ops + autograd on [T, V]
  (c) unchunked  a vocab-parallel autograd Function in megatron-core's cross-entropy style that
                 materialises and keeps full fp32 [T, V/TP] intermediates (p_S, p_T, clip mask)

Each measurement runs in fresh processes with one thread per rank (TP=1: one process; TP=2: two
processes, gloo), so that the peak resident set (``ru_maxrss``) belongs to that implementation alone
and a rank is one core of this 2-core machine. Peak extra memory = peak RSS minus the RSS once the
inputs exist; it includes the gradient itself (bf16 [T, V/TP], the same for all three). Per rank; TP=2
rows report the larger rank. Times (wall, and CPU summed over ranks) are minima over rounds that
interleave the implementations (the machine is shared), each after an untimed warm-up call on 8
tokens. A configuration whose estimated memory (scaled linearly from the T=512 measurement) exceeds the
budget is reported as not fitting instead of being run; its ratio columns then use that estimate.
On CPU every fresh multi-GiB allocation of (b) and (c) is page-faulted in by the kernel (the sys time),
which a GPU caching allocator would avoid; (a) reuses a few MiB of buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

V = 151_936
CLIP, TEMPERATURE = 0.05, 1.1
IMPLS = {"ours": "(a) ours", "naive": "(b) naive gather", "unchunked": "(c) unchunked vocab-parallel"}
BUDGET_GIB = 12.0  # the most this benchmark may hold at once on the shared machine
GIB, MIB = 2.0**30, 2.0**20


# ---------------------------------------------------------------------------------------------------
# Worker side


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _naive(student, teacher, group):
    import torch
    import torch.distributed as dist

    class AllGatherVocab(torch.autograd.Function):
        """[T, V/TP] -> [T, V]; every rank computes the same loss, so backward takes its slice."""

        @staticmethod
        def forward(ctx, x):
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, x.contiguous(), group=group)
            ctx.width = x.shape[-1]
            return torch.cat(parts, dim=-1)

        @staticmethod
        def backward(ctx, grad):
            rank = dist.get_rank(group)
            return grad[:, rank * ctx.width:(rank + 1) * ctx.width].contiguous()

    if group is not None:
        student = AllGatherVocab.apply(student)
        teacher = AllGatherVocab.apply(teacher)
    logp_s = torch.log_softmax(student.float() / TEMPERATURE, dim=-1)
    logp_t = torch.log_softmax(teacher.float() / TEMPERATURE, dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).clamp(max=CLIP).sum(-1)


def _unchunked(student, teacher, group):
    import torch
    import torch.distributed as dist

    def all_reduce(x, op):
        if group is not None:
            dist.all_reduce(x, op=op, group=group)
        return x

    class UnchunkedForwardKL(torch.autograd.Function):
        """Full fp32 [T, V/TP] intermediates; 3 all-reduces forward, 0 backward."""

        @staticmethod
        def forward(ctx, s, t):
            z_s, z_t = s.float().div_(TEMPERATURE), t.float().div_(TEMPERATURE)
            max_2t = all_reduce(torch.stack([z_s.amax(-1), z_t.amax(-1)]), dist.ReduceOp.MAX)
            z_s.sub_(max_2t[0, :, None])
            z_t.sub_(max_2t[1, :, None])
            p_s, p_t = z_s.exp(), z_t.exp()
            sum_2t = all_reduce(torch.stack([p_s.sum(-1), p_t.sum(-1)]), dist.ReduceOp.SUM)
            logp_s, logp_t = z_s.sub_(sum_2t[0].log()[:, None]), z_t.sub_(sum_2t[1].log()[:, None])
            p_s.div_(sum_2t[0, :, None])
            p_t.div_(sum_2t[1, :, None])
            entry = logp_t.sub_(logp_s).mul_(p_t)
            keep = entry <= CLIP
            sums_2t = all_reduce(torch.stack([entry.clamp_max_(CLIP).sum(-1), (p_t * keep).sum(-1)]),
                                 dist.ReduceOp.SUM)
            ctx.save_for_backward(p_s, p_t, keep, sums_2t[1])
            ctx.dtype = s.dtype
            return sums_2t[0]

        @staticmethod
        def backward(ctx, grad):
            p_s, p_t, keep, kept_mass = ctx.saved_tensors
            grad_z = p_s.mul_(kept_mass[:, None]).sub_(p_t.mul_(keep))
            return grad_z.mul_((grad / TEMPERATURE)[:, None]).to(ctx.dtype), None

    return UnchunkedForwardKL.apply(student, teacher)


def _ours(student, teacher, group):
    from megatron_opsd.losses import vocab_parallel_divergence

    return vocab_parallel_divergence(student, teacher, divergence="forward_kl", clip=CLIP,
                                     temperature=TEMPERATURE, tp_group=group)


def _random_logits(num_tokens: int, width: int, gen):
    """bf16 [num_tokens, width] ~ N(0, 4), filled in place from a 64-token random block (no temporaries
    as large as the tensor, and seconds faster than sampling every entry)."""
    import torch

    block = torch.randn(64, width, generator=gen).mul_(2).bfloat16()
    out = torch.empty(num_tokens, width, dtype=torch.bfloat16)
    for start in range(0, num_tokens, 64):
        rows = min(64, num_tokens - start)
        out[start:start + rows] = block[:rows]
    return out


def worker(impl: str, num_tokens: int, iters: int) -> None:
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    group = None
    if world_size > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    local = V // world_size
    gen = torch.Generator().manual_seed(1234 + (dist.get_rank() if group else 0))
    student, teacher = (_random_logits(num_tokens, local, gen) for _ in range(2))
    student.requires_grad_()
    fn = {"ours": _ours, "naive": _naive, "unchunked": _unchunked}[impl]
    warm = student[:8].detach().clone().requires_grad_()  # first-call costs (threads, gloo) off the clock
    fn(warm, teacher[:8], group).sum().backward()
    del warm
    if group is not None:
        dist.barrier()
    base_rss, setup_peak = _rss_bytes(), _peak_rss_bytes()
    times, cpu_times = [], []
    for _ in range(iters):
        if group is not None:
            dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(student, teacher, group).sum().backward()
        cpu_times.append(time.process_time() - cpu_start)
        if group is not None:
            dist.barrier()
        times.append(time.perf_counter() - start)
        if len(times) < iters:
            student.grad = None
    peak = _peak_rss_bytes()
    assert torch.isfinite(student.grad).all()  # after reading the peak: isfinite allocates [T, V] temporaries
    print(json.dumps({"time_s": min(times), "cpu_s": min(cpu_times), "peak_extra": peak - base_rss,
                      "hidden_by_setup": peak <= setup_peak}), flush=True)
    if group is not None:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# Driver side


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(impl: str, num_tokens: int, tp: int, iters: int) -> dict:
    """Run one measurement in fresh process(es); returns the worst rank's peak and the slowest time."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(tp), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", impl, str(num_tokens),
                               str(iters)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(tp)]
    results, errors = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        if proc.returncode != 0:
            errors.append(f"exit {proc.returncode}: {err.strip().splitlines()[-1:] if err.strip() else ''}")
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    if errors:
        return {"error": "; ".join(errors)}
    return {"time_s": max(r["time_s"] for r in results), "cpu_s": sum(r["cpu_s"] for r in results),
            "peak_extra": max(r["peak_extra"] for r in results),
            "hidden_by_setup": any(r["hidden_by_setup"] for r in results)}


def copy_bandwidth() -> float:
    """Bytes/s (read + write) of a warm fp32 tensor copy of 512 MiB by one thread (what one rank has)."""
    import torch

    torch.set_num_threads(1)
    src = torch.ones(128 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return BUDGET_GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in {64, 256}: a smoke run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (min time over them)")
    parser.add_argument("--iters", type=int, default=0,
                        help="timed fwd+bwd iterations per process (default: 3 at T=512, 1 at T=2048)")
    args = parser.parse_args()
    token_counts = (64, 256) if args.quick else (512, 2048)
    budget = min(BUDGET_GIB, 0.8 * _mem_available_gib())
    print(f"V={V}, bf16 logits, forward KL, clip={CLIP}, T_temp={TEMPERATURE}; memory budget {budget:.1f} GiB; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    rows: dict[tuple[int, int, str], dict] = {}
    for tp in (1, 2):
        for num_tokens in token_counts:
            plan = {}
            for impl in IMPLS:
                small = rows.get((token_counts[0], tp, impl))
                need = None
                if small is not None and "peak_extra" in small and num_tokens != token_counts[0]:
                    inputs = 2 * num_tokens * (V // tp) * 2  # bf16 student + teacher per rank
                    need = tp * (small["peak_extra"] * num_tokens / token_counts[0] + inputs + 0.4 * GIB)
                    if need / GIB > budget:
                        rows[(num_tokens, tp, impl)] = {
                            "skip": f"does not fit (needs ~{need / GIB:.1f} GiB for {tp} rank(s), budget "
                                    f"{budget:.1f} GiB)",
                            "estimated_peak_extra": small["peak_extra"] * num_tokens / token_counts[0]}
                        continue
                plan[impl] = need
            iters = args.iters or min(3, max(1, 1536 // num_tokens))
            for _ in range(args.rounds):
                for impl in plan:
                    result = launch(impl, num_tokens, tp, iters)
                    best = rows.setdefault((num_tokens, tp, impl), result)
                    if "error" in result or "error" in best:
                        rows[(num_tokens, tp, impl)] = result if "error" in result else best
                        continue
                    best["time_s"] = min(best["time_s"], result["time_s"])
                    best["cpu_s"] = min(best["cpu_s"], result["cpu_s"])
                    best["peak_extra"] = max(best["peak_extra"], result["peak_extra"])
                    best["hidden_by_setup"] |= result["hidden_by_setup"]
                print(f"  done T={num_tokens} TP={tp}: " + ", ".join(
                    f"{impl} {rows[(num_tokens, tp, impl)].get('time_s', float('nan')):.2f}s" for impl in plan),
                    flush=True)

    bandwidth = copy_bandwidth()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print()
    print("| T | TP | impl | fwd+bwd ms | CPU ms | peak extra MiB | peak vs (b) | peak vs (c) | time vs (c) "
          "| CPU vs (c) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tp in (1, 2):
        for num_tokens in token_counts:
            naive, unchunked = rows[(num_tokens, tp, "naive")], rows[(num_tokens, tp, "unchunked")]
            for impl, label in IMPLS.items():
                row = rows[(num_tokens, tp, impl)]
                if "skip" in row or "error" in row:
                    print(f"| {num_tokens} | {tp} | {label} | {row.get('skip') or 'failed: ' + row['error']} "
                          "| | | | | | |")
                    continue
                mark = " (≤, hidden by setup)" if row["hidden_by_setup"] else ""

                def ratio(other, key):
                    if key in other:
                        return f"{row[key] / other[key]:.3f}"
                    estimate = other.get(f"estimated_{key}")
                    return f"~{row[key] / estimate:.3f} (vs estimate)" if estimate else "n/a"

                print(f"| {num_tokens} | {tp} | {label} | {row['time_s'] * 1e3:.0f} | {row['cpu_s'] * 1e3:.0f} | "
                      f"{row['peak_extra'] / MIB:.0f}{mark} | {ratio(naive, 'peak_extra')} | "
                      f"{ratio(unchunked, 'peak_extra')} | {ratio(unchunked, 'time_s')} | "
                      f"{ratio(unchunked, 'cpu_s')} |")
    print()
    print("Targets: (a) peak <= 1/3 of (c) and <= 1/(3 TP) of (b); (a) time <= 1.0x (c).")
    print(f"Plain tensor copy, one thread: {bandwidth / 1e9:.1f} GB/s (read + write, warm, 512 MiB).")
    for tp in (1, 2):
        for num_tokens in token_counts:
            row = rows[(num_tokens, tp, "ours")]
            if "time_s" not in row:
                continue
            # Compulsory traffic per rank: forward reads student + teacher, backward reads both again and
            # writes the gradient: 5 bf16 [T, V/TP] tensors.
            moved = 5 * num_tokens * (V // tp) * 2
            rate = moved / row["time_s"]
            print(f"(a) T={num_tokens} TP={tp}: {rate / 1e9:.2f} GB/s per rank of compulsory traffic "
                  f"({moved / GIB:.2f} GiB per rank) = {rate / bandwidth:.1%} of one thread's copy bandwidth")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
