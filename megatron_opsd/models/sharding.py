"""Move weights between the unsharded (TP=1, PP=1) layout and this rank's model chunks.

Unsharded names are the local-spec names of a single GPTModel holding every layer
(``decoder.layers.{global_index}.…``). A chunk's parameter is the tensor-parallel shard of its
unsharded twin:

- column-parallel (split dim 0 contiguously): word embeddings, output layer, linear_qkv (the per-KV-group
  interleaved layout splits into whole groups; with fewer KV groups than TP ranks megatron all-gathers
  and picks its group itself);
- linear_fc1 under SwiGLU: rank r holds cat(gate.chunk(TP)[r], up.chunk(TP)[r]);
- row-parallel (split dim 1): linear_proj, linear_fc2;
- replicated: norms, q/k layernorm, MoE router, shared-expert gate.

Mixtures of experts: routed experts (``mlp.experts.local_experts.{j}``, global index j in the unsharded
layout) are split over expert-parallel ranks, ``E / ep`` consecutive experts each, and each expert's
weights over expert-tensor-parallel ranks like a dense MLP (``ExpertLayout``). The shared expert is
an ordinary tensor-parallel MLP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class ExpertLayout:
    """Where this rank's routed experts sit: its expert-parallel and expert-tensor-parallel rank."""

    ep_rank: int = 0
    ep: int = 1
    etp_rank: int = 0
    etp: int = 1

    @classmethod
    def of(cls, runtime) -> "ExpertLayout":
        return cls(runtime.ep_rank, runtime.ep, runtime.etp_rank, runtime.config.etp)

    def tp_of(self, name: str, tp_rank: int, tp_size: int) -> tuple[int, int]:
        """(rank, size) of the tensor-parallel split that applies to unsharded tensor ``name``."""
        return (self.etp_rank, self.etp) if is_routed_expert(name) else (tp_rank, tp_size)


def is_routed_expert(name: str) -> bool:
    return _EXPERT.search(name) is not None


def expert_offset(chunk: torch.nn.Module, layout: ExpertLayout) -> int:
    """Global index of this rank's first routed expert (0 for dense models)."""
    experts = getattr(chunk.config, "num_moe_experts", None) or 0
    return layout.ep_rank * (experts // layout.ep)


def layer_offset_map(chunk: torch.nn.Module) -> dict[int, int]:
    """Local layer index -> global (0-based) layer index for a GPTModel chunk."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}


def to_global_name(name: str, offsets: dict[int, int], first_expert: int = 0) -> str:
    """The unsharded name of chunk parameter ``name``: global layer index, global expert index."""
    match = _LAYER.match(name)
    if not match:
        return name
    name = f"decoder.layers.{offsets[int(match.group(1))]}." + name[match.end():]
    if first_expert:
        name = _EXPERT.sub(lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + first_expert}.", name)
    return name


def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of unsharded tensor ``full`` named ``name`` (a view where possible)."""
    if tp_size == 1:
        return full
    if name.endswith("linear_fc1.weight"):  # dense MLP, routed and shared experts
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return _chunk(name, full, 1, tp_rank, tp_size)
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
                      "linear_qkv.bias")):
        return _chunk(name, full, 0, tp_rank, tp_size)
    return full


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard``: the unsharded tensor from every TP rank's shard, in rank order."""
    if len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([*gates, *ups])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, dim=1)
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
                      "linear_qkv.bias")):
        return torch.cat(shards, dim=0)
    return shards[0]


def _chunk(name: str, full: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP={tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


def pad_vocab(name: str, full: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Zero rows up to the padded vocabulary for embedding/output weights (padded logits are 0.0)."""
    if not name.endswith(("word_embeddings.weight", "output_layer.weight")) or full.shape[0] == padded_vocab:
        return full
    if full.shape[0] > padded_vocab:
        raise ValueError(f"{name}: {full.shape[0]} vocabulary rows exceed the model's {padded_vocab}")
    pad = full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])
    return torch.cat([full, pad])


@torch.no_grad()
def load_unsharded(chunks: list[torch.nn.Module], full: dict[str, torch.Tensor], tp_rank: int,
                   tp_size: int, *, tied: bool = False, experts: ExpertLayout = ExpertLayout()) -> None:
    """Copy unsharded weights ``full`` into this rank's chunks; every chunk parameter must be found.

    With tied embeddings the last stage's ``output_layer.weight`` (a copy of the embedding when
    PP > 1) is taken from ``embedding.word_embeddings.weight``. ``experts``: this rank's place in the
    expert layout (MoE models with ep or etp > 1).
    """
    for chunk in chunks:
        offsets = layer_offset_map(chunk)
        first_expert = expert_offset(chunk, experts)
        for name, param in chunk.state_dict(keep_vars=True).items():
            if name.endswith("._extra_state"):
                continue
            key = to_global_name(name, offsets, first_expert)
            if key == "output_layer.weight" and tied:
                key = "embedding.word_embeddings.weight"
            if key not in full:
                raise KeyError(f"unsharded weights have no tensor for {key!r} (model parameter {name!r})")
            rank, size = experts.tp_of(key, tp_rank, tp_size)
            value = shard(key, pad_vocab(key, full[key], param.shape[0] * size), rank, size)
            if value.shape != param.shape:
                raise ValueError(f"{key}: shard shape {tuple(value.shape)} != parameter shape "
                                 f"{tuple(param.shape)}")
            param.copy_(value)
