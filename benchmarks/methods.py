"""SFT (continued), GRPO, OPSD and OPSD+GRPO from one base model, equal optimizer steps.

    python benchmarks/methods.py                      # the embedded task, 20 steps, seeds 1 2
    python benchmarks/methods.py --quick              # tests/e2e/tiny.yaml, 2 steps, 1 seed (smoke run)

1. The base: the config's SFT warm-up (``train.warmup_sft_steps``) run once, cached under ``--out``;
   every method then starts from it (``train.load``, no warm-up).
2. Each method and seed is one ``megatron_opsd.train`` run (one process, TP=1) of ``--steps`` optimizer
   steps with an evaluation every ``--eval-every`` steps, logging generated tokens and step times.
   GRPO samples ``--grpo-n`` responses per prompt, OPSD+GRPO ``--combined-n``; SFT generates nothing.
3. Curves: held-out accuracy against cumulative generated tokens and against cumulative step wall time
   (mean over seeds), to ``--out/methods.png`` (tools/plot_metrics.py); a table: final accuracy,
   tokens, wall time, accuracy at equal tokens (each method's accuracy at the smallest total-token
   budget among the sampling methods) and tokens to reach ``--target`` accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {
    "sft": ["--loss.mode", "sft", "--data.overlong", "truncate_response"],
    "grpo": ["--loss.mode", "grpo"],
    "opsd": ["--loss.mode", "opsd"],
    "opsd+grpo": ["--loss.mode", "opsd+grpo"],
}


def run(args, name: str, out: Path, *overrides: str) -> float:
    cmd = [sys.executable, "-m", "megatron_opsd.train", "--config", str(args.config), "--parallel.tp", "1",
           "--checkpoint.dir", str(out / "ck"), "--logging.dir", str(out / "logs"), "--logging.tensorboard",
           "false", "--logging.progress_bar", "false", "--checkpoint.save_every", "0", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def curve(logs: Path) -> list[tuple[float, float, float]]:
    """[(cumulative generated tokens, cumulative step seconds, accuracy)] at each evaluation."""
    rows = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r.get("kind") == "train"}
    points = []
    for r in (r for r in rows if r.get("kind") == "eval"):
        done = [train[s] for s in train if s <= r["step"]]
        points.append((sum(t["generated_tokens"] for t in done), sum(t["step_s"] for t in done), r["accuracy"]))
    return points


def mean_curves(curves: list[list[tuple]]) -> list[tuple]:
    return [tuple(sum(c[i][k] for c in curves) / len(curves) for k in range(3)) for i in range(len(curves[0]))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "examples/configs/embedded_tiny_llama_tp2.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--grpo-n", type=int, default=8)
    p.add_argument("--combined-n", type=int, default=2)
    p.add_argument("--target", type=float, default=None, help="accuracy to reach (default: base + 0.02)")
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs/methods")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.steps, args.eval_every, args.seeds = ROOT / "tests/e2e/tiny.yaml", 2, 1, [1]
        args.grpo_n, extra = 2, ["--train.warmup_sft_steps", "2"]
    else:
        extra = []
    args.out.mkdir(parents=True, exist_ok=True)
    base_run = args.out / "base"
    bases = sorted((base_run / "run").glob("base-sft-*"))
    if not bases:  # the config's warm-up, run once (one SFT step on top, discarded)
        run(args, "base", base_run / "run", *extra, "--loss.mode", "sft", "--train.steps", "1",
            "--train.eval_problems", "1")
        bases = sorted((base_run / "run").glob("base-sft-*"))
    base = bases[-1]
    n_of = {"grpo": args.grpo_n, "opsd+grpo": args.combined_n}
    results = {}
    for name, overrides in METHODS.items():
        curves = []
        for seed in args.seeds:
            out = args.out / f"{name}-seed{seed}"
            if not (out / "logs" / "metrics.jsonl").is_file():
                run(args, f"{name} seed {seed}", out, *overrides, "--train.load", str(base),
                    "--train.warmup_sft_steps", "0", "--seed", str(seed), "--train.steps", str(args.steps),
                    "--train.eval_every", str(args.eval_every), "--train.eval_problems", str(args.eval_problems),
                    "--rollout.samples_per_prompt", str(n_of.get(name, 1)))
            curves.append(curve(out / "logs"))
        results[name] = mean_curves(curves)
    from tools.plot_metrics import plot_methods

    png = plot_methods(results, args.out / "methods.png",
                       f"{args.config.name}: {args.steps} steps, seeds {args.seeds}, mean")
    base_acc = results["opsd"][0][2]
    target = args.target if args.target is not None else base_acc + 0.02
    budget = min(results[m][-1][0] for m in results if results[m][-1][0] > 0)
    print(f"| method | final accuracy | generated tokens | step wall s | accuracy at {budget:.0f} tokens | "
          f"tokens to {target:.3f} |")
    print("|---|---|---|---|---|---|")
    for name, points in results.items():
        at_budget = [a for t, _, a in points if t <= budget][-1]
        reached = next((f"{t:.0f}" for t, _, a in points if a >= target), "not reached")
        print(f"| {name} | {points[-1][2]:.3f} | {points[-1][0]:.0f} | {points[-1][1]:.1f} | {at_budget:.3f} | {reached} |")
    print(f"base accuracy {base_acc:.3f}; plot: {png}")


if __name__ == "__main__":
    main()
