"""Hugging Face <-> megatron-core GPTModel weight names: a declarative table plus pure split/merge.

Megatron side: the *unsharded* layout of ``megatron_opsd.models.sharding`` (one TP=1/PP=1 GPTModel,
local-spec names, global layer index), e.g. ``decoder.layers.3.self_attention.linear_qkv.weight``.
``sharding.load_unsharded`` / ``sharding.shard`` take it from there to any TP/PP layout.

The table (``GLOBAL_RULES``, ``LAYER_RULES``) says which HF tensors make up which megatron tensor. Three
rules are not renames:

- q/k/v projections (and Qwen2's q/k/v biases) -> ``linear_qkv``, laid out per KV group: for each group
  g, its nh/ng query heads, then its k head, then its v head (``merge_qkv`` / ``split_qkv``).
- gate/up projections -> ``linear_fc1`` = cat([gate, up]) (``merge_fc1`` / ``split_fc1``), also for
  every routed expert and the shared expert of a mixture of experts (``moe_rules``).
- vocabulary rows: megatron pads embedding/output rows to a multiple of TP; padded rows are dropped on
  export (``unsharded_to_hf``). Import yields exactly V rows (``sharding.pad_vocab`` pads per layout).

Tied embeddings: megatron's TP=1/PP=1 model has no ``output_layer.weight``; an HF ``lm_head.weight``
of a tied model must equal ``embed_tokens`` (checked) and is not exported.

Both directions stream: ``hf_to_unsharded`` yields a megatron tensor as soon as all its HF inputs have
arrived and keeps nothing else. Unknown, duplicate, missing and mis-shaped tensors raise
``ConversionError`` naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

import torch

from megatron_opsd.models.description import ModelConfig

Tensors = Iterable[tuple[str, torch.Tensor]]


class ConversionError(ValueError):
    """A tensor is unknown, duplicated, missing or mis-shaped (the message names it)."""


# ---- pure split/merge functions ----------------------------------------------------------------
def _heads(cfg: ModelConfig) -> tuple[int, int, int]:
    return cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q [nh*d, ...], k [ng*d, ...], v [ng*d, ...] -> megatron linear_qkv [(nh + 2ng)*d, ...].

    Per KV group g: its nh/ng query heads, then k_g, then v_g. Works for weights ([..., H]) and biases.
    """
    nh, ng, d = _heads(cfg)
    rest = q.shape[1:]
    q_g = q.reshape(ng, (nh // ng) * d, *rest)
    k_g = k.reshape(ng, d, *rest)
    v_g = v.reshape(ng, d, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape((nh + 2 * ng) * d, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``merge_qkv``: (q, k, v) as contiguous tensors."""
    nh, ng, d = _heads(cfg)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, (nh // ng + 2) * d, *rest)
    q, k, v = grouped.split([(nh // ng) * d, d, d], dim=1)
    return q.reshape(nh * d, *rest), k.reshape(ng * d, *rest), v.reshape(ng * d, *rest)


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate_proj, up_proj [F, H] -> megatron linear_fc1 [2F, H] (SwiGLU: gate first)."""
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``merge_fc1``: (gate, up)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


# ---- the declarative table -----------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """HF tensors ``hf`` (in merge order) make megatron tensor ``megatron``.

    ``merge``/``split`` convert between them when there is more than one HF tensor; ``when`` selects
    the rule by model options; ``shapes`` gives the HF shapes for ``cfg`` (validated on import).
    """

    hf: tuple[str, ...]
    megatron: str
    shapes: Callable[[ModelConfig], tuple[tuple[int, ...], ...]]
    merge: Callable[[list[torch.Tensor], ModelConfig], torch.Tensor] | None = None
    split: Callable[[torch.Tensor, ModelConfig], tuple[torch.Tensor, ...]] | None = None
    when: Callable[[ModelConfig], bool] = lambda cfg: True


# The lambdas look merge_qkv & co. up at call time (so a test can monkeypatch a broken mapping).
_QKV = dict(merge=lambda parts, cfg: merge_qkv(*parts, cfg), split=lambda t, cfg: split_qkv(t, cfg))
_FC1 = dict(merge=lambda parts, cfg: merge_fc1(*parts), split=lambda t, cfg: split_fc1(t))


def _q(cfg):
    return cfg.num_attention_heads * cfg.head_dim


def _kv(cfg):
    return cfg.num_key_value_heads * cfg.head_dim


GLOBAL_RULES: tuple[Rule, ...] = (
    Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight",
         lambda c: ((c.vocab_size, c.hidden_size),)),
    Rule(("model.norm.weight",), "decoder.final_layernorm.weight", lambda c: ((c.hidden_size,),)),
    Rule(("lm_head.weight",), "output_layer.weight", lambda c: ((c.vocab_size, c.hidden_size),),
         when=lambda c: not c.tie_word_embeddings),
)

# Names relative to ``model.layers.{i}.`` (HF) and ``decoder.layers.{i}.`` (megatron).
LAYER_RULES: tuple[Rule, ...] = (
    Rule(("input_layernorm.weight",), "input_layernorm.weight", lambda c: ((c.hidden_size,),)),
    Rule(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
         "self_attention.linear_qkv.weight",
         lambda c: ((_q(c), c.hidden_size), (_kv(c), c.hidden_size), (_kv(c), c.hidden_size)), **_QKV),
    Rule(("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
         "self_attention.linear_qkv.bias", lambda c: ((_q(c),), (_kv(c),), (_kv(c),)),
         when=lambda c: c.qkv_bias, **_QKV),
    Rule(("self_attn.q_norm.weight",), "self_attention.q_layernorm.weight", lambda c: ((c.head_dim,),),
         when=lambda c: c.qk_norm),
    Rule(("self_attn.k_norm.weight",), "self_attention.k_layernorm.weight", lambda c: ((c.head_dim,),),
         when=lambda c: c.qk_norm),
    Rule(("self_attn.o_proj.weight",), "self_attention.linear_proj.weight",
         lambda c: ((c.hidden_size, _q(c)),)),
    Rule(("post_attention_layernorm.weight",), "pre_mlp_layernorm.weight", lambda c: ((c.hidden_size,),)),
)
# The MLP of a dense layer (dense models, and the dense layers of a mixture of experts).
DENSE_MLP_RULES: tuple[Rule, ...] = (
    Rule(("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.linear_fc1.weight",
         lambda c: ((c.intermediate_size, c.hidden_size),) * 2, **_FC1),
    Rule(("mlp.down_proj.weight",), "mlp.linear_fc2.weight", lambda c: ((c.hidden_size, c.intermediate_size),)),
)


def _expert_shapes(c):
    return ((c.moe_intermediate_size, c.hidden_size),) * 2


def moe_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    """The MLP of an MoE layer: router, every routed expert (``{j}``: global expert index; megatron's
    SequentialMLP names them ``local_experts.{j}`` at EP=1) and Qwen2-MoE's gated shared expert.
    Mixtral's checkpoints name the block ``block_sparse_moe`` and the projections w1 (gate), w3 (up),
    w2 (down)."""
    block, (gate, up, down) = (("block_sparse_moe", ("w1", "w3", "w2")) if cfg.model_type == "mixtral"
                               else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    rules = [Rule((f"{block}.gate.weight",), "mlp.router.weight", lambda c: ((c.num_experts, c.hidden_size),))]
    for j in range(cfg.num_experts):
        expert, local = f"{block}.experts.{j}", f"mlp.experts.local_experts.{j}"
        rules += [Rule((f"{expert}.{gate}.weight", f"{expert}.{up}.weight"), f"{local}.linear_fc1.weight",
                       _expert_shapes, **_FC1),
                  Rule((f"{expert}.{down}.weight",), f"{local}.linear_fc2.weight",
                       lambda c: ((c.hidden_size, c.moe_intermediate_size),))]
    if cfg.shared_expert_intermediate_size:
        shared = lambda c: ((c.shared_expert_intermediate_size, c.hidden_size),)  # noqa: E731
        rules += [Rule(("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
                       "mlp.shared_experts.linear_fc1.weight", lambda c: shared(c) * 2, **_FC1),
                  Rule(("mlp.shared_expert.down_proj.weight",), "mlp.shared_experts.linear_fc2.weight",
                       lambda c: ((c.hidden_size, c.shared_expert_intermediate_size),)),
                  Rule(("mlp.shared_expert_gate.weight",), "mlp.shared_experts.gate_weight",
                       lambda c: ((1, c.hidden_size),))]
    return tuple(rules)

# HF buffers some older checkpoints carry; recomputed from the config, never weights.
HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# megatron-side entries that are not weights (Transformer Engine / fp8 metadata, None on the local spec).
MEGATRON_IGNORED = re.compile(r"\._extra_state$")

VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class _Entry:
    """One concrete (layer-expanded) rule."""

    rule: Rule
    hf: tuple[str, ...]
    megatron: str
    hf_shapes: tuple[tuple[int, ...], ...]


def expand_rules(cfg: ModelConfig) -> list[_Entry]:
    """The table instantiated for every layer of ``cfg`` (only the rules that apply to it)."""
    entries = [_Entry(r, r.hf, r.megatron, r.shapes(cfg)) for r in GLOBAL_RULES if r.when(cfg)]
    moe = moe_rules(cfg) if cfg.is_moe else ()
    for i, is_moe in enumerate(cfg.moe_layers):
        for r in LAYER_RULES + (moe if is_moe else DENSE_MLP_RULES):
            if r.when(cfg):
                entries.append(_Entry(r, tuple(f"model.layers.{i}.{n}" for n in r.hf),
                                      f"decoder.layers.{i}.{r.megatron}", r.shapes(cfg)))
    return entries


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name ``cfg`` needs, with its shape (tied models: no ``lm_head.weight``)."""
    return {n: s for e in expand_rules(cfg) for n, s in zip(e.hf, e.hf_shapes)}


def megatron_shapes(cfg: ModelConfig, padded_vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every unsharded megatron tensor name of ``cfg`` with its shape (vocab rows padded if given)."""
    out = {}
    for e in expand_rules(cfg):
        merged = tuple(e.hf_shapes[0])
        if len(e.hf) > 1:
            merged = (sum(s[0] for s in e.hf_shapes), *merged[1:])
        if e.megatron in VOCAB_TENSORS and padded_vocab_size is not None:
            merged = (padded_vocab_size, *merged[1:])
        out[e.megatron] = merged
    return out


# ---- streaming conversion ------------------------------------------------------------------------
def hf_to_unsharded(hf_tensors: Tensors, cfg: ModelConfig, *,
                    names: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF ``(name, tensor)`` pairs into unsharded megatron ``(name, tensor)`` pairs.

    A renamed tensor is yielded at once; a fused one (qkv, fc1) as soon as its last part arrives.
    Vocabulary tensors keep their V rows (pad per layout with ``sharding.pad_vocab``). Dtypes pass
    through unchanged. ``names``, when the caller knows every HF name up front (safetensors headers),
    is checked before anything is read, and lets a tied model's embedding be released early.

    Raises ``ConversionError`` naming the tensor for unknown, duplicate, missing or mis-shaped ones.
    """
    entries = expand_rules(cfg)
    by_hf = {n: (e, i) for e in entries for i, n in enumerate(e.hf)}
    tied_head = "lm_head.weight" if cfg.tie_word_embeddings else None
    if names is not None:
        _check_names(set(names), by_hf, tied_head)
        expect_head = tied_head in names if tied_head else False
    else:
        expect_head = bool(tied_head)  # unknown: keep the embedding until the end to check lm_head
    pending: dict[str, dict[int, torch.Tensor]] = {}
    seen: set[str] = set()
    embedding: torch.Tensor | None = None  # tied models only, to check an lm_head arriving later
    head: torch.Tensor | None = None

    for name, tensor in hf_tensors:
        if name in seen:
            raise ConversionError(f"HF tensor {name!r} appears twice")
        seen.add(name)
        if HF_IGNORED.match(name):
            continue
        if name == tied_head:
            _check_shape(name, tensor, (cfg.vocab_size, cfg.hidden_size))
            if embedding is not None:
                _check_tied(tensor, embedding)
                embedding = None
            else:
                head = tensor
            continue
        if name not in by_hf:
            raise ConversionError(_unknown_message(name, cfg))
        entry, index = by_hf[name]
        _check_shape(name, tensor, entry.hf_shapes[index])
        if name == "model.embed_tokens.weight" and tied_head:
            if head is not None:
                _check_tied(head, tensor)
                head = None
            elif expect_head:
                embedding = tensor
        if len(entry.hf) == 1:
            yield entry.megatron, tensor
            continue
        parts = pending.setdefault(entry.megatron, {})
        parts[index] = tensor
        if len(parts) == len(entry.hf):
            del pending[entry.megatron]
            yield entry.megatron, entry.rule.merge([parts[i] for i in range(len(entry.hf))], cfg)

    missing = [n for n in by_hf if n not in seen]
    if missing:
        raise ConversionError(f"HF checkpoint is missing {len(missing)} tensor(s) for this "
                              f"{cfg.model_type} config: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    assert not pending, f"internal: unmerged parts {sorted(pending)}"


def unsharded_to_hf(megatron_tensors: Tensors, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream unsharded megatron ``(name, tensor)`` pairs into HF ``(name, tensor)`` pairs.

    Padded vocabulary rows (beyond ``cfg.vocab_size``) are dropped. A tied model must not carry
    ``output_layer.weight``; its HF export has no ``lm_head.weight``. Raises ``ConversionError``
    naming the tensor for unknown, duplicate, missing or mis-shaped ones.
    """
    entries = {e.megatron: e for e in expand_rules(cfg)}
    expected = megatron_shapes(cfg)
    seen: set[str] = set()
    for name, tensor in megatron_tensors:
        if MEGATRON_IGNORED.search(name):
            continue
        if name in seen:
            raise ConversionError(f"megatron tensor {name!r} appears twice")
        seen.add(name)
        if name not in entries:
            if name == "output_layer.weight":
                raise ConversionError(f"megatron tensor {name!r} in a model with tie_word_embeddings=True: "
                                      "a tied model has no separate output layer")
            raise ConversionError(f"unknown megatron tensor {name!r} for this {cfg.model_type} config")
        entry, shape = entries[name], expected[name]
        if name in VOCAB_TENSORS:
            if tensor.ndim == 2 and tensor.shape[0] >= cfg.vocab_size:
                tensor = tensor[:cfg.vocab_size]  # drop TP padding rows
        _check_shape(name, tensor, shape)
        if len(entry.hf) == 1:
            yield entry.hf[0], tensor
        else:
            yield from zip(entry.hf, entry.rule.split(tensor, cfg))
    missing = [n for n in entries if n not in seen]
    if missing:
        raise ConversionError(f"megatron checkpoint is missing {len(missing)} tensor(s): "
                              f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                              "for this config")


def _check_tied(head: torch.Tensor, embedding: torch.Tensor) -> None:
    if not torch.equal(head, embedding):
        raise ConversionError("'lm_head.weight' differs from 'model.embed_tokens.weight' but the config "
                              "says tie_word_embeddings=True")


def _check_names(names: set[str], by_hf: dict, tied_head: str | None) -> None:
    unknown = sorted(n for n in names if n not in by_hf and n != tied_head and not HF_IGNORED.match(n))
    if unknown:
        raise ConversionError(f"unknown HF tensor(s): {unknown[:8]}")
    missing = [n for n in by_hf if n not in names]
    if missing:
        raise ConversionError(f"HF checkpoint is missing {len(missing)} tensor(s): {missing[:8]}")


def _unknown_message(name: str, cfg: ModelConfig) -> str:
    match = re.match(r"^model\.layers\.(\d+)\.", name)
    if match and int(match.group(1)) >= cfg.num_hidden_layers:
        return (f"HF tensor {name!r} is for layer {match.group(1)} but num_hidden_layers="
                f"{cfg.num_hidden_layers}")
    return f"unknown HF tensor {name!r} for a {cfg.model_type} model (no rule in hf_mapping)"
