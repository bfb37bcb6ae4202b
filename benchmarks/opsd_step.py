"""OPSD step: peak memory and step time of ours vs the usual ways of computing the teacher.

    python benchmarks/opsd_step.py                  # defaults: ~10 minutes on a 2-core CPU
    python benchmarks/opsd_step.py --response 128   # quicker

Variants (one fresh process each, TP=1/PP=1, so peak RSS is per rank and comparable):
  (a) ours        teacher and student passes of each micro-batch in one schedule; teacher under
                  no_grad; teacher logits live only for their micro-batch
  (b) separate    a teacher pass over all micro-batches first, keeping their teacher logits at the
                  response positions until the student pass uses them (how Megatron-based OPD/OPSD
                  frameworks do it)
  (c) opd         (b) with a separate same-size teacher model (on-policy distillation baseline)
  (d) autograd    (a) but the teacher pass runs with autograd and its graph stays alive until the
                  micro-batch's backward (a naive single-pass implementation)
  (e) ours, logits materialised   (a) with loss.fused_projection=false: the fused schedule alone
  (f) LoRA        (a) with LoRA adapters (rank --lora-rank on all seven projections, base frozen) and the
                  paper's theta_0 teacher = the same weights with the adapters switched off (no copy)
  (g) full FT, frozen copy   (a) training every weight, theta_0 teacher = a frozen copy of the weights
LoRA comparison (weights dominate; the paper's recipe vs the alternatives):
    python benchmarks/opsd_step.py --layers 8 --hidden 1024 --response 128 --prompt 64 \
        --teacher-extra 128 --microbatches 2 --variants fgc
Logits are projected at response positions only in every variant. (a) projects inside the loss a
chunk of tokens at a time (no [R, V] logits tensor, student or teacher); (b)-(e) materialise the
micro-batch's [R, V] logits as megatron's output layer does, so (e) vs (b) isolates the schedule and
(a) vs (e) the fused projection. Peak memory = max RSS of the process (model, Adam state and
activations).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"a": "ours (fused schedule + fused projection)", "b": "separate teacher pass",
            "c": "OPD, separate teacher model", "d": "teacher with autograd",
            "e": "ours, logits materialised", "f": "LoRA, theta_0 teacher = adapters off",
            "g": "full FT, theta_0 teacher = frozen copy"}


def build(args, lora: bool = False):
    from megatron_opsd.data.batch import collate_pairs
    from megatron_opsd.data.contexts import build_pair
    from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
    from megatron_opsd.models.description import ModelConfig
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    model_cfg = ModelConfig(model_type="qwen3", vocab_size=args.vocab, hidden_size=args.hidden,
                            intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    runtime = init_parallel(ParallelConfig(), seed=0)
    chunks = build_model(model_cfg, runtime)
    if lora:
        from megatron_opsd.models.lora import LoRAConfig, attach_lora

        attach_lora(chunks, model_cfg, LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank), runtime, seed=0)
    ddp = wrap_ddp(chunks, runtime)
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=1e-5))
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, args.vocab, (n,), generator=gen).tolist()  # noqa: E731
    batches = []
    for _ in range(args.microbatches):
        pair = build_pair(ids(args.prompt), ids(args.prompt + args.teacher_extra), ids(args.response),
                          stop_ids=set(), max_seq_len=10**9, overlong="drop")
        batches.append(collate_pairs([pair], 0))
    return model_cfg, runtime, chunks, ddp, optimizer, batches


def separate_step(ctx, ddp, optimizer, batches, teacher_chunks, *, opd: bool):
    """(b)/(c): all teacher logits first, then the student schedule reading them."""
    from megatron_opsd.engine import forward_backward
    from megatron_opsd.opsd.step import _projection, loss_func, optimizer_step, reduce_metrics, zero_grads

    zero_grads(ddp, optimizer)
    teacher = teacher_chunks[0]
    stored = []
    with torch.no_grad():
        for batch in batches:
            side, index = (batch.student, batch.student_index) if opd else (batch.teacher, batch.teacher_index)
            teacher.set_input_tensor(None)
            with _projection(teacher).at(index):
                stored.append(teacher(side.tokens, side.position_ids, side.attention_mask))

    def forward_step(data_iterator, model):
        i, batch = next(data_iterator)
        student = model.module
        student.set_input_tensor(None)
        with _projection(student).at(batch.student_index):
            out = model(batch.student.tokens, batch.student.position_ids, batch.student.attention_mask)
        return out, partial(loss_func, ctx, i, batch, stored[i])

    out = forward_backward(ddp, ctx.runtime, forward_step, iter(list(enumerate(batches))),
                           num_microbatches=len(batches), seq_length=1, micro_batch_size=1)
    metrics = reduce_metrics(out, ctx.runtime)
    optimizer_step(optimizer, 1.0, 0)
    return metrics


def autograd_teacher_step(ctx, ddp, optimizer, batches):
    """(d): the teacher part runs with autograd; its graph lives until the micro-batch's backward."""
    from megatron_opsd.engine import forward_backward
    from megatron_opsd.opsd.step import _projection, loss_func, optimizer_step, reduce_metrics, zero_grads

    zero_grads(ddp, optimizer)

    def forward_step(data_iterator, model):
        i, batch = next(data_iterator)
        module = model.module
        module.set_input_tensor(None)
        with _projection(module).at(batch.teacher_index):
            teacher_logits = module(batch.teacher.tokens, batch.teacher.position_ids, batch.teacher.attention_mask)
        with _projection(module).at(batch.student_index):
            out = model(batch.student.tokens, batch.student.position_ids, batch.student.attention_mask)
        return out, partial(loss_func, ctx, i, batch, teacher_logits)  # not detached: graph kept

    out = forward_backward(ddp, ctx.runtime, forward_step, iter(list(enumerate(batches))),
                           num_microbatches=len(batches), seq_length=1, micro_batch_size=1)
    metrics = reduce_metrics(out, ctx.runtime)
    optimizer_step(optimizer, 1.0, 0)
    return metrics


def child(args) -> None:
    from megatron_opsd.opsd import LossConfig, StepContext, Teacher
    from megatron_opsd.opsd.step import train_step
    from megatron_opsd.opsd.teacher import FrozenTeacher
    from megatron_opsd.models.provider import ModelBuildConfig

    from megatron_opsd.opsd.teacher import AdapterTeacher

    model_cfg, runtime, chunks, ddp, optimizer, batches = build(args, lora=args.variant == "f")
    teacher = {"f": lambda: AdapterTeacher(ddp, "initial"),
               "g": lambda: FrozenTeacher.copy_of(ddp, model_cfg, runtime, ModelBuildConfig())}.get(
        args.variant, lambda: Teacher(ddp))()
    loss = LossConfig(teacher=teacher.name, fused_projection=args.variant != "e")
    ctx = StepContext(runtime=runtime, loss=loss, temperature=1.0, vocab_size=model_cfg.vocab_size,
                      teacher=teacher, detailed_metrics=False)
    if args.variant in ("a", "e", "f", "g"):
        run = lambda: train_step(ctx, ddp, optimizer, batches, pad_id=0, clip_grad=1.0)  # noqa: E731
    elif args.variant == "b":
        run = lambda: separate_step(ctx, ddp, optimizer, batches, ctx.teacher.chunks, opd=False)  # noqa: E731
    elif args.variant == "c":
        teacher = FrozenTeacher.copy_of(ddp, model_cfg, runtime, ModelBuildConfig())
        run = lambda: separate_step(ctx, ddp, optimizer, batches, teacher.chunks, opd=True)  # noqa: E731
    else:
        run = lambda: autograd_teacher_step(ctx, ddp, optimizer, batches)  # noqa: E731
    run()  # warm-up: allocates optimizer state
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics = run()
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": args.variant, "step_s": min(times), "peak_mib": peak_mib,
                      "loss": metrics["loss"]}), flush=True)
    from megatron_opsd.parallel import shutdown

    shutdown()  # (left to interpreter exit, gloo's threads sometimes abort the process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--response", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128, help="student prompt tokens")
    parser.add_argument("--teacher-extra", type=int, default=256, help="teacher prompt minus student prompt")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=64, help="(f): the paper's rank 64, alpha 128")
    parser.add_argument("--variants", default="abcde", help="which to run, e.g. 'abe' (default: abcde)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    print(f"# OPSD step, TP=1 CPU: {args.layers} layers, hidden {args.hidden}, V={args.vocab}, "
          f"{args.microbatches} micro-batches x 1 pair, response {args.response} tokens, student prompt "
          f"{args.prompt}, teacher prompt {args.prompt + args.teacher_extra}; fwd+bwd+Adam step")
    results = {}
    for variant in VARIANTS:
        if variant not in args.variants:
            results[variant] = None
            continue
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "variants")]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not line:
            results[variant] = None
            print(f"variant {variant} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[variant] = json.loads(line[-1])
    a = results.get("a")
    print("| variant | step time (s) | peak RSS (MiB) | time / (a) | peak / (a) | loss |")
    print("|---|---|---|---|---|---|")
    for variant, name in VARIANTS.items():
        r = results[variant]
        if r is None:
            if variant in args.variants:
                print(f"| ({variant}) {name} | failed | | | | |")
            continue
        ratio_t = r["step_s"] / a["step_s"] if a else float("nan")
        ratio_m = r["peak_mib"] / a["peak_mib"] if a else float("nan")
        print(f"| ({variant}) {name} | {r['step_s']:.2f} | {r['peak_mib']:.0f} | {ratio_t:.2f} | {ratio_m:.2f} "
              f"| {r['loss']:.6f} |")
    f, g, c = results.get("f"), results.get("g"), results.get("c")
    if f and g:
        print(f"\nLoRA (f) / full FT with a frozen copy (g): peak {f['peak_mib'] / g['peak_mib']:.2f} (target <= 0.5), "
              f"time {f['step_s'] / g['step_s']:.2f} (target <= 1.0)")
    if f and c:
        print(f"LoRA (f) / OPD with a separate teacher (c): peak {f['peak_mib'] / c['peak_mib']:.2f} (target <= 0.4)")
    if a and results.get("b") and results.get("c"):
        print(f"\n(a)/(b) peak = {a['peak_mib'] / results['b']['peak_mib']:.2f} (target <= 0.5), "
              f"(a)/(c) peak = {a['peak_mib'] / results['c']['peak_mib']:.2f} (target <= 0.6), "
              f"(a)/(b) time = {a['step_s'] / results['b']['step_s']:.2f} (target <= 1.05)")


if __name__ == "__main__":
    main()
