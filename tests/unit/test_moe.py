"""Mixtures of experts in one process: the model description of Qwen3-MoE / Qwen2-MoE / Mixtral HF configs,
its mapping onto megatron-core's MoE settings, refusals, and TP1 logits against transformers (the HF
models are built locally: tests/hf_fixtures.py). Multi-process layouts (EP, ETP) are in tests/distributed.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opsd.models.description import ModelConfig
from megatron_opsd.parallel import ParallelConfig
from tests.hf_fixtures import MOE_FAMILIES, build_hf_model, hf_config

# fp32, same weights; routing is the same up to the order of softmax and top-k (measured ~2e-6)
ATOL = 2e-5


def moe_cfg(family: str, **overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict(hf_config(family, **overrides).to_dict())


# ---- description -------------------------------------------------------------------------------
def test_hf_configs_read_as_moe():
    q3, q2, mx = (moe_cfg(f) for f in ("qwen3_moe", "qwen2_moe", "mixtral"))
    assert (q3.num_experts, q3.num_experts_per_tok, q3.moe_intermediate_size, q3.norm_topk_prob) == (4, 2, 48, True)
    assert q3.qk_norm and not q3.qkv_bias and q3.shared_expert_intermediate_size == 0
    assert q2.qkv_bias and q2.shared_expert_intermediate_size == 80 and not q2.norm_topk_prob
    # Mixtral: experts use intermediate_size, num_local_experts, always renormalised
    assert (mx.num_experts, mx.moe_intermediate_size, mx.norm_topk_prob) == (4, 48, True)
    assert q3.router_aux_loss_coef == 0.01


@pytest.mark.parametrize("step, only, expected", [
    (1, [], [True] * 4), (2, [], [False, True, False, True]), (1, [0, 3], [False, True, True, False])])
def test_moe_layers_follow_hf_rule(step, only, expected):
    """HF: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    cfg = moe_cfg("qwen3_moe", decoder_sparse_step=step, mlp_only_layers=only)
    assert cfg.moe_layers == expected
    model = build_hf_model("qwen3_moe", decoder_sparse_step=step, mlp_only_layers=only)
    hf_sparse = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in model.model.layers]
    assert hf_sparse == expected


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hf_dict_round_trip(family):
    import transformers

    cfg = moe_cfg(family, decoder_sparse_step=1, mlp_only_layers=[2]) if family != "mixtral" else moe_cfg(family)
    out = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(out) == cfg
    back = transformers.AutoConfig.for_model(**out)
    assert back.num_experts_per_tok == cfg.num_experts_per_tok
    assert getattr(back, "num_local_experts", getattr(back, "num_experts", None)) == cfg.num_experts


@pytest.mark.parametrize("family, overrides, message", [
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise=0.1 is not supported"),
    ("qwen3_moe", dict(num_experts_per_tok=5), r"num_experts_per_tok=5 must be in \[1, num_experts=4\]"),
    ("qwen3_moe", dict(decoder_sparse_step=8), "leave no MoE layer"),
    ("qwen2_moe", dict(qkv_bias=False), "qkv_bias=False is not supported for qwen2_moe"),
])
def test_unsupported_moe_options_are_named(family, overrides, message):
    with pytest.raises(ValueError, match=message):
        moe_cfg(family, **overrides)


def test_expert_layout_sizes_are_checked():
    ParallelConfig(tp=2, ep=2).check_world_size(4)
    with pytest.raises(ValueError, match=r"parallel.etp \* parallel.ep \* parallel.pp = 1 \* 4 \* 1"):
        ParallelConfig(ep=4, etp=1).check_world_size(2)
    with pytest.raises(ValueError, match="parallel.ep=0 must be >= 1"):
        ParallelConfig(ep=0)
    assert ParallelConfig(tp=2).etp == 2  # megatron's default: experts split like the dense layers


# ---- megatron-core settings --------------------------------------------------------------------
@pytest.mark.parametrize("family, pre_softmax, shared", [
    ("qwen3_moe", False, None), ("qwen2_moe", True, 80), ("mixtral", False, None)])
def test_transformer_config_maps_routing(runtime, family, pre_softmax, shared):
    """norm_topk_prob (renormalised top-k of the softmax) is megatron's default top-k-then-softmax;
    without it the raw softmax probabilities: moe_router_pre_softmax."""
    from megatron_opsd.models.provider import ModelBuildConfig, transformer_config

    cfg = moe_cfg(family)
    tc = transformer_config(cfg, runtime, ModelBuildConfig())
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 48)
    assert tc.moe_router_pre_softmax is pre_softmax and tc.moe_router_score_function == "softmax"
    assert tc.moe_shared_expert_intermediate_size == shared and tc.moe_shared_expert_gate is (shared is not None)
    assert tc.moe_aux_loss_coeff == 0.01 and tc.moe_token_dispatcher_type == "alltoall"
    assert tc.moe_expert_capacity_factor is None  # dropless, as HF
    assert not tc.moe_grouped_gemm  # no TE here: SequentialMLP


def test_experts_must_divide_by_ep(runtime):
    from megatron_opsd.models.provider import ModelBuildConfig, moe_kwargs

    class Layout:  # moe_kwargs reads only runtime.config
        config = ParallelConfig(ep=3)

    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by parallel.ep=3: choose parallel.ep "
                                         r"among \[1, 2, 4\]"):
        moe_kwargs(moe_cfg("qwen3_moe"), Layout(), ModelBuildConfig())


# ---- TP1 logits vs transformers ----------------------------------------------------------------
def _tp1_logits(runtime, cfg: ModelConfig, hf_model, tokens, swap_experts: bool = False):
    from megatron_opsd.models.hf_mapping import hf_to_unsharded
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.models.sharding import load_unsharded
    from tests.distributed.workers.common import causal_inputs

    tensors = _checkpoint_tensors(hf_model)
    full = dict(hf_to_unsharded(tensors.items(), cfg, names=set(tensors)))
    if swap_experts:  # expert 0 <-> 1 of layer 0 (the router still points at the old places)
        a, b = (f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc1.weight" for j in (0, 1))
        full[a], full[b] = full[b], full[a]
    [model] = build_model(cfg, runtime)
    load_unsharded([model], full, 0, 1, tied=cfg.tie_word_embeddings)
    pos, mask = causal_inputs(tokens)
    with torch.no_grad():
        return model(tokens, pos, mask)[..., :cfg.vocab_size]


def _checkpoint_tensors(hf_model) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint (safetensors) names, as transformers saves them."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="moe-") as d:
        hf_model.save_pretrained(d)
        return load_file(f"{d}/model.safetensors")


@pytest.mark.parametrize("family, overrides", [
    ("qwen3_moe", {}), ("qwen3_moe", dict(mlp_only_layers=[1], decoder_sparse_step=1)),
    ("qwen2_moe", {}), ("qwen2_moe", dict(decoder_sparse_step=2)), ("mixtral", {})])
def test_tp1_logits_match_transformers(runtime, family, overrides):
    hf_model = build_hf_model(family, **overrides)
    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = hf_model(input_ids=tokens, use_cache=False).logits
    ours = _tp1_logits(runtime, cfg, hf_model, tokens)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    if not overrides:  # the check can fail: a swapped expert moves the logits far beyond ATOL
        swapped = _tp1_logits(runtime, cfg, hf_model, tokens, swap_experts=True)
        assert (swapped - reference).abs().max() > 100 * ATOL


@pytest.mark.parametrize("parallel, message", [
    (dict(tp=2), "parallel.tp=2 with a mixture of experts needs parallel.sequence_parallel=true"),
    (dict(ep=3), r"num_experts=4 is not divisible by parallel.ep=3"),
])
def test_training_config_refuses_unsupported_expert_layouts(parallel, message):
    from megatron_opsd.config import JobConfig

    cfg = moe_cfg("qwen3_moe", max_position_embeddings=4096)
    JobConfig(model=cfg, parallel=ParallelConfig(ep=2))  # fine
    with pytest.raises(ValueError, match=message):
        JobConfig(model=cfg, parallel=ParallelConfig(**parallel))
