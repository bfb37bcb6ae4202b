"""Mixture of experts on CPU: OPSD step time and peak memory vs the dense model of the same active
parameters, and HF -> megatron conversion peak memory vs model bytes. One table.

    python benchmarks/moe.py            # defaults: a few minutes on a 2-core CPU
    python benchmarks/moe.py --quick    # a small smoke run

Step rows (fresh processes; fwd+bwd+Adam of one OPSD step, live teacher, min over --repeats after a
warm-up step; peak = max RSS of the process, or of the busiest rank):
  dense        qwen3, FFN width k * F_e: the MoE's active parameters per token (router excepted)
  moe          qwen3_moe: E experts of width F_e, top-k (k = 2), alltoall dispatcher, SequentialMLP
  moe EP2      the same on 2 processes (torchrun), E/2 experts per rank
Conversion rows: a random bf16 qwen3_moe checkpoint with the --conv-* shapes (names and shapes from the
converter's own table, values drawn tensor by tensor), converted by tools/convert_hf_to_megatron.py in a
fresh process; peak RSS from ``wait4`` (benchmarks/conversion.py's ``measure``), against an idle process
that only imports what the converter imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.conversion import measure  # noqa: E402

MIB = 2 ** 20


def model_config(args, kind: str):
    from megatron_opsd.models.description import ModelConfig

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    if kind == "dense":
        return ModelConfig(model_type="qwen3", intermediate_size=args.topk * args.expert_width, **common)
    return ModelConfig(model_type="qwen3_moe", intermediate_size=args.topk * args.expert_width,
                       moe_intermediate_size=args.expert_width, num_experts=args.experts,
                       num_experts_per_tok=args.topk, router_aux_loss_coef=0.001, **common)


def step_child(args) -> None:
    """One row: build, one warm-up step, --repeats timed steps; print a JSON line (each rank)."""
    import torch

    from megatron_opsd.data.batch import collate_pairs
    from megatron_opsd.data.contexts import build_pair
    from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd import LossConfig, StepContext, Teacher
    from megatron_opsd.opsd.step import train_step
    from megatron_opsd.parallel import ParallelConfig, init_parallel, shutdown

    cfg = model_config(args, args.row.split()[0])
    runtime = init_parallel(ParallelConfig(ep=args.ep), seed=0)
    chunks = build_model(cfg, runtime)
    ddp = wrap_ddp(chunks, runtime)
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=1e-5))
    gen = torch.Generator().manual_seed(runtime.dp_rank)
    ids = lambda n: torch.randint(1, args.vocab, (n,), generator=gen).tolist()  # noqa: E731
    batches = [collate_pairs([build_pair(ids(args.prompt), ids(2 * args.prompt), ids(args.response), stop_ids=set(),
                                         max_seq_len=10**9, overlong="drop")], 0)
               for _ in range(args.microbatches)]
    ctx = StepContext(runtime=runtime, loss=LossConfig(teacher="live"), temperature=1.0, vocab_size=cfg.vocab_size,
                      teacher=Teacher(ddp), detailed_metrics=False)
    train_step(ctx, ddp, optimizer, batches, pad_id=0, clip_grad=1.0)  # warm-up: allocates optimizer state
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        train_step(ctx, ddp, optimizer, batches, pad_id=0, clip_grad=1.0)
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    print(json.dumps({"row": args.row, "rank": runtime.rank, "step_s": min(times), "params": params,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    shutdown()


def run_step_row(args, row: str, ep: int) -> dict:
    child = [__file__, "--step-row", row, "--ep", str(ep)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("layers", "hidden", "vocab", "experts", "expert_width", "topk", "microbatches", "response",
                 "prompt", "repeats")]
    cmd = [sys.executable, *child] if ep == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ep), "--master_addr=127.0.0.1",
        f"--master_port={args.port}", *child]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if ep > 1 else "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{row} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return {"step_s": max(r["step_s"] for r in lines), "peak_mib": max(r["peak_mib"] for r in lines),
            "params": lines[0]["params"]}


def write_random_checkpoint(directory: Path, cfg, max_shard_size: str = "300MB") -> int:
    """A random bf16 HF checkpoint of ``cfg`` (names and shapes: the converter's table); its bytes."""
    import torch

    from megatron_opsd.conversion.megatron_to_hf import hf_config_dict
    from megatron_opsd.conversion.safetensors_io import ShardedWriter, TensorSpec, parse_size
    from megatron_opsd.models.hf_mapping import hf_shapes

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(cfg, torch.bfloat16), indent=2))
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in hf_shapes(cfg).items()]
    writer = ShardedWriter(directory, specs, parse_size(max_shard_size))
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        base = 1.0 if "norm" in spec.name else 0.0
        writer.write(spec.name, (base + 0.02 * torch.randn(spec.shape, generator=gen)).to(torch.bfloat16))
    writer.close()
    return sum(s.nbytes for s in specs)


def conversion_rows(args) -> list[tuple[str, float, float, int]]:
    conv = argparse.Namespace(**{**vars(args), "hidden": args.conv_hidden, "layers": args.conv_layers,
                                 "experts": args.conv_experts, "expert_width": args.conv_expert_width})
    work = Path(tempfile.mkdtemp(prefix="moe_bench_"))
    try:
        hf, meg = work / "hf", work / "megatron"
        subprocess.run([sys.executable, __file__, "--write-model", str(hf)] +
                       [f"--{k.replace('_', '-')}={v}" for k, v in vars(conv).items()
                        if k in ("layers", "hidden", "vocab", "experts", "expert_width", "topk")],
                       check=True, cwd=REPO)
        model_bytes = int((hf / "bytes.txt").read_text())
        py = sys.executable
        rows = []
        for name, cmd in (("idle baseline", [py, "-c", "import torch, megatron.core, safetensors; "
                                                        "from megatron_opsd.parallel import init_parallel"]),
                          ("hf -> megatron", [py, "tools/convert_hf_to_megatron.py", "--hf-dir", str(hf),
                                              "--out", str(meg), "--dtype", "bf16"])):
            wall, rss, _ = measure(cmd)
            rows.append((name, wall, rss, model_bytes))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=512, help="F_e, each routed expert's SwiGLU width")
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=64, help="student prompt tokens (teacher: twice as many)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conv-hidden", type=int, default=768)
    parser.add_argument("--conv-layers", type=int, default=8)
    parser.add_argument("--conv-experts", type=int, default=16)
    parser.add_argument("--conv-expert-width", type=int, default=512)
    parser.add_argument("--port", type=int, default=29890, help="torchrun master port of the EP2 row")
    parser.add_argument("--step-row", dest="row", help=argparse.SUPPRESS)
    parser.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--write-model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.expert_width, args.response, args.repeats = 2, 128, 128, 32, 1
        args.conv_hidden, args.conv_layers, args.conv_experts, args.conv_expert_width = 256, 2, 8, 256
    if args.row:
        step_child(args)
        return
    if args.write_model:
        directory = Path(args.write_model)
        (directory.parent).mkdir(parents=True, exist_ok=True)
        nbytes = write_random_checkpoint(directory, model_config(args, "moe"))
        (directory / "bytes.txt").write_text(str(nbytes))
        return

    steps = [(row, run_step_row(args, row, ep)) for row, ep in (("dense", 1), ("moe", 1), ("moe EP2", 2))]
    conversion = conversion_rows(args)
    dense = steps[0][1]
    print(f"# MoE on CPU: {args.layers} layers, hidden {args.hidden}, V={args.vocab}; MoE {args.experts} experts x "
          f"width {args.expert_width}, top-{args.topk}; dense FFN width {args.topk * args.expert_width}; "
          f"{args.microbatches} micro-batches x 1 pair, response {args.response}, prompt {args.prompt} "
          f"(teacher {2 * args.prompt}); conversion: hidden {args.conv_hidden}, {args.conv_layers} layers, "
          f"{args.conv_experts} experts x width {args.conv_expert_width}, bf16")
    print("| row | params (per rank) | step time (s) | peak RSS (MiB) | time / dense | peak / dense |")
    print("|---|---|---|---|---|---|")
    for row, r in steps:
        print(f"| OPSD step, {row} | {r['params'] / 1e6:.1f}M | {r['step_s']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['step_s'] / dense['step_s']:.2f} | {r['peak_mib'] / dense['peak_mib']:.2f} |")
    (_, _, idle, _), (_, wall, rss, model_bytes) = conversion
    print(f"| conversion hf -> megatron ({model_bytes / MIB:.0f} MiB bf16 model) | | {wall:.1f} | {rss / MIB:.0f} | "
          f"peak / model {rss / model_bytes:.2f} | (peak - idle {idle / MIB:.0f}) / model "
          f"{(rss - idle) / model_bytes:.2f} |")


if __name__ == "__main__":
    main()
