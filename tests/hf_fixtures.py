"""Tiny random Hugging Face models, one per supported family, built locally with transformers.

Each exercises what its family adds to the name map:

- ``llama``: GQA (4 heads, 2 KV groups), llama3 rope scaling (factor 8, low 1, high 4, original 8192;
  with rope_theta 5e5 and head_dim 16 the scaled and smoothed frequencies move the logits by ~3e-2),
  vocab 250 (not divisible by 4: padded to 252 at TP=4);
- ``qwen2``: q/k/v biases, rms_norm_eps 1e-6;
- ``qwen3``: q/k RMSNorm, head_dim 32 != hidden/heads (64/4 = 16), tied embeddings, vocab 250;
- ``mistral``: a sliding window (64) longer than the sequences the tests use, untied, vocab 260.

Mixtures of experts (``qwen3_moe``, ``qwen2_moe``, ``mixtral``): 4 routed experts, top-2, expert width 48;
``qwen3_moe`` renormalises the top-k (norm_topk_prob) and has tied embeddings, ``qwen2_moe`` keeps raw
softmax weights and has a gated shared expert (width 80), ``mixtral`` always renormalises.
Router weights get a large std so that routing depends on them (a swapped expert changes the logits).

All use eager attention, fp32, 4 layers (PP=2 x VPP=2 has one layer per chunk) and a fixed seed.
Weights are drawn with a larger std than the HF default so logits spread out and a wrong mapping moves
them far beyond any tolerance. Reusable by other tests: ``save_hf_model(family, dir)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
               bos_token_id=1, eos_token_id=2)

_FAMILY = {
    # max_position_embeddings above llama3's original 8192 (transformers warns otherwise; nothing is
    # allocated per position)
    "llama": dict(vocab_size=250, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=16384,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2": dict(vocab_size=264, rms_norm_eps=1e-6, rope_theta=1000000.0),
    "qwen3": dict(vocab_size=250, rms_norm_eps=1e-6, rope_theta=1000000.0, head_dim=32,
                  tie_word_embeddings=True),
    "mistral": dict(vocab_size=260, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=64),
    "qwen3_moe": dict(vocab_size=250, rms_norm_eps=1e-6, rope_theta=1000000.0, head_dim=32,
                      tie_word_embeddings=True, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=48, norm_topk_prob=True, router_aux_loss_coef=0.01),
    "qwen2_moe": dict(vocab_size=264, rms_norm_eps=1e-6, rope_theta=1000000.0, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      norm_topk_prob=False, router_aux_loss_coef=0.01),
    "mixtral": dict(vocab_size=260, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=64,
                    intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01),
}


def hf_config(family: str, **overrides):
    """The transformers config of the tiny ``family`` model (``overrides`` replace fields)."""
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "mistral": "MistralConfig", "qwen3_moe": "Qwen3MoeConfig", "qwen2_moe": "Qwen2MoeConfig",
               "mixtral": "MixtralConfig"}
    fields = {**_COMMON, **_FAMILY[family], **overrides}
    config = getattr(transformers, classes[family])(**fields)
    config._attn_implementation = "eager"
    return config


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised ``*ForCausalLM`` (fp32, eager attention, eval mode)."""
    import transformers

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():  # norms start at 1.0: perturb them so a norm mix-up changes the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):  # routers
                param.copy_(torch.randn_like(param) * 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_hf_model(family: str, directory: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  max_shard_size: str | int | None = None, tokenizer: bool = True, **overrides) -> Path:
    """Write the tiny ``family`` model (safetensors, optionally sharded) and a tokenizer to ``directory``."""
    directory = Path(directory)
    model = build_hf_model(family, seed, **overrides).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        from tests.fixtures_tokenizers import build_qwen3_style_tokenizer

        build_qwen3_style_tokenizer(directory)
    return directory


def load_hf_model(directory: str | Path):
    """The saved model back, fp32 and eager attention (the independent reference)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32).eval()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits of ``tokens`` [B, L] (no padding, positions 0..L-1)."""
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """``model``'s parameters (or, with ``.grad`` taken first, anything keyed like its state dict) under
    the names its checkpoint files use. transformers 5.x keeps a mixture of experts' weights fused in
    memory (``experts.gate_up_proj`` [E, 2F, H] = per expert cat([gate, up]), ``experts.down_proj``
    [E, H, F]); its checkpoints hold one tensor per expert and projection (Mixtral: ``block_sparse_moe``,
    w1 = gate, w3 = up, w2 = down). Dense models: the state dict as it is."""
    return to_checkpoint_names({k: v for k, v in model.state_dict().items()}, model.config.model_type)


def to_checkpoint_names(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    mixtral = model_type == "mixtral"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out = {}
    for name, t in tensors.items():
        block = name.replace(".mlp.", ".block_sparse_moe.") if mixtral and ".mlp." in name else name
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = block[: -len("gate_up_proj")]
            for j in range(t.shape[0]):
                g, u = t[j].chunk(2, dim=0)
                out[f"{prefix}{j}.{gate}.weight"], out[f"{prefix}{j}.{up}.weight"] = g.contiguous(), u.contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = block[: -len("down_proj")]
            for j in range(t.shape[0]):
                out[f"{prefix}{j}.{down}.weight"] = t[j].contiguous()
        else:
            out[block] = t
    return out
