"""Packed + token-budget micro-batches vs padded fixed-size ones; activation memory with SP at TP2.

    flock /tmp/mp.lock python benchmarks/packing.py          # ~5 minutes on a 2-core CPU
    python benchmarks/packing.py --skip-sp                   # the single-process part only

Prints one table:
  * step time (one OPSD training step, TP1, the best of --repeats rounds alternating the two layouts)
    on the same pairs (equal tokens):
    responses drawn log-uniformly from --min-response..--max-response tokens, student prompts
    --prompt tokens, teacher prompts --teacher-extra longer. Padded: --micro-batch-size pairs per
    right-padded micro-batch (in the drawn order). Packed: micro-batches formed by
    train.max_tokens_per_micro_batch (= --budget context tokens), each one packed row.
  * activation memory per rank of one student forward (bytes of the tensors autograd saves for
    backward, each storage counted once) on a packed micro-batch, with sequence parallelism vs without
    at TP2 and TP4 (--sp-tp; one torchrun of TP processes each), on a model where activations dominate
    (long context, small hidden size).
Packed micro-batches go through megatron's THD path (``PackedSeqParams``): attention runs pair by
pair (the local spec's ``PackedDotProductAttention`` on CPU, Transformer Engine's on GPU), so its work
is the sum of the pairs' squared lengths; padded micro-batches attend over every padded row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def draw_pairs(args, vocab: int):
    from megatron_opsd.data.contexts import build_pair

    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, vocab, (n,), generator=gen).tolist()  # noqa: E731
    pairs = []
    for _ in range(args.pairs):
        u = float(torch.rand((), generator=gen))
        log_lo, log_hi = math.log(args.min_response), math.log(args.max_response)
        response = int(round(math.exp(log_lo + u * (log_hi - log_lo))))
        pairs.append(build_pair(ids(args.prompt), ids(args.prompt + args.teacher_extra), ids(response),
                                stop_ids=set(), max_seq_len=10**9, overlong="drop"))
    return pairs


def model_config(hidden: int, layers: int, vocab: int, heads: int = 4):
    from megatron_opsd.models.description import ModelConfig

    return ModelConfig(model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                       max_position_embeddings=8192)


def step_times(args) -> dict:
    from megatron_opsd.data.batch import collate_pairs, token_budget_groups
    from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd import LossConfig, StepContext, Teacher
    from megatron_opsd.opsd.step import train_step
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    cfg = model_config(args.hidden, args.layers, args.vocab)
    runtime = init_parallel(ParallelConfig(), seed=0)
    ddp = wrap_ddp(build_model(cfg, runtime), runtime)
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=1e-12))  # steps move nothing measurable
    ctx = StepContext(runtime=runtime, loss=LossConfig(), temperature=1.0, vocab_size=cfg.vocab_size,
                      teacher=Teacher(ddp), detailed_metrics=False)
    pairs = draw_pairs(args, cfg.vocab_size)
    size = args.micro_batch_size
    padded = [collate_pairs(pairs[i:i + size], 0) for i in range(0, len(pairs), size)]
    groups = token_budget_groups([len(p.student_ids) + len(p.teacher_ids) for p in pairs], args.budget)
    packed = [collate_pairs([pairs[i] for i in g], 0, pack=True) for g in groups]
    out = {name: dict(times=[], micro_batches=len(batches),
                      slots=sum(b.student.tokens.numel() + b.teacher.tokens.numel() for b in batches))
           for name, batches in (("padded", padded), ("packed", packed))}
    for round_ in range(args.repeats + 1):  # the first round is a warm-up; rounds alternate the two
        for name, batches in (("padded", padded), ("packed", packed)):
            start = time.perf_counter()
            metrics = train_step(ctx, ddp, optimizer, batches, pad_id=0, clip_grad=0.0)
            if round_:
                out[name]["times"].append(time.perf_counter() - start)
            out[name].update(loss=metrics["loss"], tokens=metrics["response_tokens"])
    for entry in out.values():
        entry["time"] = min(entry["times"])
    out["context_tokens"] = sum(len(p.student_ids) + len(p.teacher_ids) for p in pairs)
    runtime.destroy()
    return out


def sp_worker(args) -> None:
    """One rank of TP=world size: saved-for-backward bytes of one student forward, without and with SP."""
    from megatron_opsd.data.batch import collate_pairs
    from megatron_opsd.data.contexts import build_pair
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd.step import _model_inputs, pad_for_layout
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    cfg = model_config(args.sp_hidden, args.sp_layers, args.vocab)
    tp = int(os.environ["WORLD_SIZE"])
    result = {}
    for sp in (False, True):
        runtime = init_parallel(ParallelConfig(tp=tp, sequence_parallel=sp), seed=0)
        chunk = build_model(cfg, runtime)[0]
        gen = torch.Generator().manual_seed(0)
        pair = build_pair(torch.randint(1, cfg.vocab_size, (args.sp_length,), generator=gen).tolist(),
                          torch.randint(1, cfg.vocab_size, (args.sp_length,), generator=gen).tolist(),
                          [1], stop_ids=set(), max_seq_len=10**9, overlong="drop")
        # padding-free, as at scale: the pairs packed in one THD row
        side = pad_for_layout([collate_pairs([pair] * args.sp_batch, 0, pack=True)], runtime, 0)[0].student
        seen: dict[int, int] = {}

        def pack(t):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = chunk(side.tokens, side.position_ids, **_model_inputs(chunk, side))
        params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
        result["sp" if sp else "no_sp"] = sum(n for ptr, n in seen.items() if ptr not in params)
        del out
        runtime.destroy()
    if int(os.environ["RANK"]) == 0:
        with open(args.sp_out, "w") as f:
            json.dump(result, f)


def activation_memory(args, tp: int) -> dict:
    from tests.harness import torchrun_cmd

    with tempfile.TemporaryDirectory(prefix="packing-bench-") as tmp:
        out = Path(tmp) / "sp.json"
        cmd = torchrun_cmd(__file__, tp, "--sp-worker", "--sp-out", str(out), *sys.argv[1:])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"SP worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="pairs in the step (e.g. 8 prompts x 8 samples)")
    parser.add_argument("--min-response", type=int, default=32)
    parser.add_argument("--max-response", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--teacher-extra", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--budget", type=int, default=2560,
                        help="train.max_tokens_per_micro_batch (default: just above the longest pair, 2432)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sp-hidden", type=int, default=512)
    parser.add_argument("--sp-layers", type=int, default=2)
    parser.add_argument("--sp-length", type=int, default=512)
    parser.add_argument("--sp-batch", type=int, default=2)
    parser.add_argument("--sp-tp", type=int, nargs="+", default=[2, 4], help="tensor-parallel sizes (processes)")
    parser.add_argument("--skip-sp", action="store_true")
    parser.add_argument("--sp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sp-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sp_worker:
        return sp_worker(args)
    times = step_times(args)
    pad, pk = times["padded"], times["packed"]
    print(f"pairs={args.pairs} responses log-uniform {args.min_response}..{args.max_response}, prompt {args.prompt}, "
          f"teacher +{args.teacher_extra}; model hidden {args.hidden} x {args.layers} layers; "
          f"context tokens {times['context_tokens']}, response tokens {pad['tokens']} (both)")
    print(f"| {'measure':<44} | {'baseline':>16} | {'ours':>16} | {'ratio':>6} | target |")
    print(f"|{'-' * 46}|{'-' * 18}|{'-' * 18}|{'-' * 8}|--------|")
    print(f"| {'OPSD step time, TP1 (padded mbs=%d vs packed budget %d)' % (args.micro_batch_size, args.budget):<44} "
          f"| {pad['time']:>14.2f} s | {pk['time']:>14.2f} s | {pk['time'] / pad['time']:>6.2f} | <= 0.6 |")
    print(f"| {'  micro-batches / token slots':<44} | {pad['micro_batches']:>4} / {pad['slots']:>9} "
          f"| {pk['micro_batches']:>4} / {pk['slots']:>9} | {pk['slots'] / pad['slots']:>6.2f} |        |")
    assert abs(pk["loss"] - pad["loss"]) <= 1e-5 * max(1.0, abs(pad["loss"])), (pk["loss"], pad["loss"])
    if not args.skip_sp:
        for tp in args.sp_tp:
            mem = activation_memory(args, tp)
            label = (f"activations/rank TP{tp}, SP vs no SP (h={args.sp_hidden}, L={args.sp_length}, "
                     f"b={args.sp_batch})")
            print(f"| {label:<44} | {mem['no_sp'] / 2**20:>12.1f} MiB | {mem['sp'] / 2**20:>12.1f} MiB "
                  f"| {mem['sp'] / mem['no_sp']:>6.2f} | {'<= 0.6' if tp == 2 else '':>6} |")

if __name__ == "__main__":
    main()
