"""Shared pieces of the multi-process workers: tiny models, fixed batches, comparisons."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))

from megatron_opsd.models.description import ModelConfig  # noqa: E402
from megatron_opsd.models.sharding import layer_offset_map, pad_vocab, shard, to_global_name  # noqa: E402


def tiny_llama(**overrides) -> ModelConfig:
    """4 layers (so PP=2 x VPP=2 has one layer per chunk), GQA with 2 KV groups."""
    fields = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def causal_inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and an explicit causal mask (megatron convention: True = masked out)."""
    b, s = tokens.shape
    position_ids = torch.arange(s).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None].expand(b, 1, s, s)
    return position_ids, mask


def unsharded_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def rank_print(*args) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, flush=True)


def check_close(what: str, actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float) -> float:
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    return err


def main_grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def chunk_grads_vs_reference(chunks, ref_grads: dict[str, torch.Tensor], tp_rank: int, tp_size: int, *,
                             tied: bool, atol: float, rtol: float, select=main_grad) -> float:
    """Compare ``select(param)`` (default: the gradient) of every parameter with the TP shard of the
    unsharded reference tensor of the same global name."""
    worst = 0.0
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        offsets = layer_offset_map(module)
        for name, param in module.named_parameters():
            key = to_global_name(name, offsets)
            if key == "output_layer.weight" and tied:
                key = "embedding.word_embeddings.weight"
            grad = select(param)
            expected = shard(key, pad_vocab(key, ref_grads[key], param.shape[0] * tp_size), tp_rank, tp_size)
            worst = max(worst, check_close(f"grad {key}", grad, expected, atol=atol, rtol=rtol))
    return worst
