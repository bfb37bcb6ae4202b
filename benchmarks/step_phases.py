"""Where our OPSD step's peak memory sits: peak RSS per phase of ``benchmarks/vs_trl.py``'s main case.

    python benchmarks/step_phases.py                       # bf16, recompute full (vs_trl.py's defaults)
    python benchmarks/step_phases.py --dtype fp32 --recompute none
    python benchmarks/step_phases.py --quick               # tiny sizes (smoke run)

Our side only, the same model, prompts and step as ``vs_trl.py``'s ``ours_child`` (B=8, R=256 by
default), in this process (the model is built and converted in a child process first, as there). A
thread samples the process's RSS every 2 ms and files it under the phase running then: the rollout (``MegatronRolloutEngine.generate``), the forward passes (teacher and student, up to
the loss), the fused projection's forward and backward, the rest of the backward (the layers, with
their recompute), the optimizer step, and "between" (batch building). Only steps after the first count
(the first creates Adam's moments). The last column is each phase's peak over the fixed state (the
process's RSS at the start of the last rollout, after the previous optimizer step).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402

PHASES = ("rollout", "forward", "loss forward", "loss backward", "model backward", "optimizer", "between")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--recompute", choices=["full", "selective", "none"], default="full")
    p.add_argument("--steps", type=int, default=3, help="steps, the first one not counted (>= 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps={args.steps} must be >= 2 (the first step is not counted)")
    return args


class PhaseSampler:
    """Peak RSS (GiB) per phase label, sampled by a daemon thread."""

    def __init__(self) -> None:
        self.phase, self.counting = "between", False
        self.peaks: dict[str, float] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            if self.counting:
                phase = self.phase
                rss = vs_trl._rss_gib()
                # a sample taken while the phase changed belongs to either: dropped (the next one, 2 ms on,
                # is not), else a rollout's peak read just before it returned was filed under the next phase
                if self.phase == phase:
                    self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss)
            time.sleep(0.002)

    def wrap(self, fn, phase: str, after: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = after
        return wrapper


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(vs_trl._free_port(30100, 30199)))
    defaults = vs_trl.parse_args(["--quick"] if args.quick else [])
    model = dict(vocab=defaults.vocab, hidden=defaults.hidden, layers=defaults.layers, heads=defaults.heads,
                 kv_heads=defaults.kv_heads, ffn=defaults.ffn,
                 max_positions=defaults.prompt + defaults.teacher_extra + defaults.response + 8)
    import megatron_opsd.opsd.step as step
    from megatron_opsd.losses import projected
    from megatron_opsd.rollout import megatron_engine

    with tempfile.TemporaryDirectory(prefix="step-phases-") as tmp:
        megatron_dir = str(Path(tmp) / f"megatron-{args.dtype}")
        # the HF model and the conversion in a child process, as vs_trl.py does: not in this RSS
        setup = vs_trl.spawn(sys.executable, dict(side="setup", hf_dir=str(Path(tmp) / "hf"), model=model,
                                                  megatron_dirs={args.dtype: megatron_dir}), Path(tmp), args.threads)
        if "error" in setup:
            sys.exit("step_phases: building or converting the model failed (see above)")
        rng = random.Random(0)
        prompts = [(rng.sample(range(3, defaults.vocab), defaults.prompt),
                    rng.sample(range(3, defaults.vocab), defaults.teacher_extra))
                   for _ in range(args.steps * defaults.batch)]
        sampler = PhaseSampler()
        fixed = {}
        engine = megatron_engine.MegatronRolloutEngine
        original_generate = engine.generate
        calls = []

        def generate(self, *a, **kw):  # counting starts with the second rollout
            calls.append(1)
            if len(calls) == 2:
                sampler.counting = True
            if len(calls) == args.steps:
                fixed["gib"] = vs_trl._rss_gib()
            return original_generate(self, *a, **kw)

        loss = projected._ProjectedTokenLoss
        patches = [(engine, "generate", sampler.wrap(generate, "rollout", "between")),
                   (step, "run_schedule", sampler.wrap(step.run_schedule, "forward", "between")),
                   (step, "optimizer_step", sampler.wrap(step.optimizer_step, "optimizer", "between")),
                   (loss, "forward", staticmethod(sampler.wrap(loss.forward, "loss forward", "forward"))),
                   (loss, "backward", staticmethod(sampler.wrap(loss.backward, "loss backward", "model backward")))]
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
        for owner, name, value in patches:
            setattr(owner, name, value)
        try:
            result = vs_trl.ours_child(dict(threads=args.threads, batch=defaults.batch, response=defaults.response,
                                            steps=args.steps, prompts=prompts, dtype=args.dtype,
                                            megatron_dir=megatron_dir, recompute=args.recompute))
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)
        sampler.counting = False
    print(f"\n# Peak RSS per phase, ours, {args.dtype}, recompute {args.recompute}: vs_trl.py's main case "
          f"(V={defaults.vocab}, hidden {defaults.hidden}, {defaults.layers} layers; B={defaults.batch}, "
          f"R={defaults.response}), steps 2-{args.steps}, {args.threads} threads\n")
    print("| phase | peak RSS GiB | over the fixed state GiB |\n|---|---|---|")
    for phase in PHASES:
        if phase in sampler.peaks:
            peak = sampler.peaks[phase]
            print(f"| {phase} | {peak:.3f} | {peak - fixed['gib']:+.3f} |")
    print(f"\nfixed state (RSS when the last rollout starts): {fixed['gib']:.3f} GiB; process peak "
          f"{result['peak_gib']:.3f} GiB; step {result['step_s']:.1f} s (rollout {result['rollout_s']:.1f} s)")


if __name__ == "__main__":
    main()
