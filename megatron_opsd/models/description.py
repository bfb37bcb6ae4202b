"""The model description: the subset of an HF ``config.json`` that defines a supported model.

Field names follow Hugging Face so that ``ModelConfig.from_hf_dict(json.load(...))`` is a rename-free
read, and ``to_hf_dict`` writes a ``config.json`` that transformers 4.x and 5.x both read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_opsd.config_io import doc

FAMILIES = {
    # model_type -> (HF architecture class name, qkv bias, qk-norm)
    "llama": ("LlamaForCausalLM", False, False),
    "mistral": ("MistralForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
    "qwen2_moe": ("Qwen2MoeForCausalLM", True, False),
    "qwen3_moe": ("Qwen3MoeForCausalLM", False, True),
    "mixtral": ("MixtralForCausalLM", False, False),
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")

# megatron-core's llama3 rope scaling hard-codes these (rotary_pos_embedding.py::_apply_scaling).
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
               "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
               "router_jitter_noise")
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


@dataclass
class ModelConfig:
    """A decoder-only Llama/Qwen2/Qwen3/Mistral model or a Qwen2-MoE/Qwen3-MoE/Mixtral mixture of
    experts, in Hugging Face field names (Mixtral's ``num_local_experts`` is read as ``num_experts``)."""

    model_type: Literal["llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"] = doc(
        "Model family (HF model_type).", default="llama")
    vocab_size: int = doc("True vocabulary size (the tokenizer's); TP padding is added on top.", default=512)
    hidden_size: int = doc("Model width.", default=64)
    intermediate_size: int = doc("SwiGLU inner width.", default=128)
    num_hidden_layers: int = doc("Number of transformer layers.", default=2)
    num_attention_heads: int = doc("Query heads.", default=4)
    num_key_value_heads: int | None = doc("KV heads (GQA); None means num_attention_heads.", default=None)
    head_dim: int | None = doc("Per-head width; None means hidden_size / num_attention_heads.", default=None)
    rms_norm_eps: float = doc("RMSNorm epsilon (Llama 1e-5, Qwen 1e-6).", default=1e-5)
    rope_theta: float = doc("RoPE base.", default=10000.0)
    rope_scaling: dict | None = doc(
        "HF rope_scaling: None, {rope_type: linear, factor} or {rope_type: llama3, factor, "
        "low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192}.", default=None)
    max_position_embeddings: int = doc("Longest sequence the model is configured for.", default=2048)
    tie_word_embeddings: bool = doc("Output layer shares the embedding matrix.", default=False)
    attention_bias: bool = doc(
        "q/k/v projection biases (Qwen2: always true; Llama's flag would also bias o_proj: refused).",
        default=False)
    mlp_bias: bool = doc("MLP biases (not supported: refused).", default=False)
    sliding_window: int | None = doc(
        "Mistral/Qwen sliding attention window; not implemented, so sequences must fit in it.", default=None)
    use_sliding_window: bool = doc("Qwen2/3: whether sliding_window is active.", default=False)
    hidden_act: str = doc("MLP activation; only silu (SwiGLU) is supported.", default="silu")
    # ---- mixture of experts (qwen2_moe, qwen3_moe, mixtral) ----
    num_experts: int | None = doc("Routed experts per MoE layer (Mixtral: num_local_experts).", default=None)
    num_experts_per_tok: int = doc("Experts each token is routed to (top-k).", default=2)
    moe_intermediate_size: int | None = doc(
        "Routed expert SwiGLU width (Mixtral: intermediate_size).", default=None)
    shared_expert_intermediate_size: int = doc(
        "Qwen2-MoE shared expert width (0: none); its output is scaled by a sigmoid gate.", default=0)
    norm_topk_prob: bool = doc(
        "Renormalise the top-k softmax probabilities to sum to 1 (Mixtral: always).", default=False)
    decoder_sparse_step: int = doc("Layer i is MoE when (i + 1) % decoder_sparse_step == 0 ...", default=1)
    mlp_only_layers: list[int] = doc("... and i is not listed here (those layers are dense).",
                                     default_factory=list)
    router_aux_loss_coef: float = doc("Load-balancing (aux) loss coefficient.", default=0.001)
    router_jitter_noise: float = doc("Mixtral router noise (not supported unless 0).", default=0.0)
    bos_token_id: int | None = doc("Begin-of-sequence id (exported to config.json).", default=None)
    eos_token_id: int | list[int] | None = doc("End-of-sequence id(s) (exported).", default=None)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}: set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: GQA needs whole query groups")
        if self.model_type in ("qwen2", "qwen2_moe"):
            self.attention_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
        if self.model_type == "mixtral":
            self.moe_intermediate_size = self.intermediate_size  # Mixtral experts use intermediate_size
            self.norm_topk_prob = True  # Mixtral renormalises its top-2 weights
        if self.is_moe:
            self.check_moe()
        self.check_supported()  # raises on the first unsupported option

    @property
    def qkv_bias(self) -> bool:
        return self.model_type in ("qwen2", "qwen2_moe")

    @property
    def qk_norm(self) -> bool:
        return self.model_type in ("qwen3", "qwen3_moe")

    @property
    def is_moe(self) -> bool:
        return self.model_type in MOE_FAMILIES

    @property
    def moe_layers(self) -> list[bool]:
        """Per layer: routed experts (True) or a dense MLP (False), by HF's rule."""
        if not self.is_moe:
            return [False] * self.num_hidden_layers
        return [i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                for i in range(self.num_hidden_layers)]

    @property
    def effective_sliding_window(self) -> int | None:
        if self.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not self.use_sliding_window:
            return None
        return self.sliding_window

    def check_moe(self) -> None:
        if not self.num_experts or self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be positive for a {self.model_type} model")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, "
                             f"num_experts={self.num_experts}]")
        if not self.moe_intermediate_size or self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
        if self.shared_expert_intermediate_size and self.model_type != "qwen2_moe":
            raise ValueError(f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} is only "
                             "read for qwen2_moe")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        if not any(self.moe_layers):
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} and mlp_only_layers="
                             f"{self.mlp_only_layers} leave no MoE layer: use the dense model type")
        if self.router_jitter_noise:
            raise ValueError(f"router_jitter_noise={self.router_jitter_noise} is not supported: megatron-core's "
                             "router has no multiplicative jitter; set it to 0")

    def check_supported(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported: only silu (SwiGLU)")
        if self.mlp_bias:
            raise ValueError("mlp_bias=True is not supported: megatron's add_bias_linear would also "
                             "bias the attention projections")
        if self.attention_bias and not self.qkv_bias:
            raise ValueError(
                f"attention_bias=True is not supported for {self.model_type}: it also biases o_proj, "
                "which megatron-core's GPTModel cannot express (only qkv bias, as in Qwen2)")
        rope = self.rope_scaling
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type"))
            if kind == "default":
                return
            if kind not in ("linear", "llama3"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (linear, llama3 are)")
            if "factor" not in rope:
                raise ValueError(f"rope_scaling={rope} needs a factor")
            if kind == "llama3":
                for key, fixed in _MEGATRON_LLAMA3_ROPE.items():
                    if float(rope.get(key, fixed)) != fixed:
                        raise ValueError(
                            f"rope_scaling.{key}={rope[key]} is not supported: megatron-core's llama3 "
                            f"scaling fixes it at {fixed}")

    def check_sequence_length(self, seq_len: int) -> None:
        window = self.effective_sliding_window
        if window is not None and seq_len > window:
            raise ValueError(
                f"sequence length {seq_len} exceeds sliding_window={window}: sliding-window attention "
                f"is not implemented; keep data.max_seq_len <= {window}")

    # ---- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        if model_type in MOE_FAMILIES and "num_local_experts" in hf:  # Mixtral; transformers 5.x for all
            kwargs["num_experts"] = hf["num_local_experts"]
        if model_type == "mixtral":
            kwargs.pop("moe_intermediate_size", None)
            kwargs.pop("norm_topk_prob", None)
        elif model_type not in MOE_FAMILIES:
            kwargs = {k: v for k, v in kwargs.items() if k not in _MOE_FIELDS}
        if model_type == "qwen2_moe" and hf.get("qkv_bias", True) is not True:
            raise ValueError(f"qkv_bias={hf['qkv_bias']} is not supported for qwen2_moe: the q/k/v biases "
                             "are part of the Qwen2 layout this converter maps")
        for name in ("shared_expert_intermediate_size", "mlp_only_layers", "decoder_sparse_step"):
            if kwargs.get(name, 0) is None:  # HF writes null for "none"
                del kwargs[name]
        # transformers 5.x writes rope_parameters; 4.x writes rope_theta / rope_scaling.
        params = hf.get("rope_parameters")
        if params:
            kwargs.setdefault("rope_theta", params.get("rope_theta", 10000.0))
            if params.get("rope_type", "default") != "default" and not hf.get("rope_scaling"):
                kwargs["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        if kwargs.get("rope_scaling") and kwargs["rope_scaling"].get(
                "rope_type", kwargs["rope_scaling"].get("type")) == "default":
            kwargs["rope_scaling"] = None
        return cls(**kwargs)

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: not a Hugging Face model directory")
        try:
            hf = json.loads(file.read_bytes().decode("utf-8"))
        except ValueError as exc:  # JSON syntax, not UTF-8
            raise ValueError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{file}: expected a JSON object, found {type(hf).__name__}")
        try:
            return cls.from_hf_dict(hf)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{file}: {exc}") from None

    def to_hf_dict(self) -> dict:
        arch, _, _ = FAMILIES[self.model_type]
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["architectures"] = [arch]
        out["torch_dtype"] = out["dtype"] = "float32"
        rope_params = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope_params.update(self.rope_scaling)
        out["rope_parameters"] = rope_params  # transformers 5.x
        if not self.rope_scaling:
            out["rope_scaling"] = None
        if self.model_type in ("qwen2", "qwen2_moe"):
            out.pop("attention_bias")
        if not self.is_moe:
            for name in _MOE_FIELDS:
                out.pop(name)
        elif self.model_type == "mixtral":
            out["num_local_experts"] = out.pop("num_experts")
            for name in ("moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                         "decoder_sparse_step", "mlp_only_layers"):
                out.pop(name)
        elif self.model_type == "qwen3_moe":
            out.pop("shared_expert_intermediate_size")
        return out
