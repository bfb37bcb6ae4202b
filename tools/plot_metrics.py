"""Render a run's metrics.jsonl to PNG: loss, divergence, clip fraction, accuracy, throughput, and the
teacher-advantage and leakage diagnostics.

    python tools/plot_metrics.py runs/embedded/logs/metrics.jsonl --out runs/embedded/metrics.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = [("train", "loss", "loss"), ("train", "divergence", "divergence (unclipped)"),
          ("train", "clip_fraction", "clip fraction"), ("eval", "accuracy", "held-out accuracy"),
          ("train", "response_length", "response length"), ("train", "tokens_per_s", "tokens/s (step)"),
          ("train", "teacher_advantage", "teacher advantage (nats/token)"),
          ("train", "leakage_rate", "leakage rate")]


def load(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}:{number}: not a JSON line ({exc})") from None
    latest: dict[tuple, dict] = {}
    for r in records:  # a resumed run repeats steps: the last record of a (kind, step) wins
        latest[(r.get("kind"), r.get("step"))] = r
    return sorted(latest.values(), key=lambda r: (r.get("kind", ""), r.get("step", 0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: next to metrics)")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        print(f"plot_metrics: {args.metrics} does not exist", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load(args.metrics)
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, (kind, key, title) in zip(axes.flat, PANELS):
        points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if kind == "eval" else None, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = args.out or args.metrics.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


def plot_methods(curves: dict[str, list[tuple[float, float, float]]], out: Path, title: str = "") -> Path:
    """Held-out accuracy against generated tokens and against wall time, one line per method
    (``curves[name]`` = [(tokens, seconds, accuracy), ...]; benchmarks/methods.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in curves.items():
        tokens, seconds, accuracy = zip(*points)
        axes[0].plot(tokens, accuracy, marker="o", markersize=3, label=name)
        axes[1].plot(seconds, accuracy, marker="o", markersize=3, label=name)
    for ax, xlabel in zip(axes, ("generated tokens", "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    sys.exit(main())
