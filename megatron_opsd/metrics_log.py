"""Metrics sinks on rank 0: a JSONL file, TensorBoard, optional W&B, and a progress bar."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Writes one JSON object per event to ``dir/metrics.jsonl`` (append-only: resume continues it)."""

    def __init__(self, directory: str | Path, *, enabled: bool, tensorboard: bool, wandb_project: str | None,
                 progress_bar: bool, total_steps: int, start_step: int, config: dict):
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                print("logging.tensorboard: the tensorboard package is not installed; skipping", file=sys.stderr)
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config, resume="allow")
            except ImportError:
                print("logging.wandb_project: wandb is not installed; skipping", file=sys.stderr)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="opsd", dynamic_ncols=True)

    def log(self, kind: str, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                if self.tb is not None:
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)
        if kind == "train" and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4g}", div=f"{metrics.get('divergence', 0):.4g}",
                                 len=f"{metrics.get('response_length', 0):.0f}",
                                 tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
        elif kind != "train":
            self.message(f"[{kind} step {step}] " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
