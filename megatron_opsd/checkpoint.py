"""Model checkpoints in megatron-core's distributed format (torch_dist), written atomically.

A checkpoint directory holds the dist checkpoint plus ``model.json`` (the model description). It can
be loaded at any TP/PP/VPP layout: megatron-core's ``sharded_state_dict`` records global offsets.

Atomicity: everything is written to ``<dir>.tmp-<pid>`` and renamed into place by rank 0 after all
ranks finished; a crash mid-save leaves only the temporary directory behind, never a half checkpoint
under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opsd.models.description import ModelConfig

MODEL_JSON = "model.json"


def _chunk_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """One sharded state dict for all chunks (keys ``model``, or ``model0``, ``model1``, … with VPP)."""
    return {key: _unwrap(c).sharded_state_dict() for key, c in zip(_chunk_keys(len(chunks)), chunks)}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def atomic_save(save_fn, directory: str | Path) -> Path:
    """Run ``save_fn(tmp_dir)`` on every rank, then publish ``tmp_dir`` as ``directory`` (rank 0)."""
    directory = Path(directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = directory.with_name(directory.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    save_fn(tmp)
    _barrier()
    if rank == 0:
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return directory


def save_model(chunks: list[torch.nn.Module], model: ModelConfig, directory: str | Path) -> Path:
    """Save model weights (+ description) as a dist checkpoint loadable at any layout."""
    from megatron.core import dist_checkpointing

    def write(tmp: Path) -> None:
        dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_model_json(model, tmp)

    return atomic_save(write, directory)


def write_model_json(model: ModelConfig, directory: Path) -> None:
    tmp = directory / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(model.to_hf_dict(), indent=2))
    os.replace(tmp, directory / MODEL_JSON)


def read_model_json(directory: str | Path) -> ModelConfig:
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MODEL_JSON}: not a megatron_opsd model checkpoint")
    return ModelConfig.from_hf_dict(json.loads(path.read_text()))


def load_model(chunks: list[torch.nn.Module], directory: str | Path, *, prefix: str | None = None) -> None:
    """Load model weights saved by ``save_model`` (or a training checkpoint) into ``chunks``."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    sharded = model_sharded_state_dict(chunks)
    if prefix:
        sharded = {prefix: sharded}
    state = dist_checkpointing.load(sharded, str(directory), strict="raise_all")
    if prefix:
        state = state[prefix]
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        _unwrap(chunk).load_state_dict(state[key], strict=True)
