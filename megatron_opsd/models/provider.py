"""Build megatron-core ``GPTModel`` chunks for the Llama, Qwen2, Qwen3 and Mistral families.

The Transformer Engine layer spec is used when TE is importable and CUDA is present; otherwise the
local spec (torch ops; its core attention is ``PackedDotProductAttention``, which also takes packed
THD micro-batches). Fusions that need CUDA kernels are turned off on CPU.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from megatron_opsd.config_io import doc
from megatron_opsd.models.description import ModelConfig
from megatron_opsd.parallel import ParallelRuntime


@dataclass
class ModelBuildConfig:
    """How to instantiate the model (independent of which model it is)."""

    dtype: Literal["fp32", "bf16", "fp16"] = doc(
        "Parameter / compute dtype (mixed precision keeps fp32 main params in the optimizer).",
        default="fp32")
    recompute: Literal["none", "full", "selective"] = doc(
        "Activation recompute: none, full (every layer, uniform) or selective (core attention).",
        default="none")
    init_method_std: float = doc("Std of the random init (when not loading weights).", default=0.02)
    init_weights: bool = doc(
        "Randomly initialise weights; off leaves them uninitialised (faster, no full-size temporaries) "
        "for callers that load every weight right after (checkpoint conversion).", default=True)
    transformer_engine: Literal["auto", "on", "off"] = doc(
        "Layer spec: auto = TE when importable and CUDA present; off = local spec.", default="auto")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def have_transformer_engine() -> bool:
    """Whether megatron-core's TE layer spec can be built here: CUDA present and megatron-core's own
    TE import succeeded (``HAVE_TE``). A TE that imports but that megatron-core cannot use (a version
    skew) is reported, not used: the TE spec would raise NameError on ``TESpecProvider``."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine
    except Exception:
        return False
    from megatron.core.models.gpt import gpt_layer_specs

    if not gpt_layer_specs.HAVE_TE:
        from importlib.metadata import version

        warnings.warn(f"Transformer Engine {getattr(transformer_engine, '__version__', '?')} is importable but "
                      f"megatron-core {version('megatron-core')} cannot use it (its TE extension failed to "
                      "import: a version mismatch); using the local layer spec", stacklevel=2)
        return False
    return True


def have_fused_softmax_kernel() -> bool:
    """megatron-core's fused masked softmax imports Apex's ``scaled_masked_softmax_cuda`` at call time,
    only for some shapes (lengths in (16, 4096], multiples of 4): enabling the fusion without the
    kernel fails intermittently, mid-run."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Pad only as tensor parallelism needs: to a multiple of tp (real vocabularies need none)."""
    return -(-vocab_size // tp) * tp


def transformer_config(model: ModelConfig, runtime: ParallelRuntime, build: ModelBuildConfig):
    """megatron-core ``TransformerConfig`` for ``model`` under ``runtime``'s layout."""
    from megatron.core.transformer import TransformerConfig

    runtime.config.check_model(model.num_hidden_layers, model.num_attention_heads,
                               model.num_key_value_heads)
    check_context_parallel(runtime.config.cp, build)
    dtype = DTYPES[build.dtype]
    on_gpu = torch.cuda.is_available()
    recompute = {}
    if build.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif build.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.intermediate_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=build.init_method_std,
        perform_initialization=build.init_weights,
        tensor_model_parallel_size=runtime.tp,
        pipeline_model_parallel_size=runtime.pp,
        context_parallel_size=runtime.config.cp,
        virtual_pipeline_model_parallel_size=runtime.vpp,
        sequence_parallel=runtime.config.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Contexts of different lengths cross pipeline stages: shapes are exchanged per message.
        # Not with interleaving: megatron-core 0.16.1 exchanges shapes with batched p2p even when
        # batch_p2p_comm is off, and with PP=2 (prev == next rank) the two shape messages to the same
        # peer pair up wrongly (deadlock or wrong shapes). Interleaved runs pad every micro-batch
        # of a step to one length instead (see engine.forward_backward).
        variable_seq_lengths=runtime.vpp is None,
        # (dense models too: the default "allgather" refuses variable lengths)
        moe_token_dispatcher_type="alltoall",
        **moe_kwargs(model, runtime, build),
        # With interleaved PP, batched p2p pairs sends/recvs wrongly when prev == next rank (PP=2):
        # silently wrong gradients (MEGATRON_NOTES.md §2). Unbatched p2p is always correct.
        batch_p2p_comm=runtime.vpp is None,
        deallocate_pipeline_outputs=True,
        # CUDA-only fusions.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=have_fused_softmax_kernel(),
        apply_rope_fusion=False,
        bias_dropout_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **recompute,
    )


def moe_kwargs(model: ModelConfig, runtime: ParallelRuntime, build: ModelBuildConfig) -> dict:
    """megatron-core's MoE settings reproducing HF's routing.

    HF routes by softmax over all experts, then top-k; with ``norm_topk_prob`` (Mixtral: always) the k
    probabilities are renormalised, which equals megatron's default (top-k of the logits, softmax over
    those k); without it they are kept as they are: megatron's ``moe_router_pre_softmax``. Dropless
    (no capacity factor), alltoall dispatcher; the aux loss is the switch-style load-balancing loss.
    """
    if not model.is_moe:
        return {}
    runtime.config.check_experts(model.num_experts, model.moe_intermediate_size)
    ep, etp = runtime.config.ep, runtime.config.etp
    shared = model.shared_expert_intermediate_size or None
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.num_experts_per_tok,
        moe_ffn_hidden_size=model.moe_intermediate_size,
        moe_layer_freq=[int(moe) for moe in model.moe_layers],
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=shared is not None,  # Qwen2-MoE: sigmoid(x @ gate) * shared(x)
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not model.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.router_aux_loss_coef,
        moe_grouped_gemm=use_transformer_engine(build),
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def use_transformer_engine(build: ModelBuildConfig) -> bool:
    use_te = build.transformer_engine == "on" or (
        build.transformer_engine == "auto" and have_transformer_engine())
    if use_te and not have_transformer_engine():
        raise ValueError("model_build.transformer_engine=on but Transformer Engine is not importable, "
                         "CUDA is absent, or megatron-core cannot use the installed TE: use auto or off")
    return use_te


def check_context_parallel(cp: int, build: ModelBuildConfig) -> None:
    """megatron-core 0.16.1 implements context parallelism only inside Transformer Engine attention
    (``TEDotProductAttention`` with a CP group); the local spec's attention asserts CP size 1."""
    if cp > 1 and not use_transformer_engine(build):
        raise ValueError(f"parallel.cp={cp} needs Transformer Engine attention on CUDA (megatron-core has "
                         "context parallelism only there) and Transformer Engine is not importable here, CUDA "
                         "is absent or model_build.transformer_engine=off: set parallel.cp: 1")


def layer_spec(model: ModelConfig, build: ModelBuildConfig, config=None, runtime: ParallelRuntime | None = None,
               vp_stage: int | None = None):
    """The decoder spec: one layer spec for dense models; for MoE models the block spec of this
    pipeline chunk (dense and MoE layers by ``moe_layer_freq``; experts are SequentialMLP on the local
    spec, TE grouped GEMM with Transformer Engine)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_opsd.models.attention import PackedDotProductAttention

    use_te = use_transformer_engine(build)
    if model.is_moe:
        spec = gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage,
            pp_rank=runtime.pp_rank)
    elif use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_norm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_norm, normalization="RMSNorm")
        spec = _replace_modules(spec, _torch_norm_class(), RMSNormSP)
    # the local attention (MoE's TE block spec has none to replace)
    return _replace_modules(spec, DotProductAttention, PackedDotProductAttention)


class RMSNormSP:
    """The local spec's norm (``torch.nn.RMSNorm``), also under sequence parallelism.

    megatron-core's ``WrappedTorchNorm`` asserts ``not config.sequence_parallel``. The norm itself is
    per token, so on a sequence shard it is exact; what SP needs is that each TP rank's weight gradient
    (from its own tokens) is summed over TP: megatron's ``finalize_model_grads`` does that for params
    marked ``sequence_parallel`` (as TE's and Apex's norms mark theirs).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNormSP: normalization={config.normalization!r}")
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _torch_norm_class():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def _replace_modules(spec, old, new):
    """``spec`` (a megatron ``ModuleSpec`` tree) with every ``old`` module class replaced by ``new``."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_replace_modules(spec.module, old, new),
                                   submodules=_replace_modules(spec.submodules, old, new))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _replace_modules(getattr(spec, f.name), old, new)
                                            for f in dataclasses.fields(spec) if f.init})
    if isinstance(spec, (list, tuple)):  # a block spec's layer_specs
        return type(spec)(_replace_modules(item, old, new) for item in spec)
    return spec


def decoder_spec(model: ModelConfig, build: ModelBuildConfig, config, runtime: ParallelRuntime,
                 vp_stage: int | None):
    """This chunk's decoder spec: MoE models' block spec as megatron builds it; dense models' local
    layer spec as a block whose final norm is ``RMSNormSP`` too."""
    spec = layer_spec(model, build, config, runtime, vp_stage)
    return spec if model.is_moe else block_spec(spec, config, vp_stage, runtime.pp_rank)


def block_spec(spec, config, vp_stage: int | None, pp_rank: int):
    """The local layer spec as a whole block whose final norm is ``RMSNormSP`` too (megatron-core
    would build its module-level default, ``WrappedTorchNorm``); other specs as they are."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if spec.submodules.input_layernorm is not RMSNormSP:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage, pp_rank),
                                      layer_norm=RMSNormSP)


def rope_kwargs(model: ModelConfig) -> dict:
    kwargs = dict(position_embedding_type="rope", rotary_base=int(model.rope_theta))
    if model.rope_theta != int(model.rope_theta):
        raise ValueError(f"rope_theta={model.rope_theta} must be an integer for megatron-core")
    scaling = model.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    elif kind == "linear":
        kwargs.update(seq_len_interpolation_factor=float(scaling["factor"]))
    return kwargs


def build_model(model: ModelConfig, runtime: ParallelRuntime,
                build: ModelBuildConfig | None = None) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), on ``runtime.device``.

    Weights are randomly initialised; load real ones with ``megatron_opsd.checkpoint``.
    """
    from megatron.core.models.gpt import GPTModel

    build = build or ModelBuildConfig()
    config = transformer_config(model, runtime, build)
    vocab = padded_vocab_size(model.vocab_size, runtime.tp)
    num_chunks = runtime.vpp or 1
    chunks = []
    for vp_stage in range(num_chunks):
        pre = runtime.is_first_stage and vp_stage == 0
        post = runtime.is_last_stage and vp_stage == num_chunks - 1
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=decoder_spec(model, build, config, runtime, vp_stage if runtime.vpp else None),
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,  # logits stay vocab-sharded: [s, b, V/tp]
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            pg_collection=runtime.pg_collection,
            vp_stage=vp_stage if runtime.vpp else None,
            **rope_kwargs(model),
        )
        chunk.to(runtime.device)
        chunks.append(chunk)
    if build.init_weights:
        init_random_weights(chunks, model, runtime, build.init_method_std)
    return chunks


# The weights megatron-core initialises randomly (everything else is ones or zeros), and their std.
_RANDOM_WEIGHTS = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_fc1.weight",
                   "linear_proj.weight", "linear_fc2.weight", "router.weight", "shared_experts.gate_weight")
_SCALED_WEIGHTS = ("linear_proj.weight", "linear_fc2.weight")  # megatron: std / sqrt(2 * num_layers)


@torch.no_grad()
def init_random_weights(chunks: list[torch.nn.Module], model: ModelConfig, runtime: ParallelRuntime,
                        std: float) -> None:
    """Random initial weights that do not depend on the parallel layout.

    megatron-core draws each rank's shard from its own generator state: the CUDA RNG tracker's seed
    depends on the TP rank, and nothing offsets it by pipeline stage, so on GPUs every stage would
    start with identical layers and no layout would reproduce another's start. Here each random
    weight is drawn whole (unsharded, unpadded vocabulary) from a CPU generator seeded by (seed, global
    parameter name), and this rank keeps its shard: the same code on CPU and GPU, and TP/PP/VPP runs
    start from exactly the TP1/PP1 weights. Distributions are megatron-core's (normal(0, std), output
    projections of each layer std / sqrt(2 * layers)); norms and biases keep their constant init.
    """
    from megatron_opsd.models.sharding import (ExpertLayout, expert_offset, layer_offset_map, pad_vocab, shard,
                                               to_global_name, unshard)

    experts = ExpertLayout.of(runtime)
    for chunk in chunks:
        offsets = layer_offset_map(chunk)
        first_expert = expert_offset(chunk, experts)
        for name, param in chunk.state_dict(keep_vars=True).items():
            if not name.endswith(_RANDOM_WEIGHTS):
                continue
            key = to_global_name(name, offsets, first_expert)
            tp_rank, tp = experts.tp_of(key, runtime.tp_rank, runtime.tp)
            if key == "output_layer.weight" and model.tie_word_embeddings:
                key = "embedding.word_embeddings.weight"  # PP > 1: the last stage's copy of the embedding
            shape = list(unshard(key, [param.detach().to("meta")] * tp).shape)
            if key.endswith(("word_embeddings.weight", "output_layer.weight")):
                shape[0] = model.vocab_size  # padding rows stay zero, whatever TP pads to
            digest = hashlib.sha256(f"{runtime.seed}:{key}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            scale = std / math.sqrt(2 * model.num_hidden_layers) if key.endswith(_SCALED_WEIGHTS) else std
            full = torch.empty(shape).normal_(0.0, scale, generator=generator)
            full = pad_vocab(key, full, param.shape[0] * tp)
            param.copy_(shard(key, full, tp_rank, tp))
