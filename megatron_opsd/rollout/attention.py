"""The attention kernel used while sampling: RoPE applied once as keys enter the KV cache, and SDPA.

megatron-core's static KV cache (``StaticInferenceContext``) keeps its role: it allocates the per-layer
key/value buffers and ``attention.py`` writes each forward's keys and values into them. Two things are
replaced while a rollout runs, because on this path megatron-core 0.16.1 is slow or imprecise:

* RoPE. The static cache stores keys *before* RoPE and re-applies it to every cached key at every
  decode step (``key = apply_rotary_pos_emb(key, k_pos_emb[:sequence_end])``): O(sequence length)
  elementwise work per layer per token, ~40% of a CPU decode step at a few hundred tokens. It also
  rotates by cache slot rather than ``position_ids``. (Its ``flash_decode`` alternative needs
  flash-attn's CUDA kernel; the non-flash fallback, ``apply_rotary_pos_emb_with_cos_sin``, takes the
  cosine of precomputed cosines.) Here a forward pre-hook on each ``TransformerBlock`` drops
  ``rotary_pos_emb``, and each layer's ``get_query_key_value_tensors`` returns the queries and the new
  keys already rotated at each row's own positions, before megatron writes the keys into its cache:
  cached keys are rotated exactly once, and a left-padded row is rotated exactly as if it were alone.
  The rotation is megatron's formula (``x cos + rotate_half(x) sin`` with the model's own frequency
  table, ``rotate_half(x) sin`` computed as ``roll(x) * [-sin, sin]``, which is exact), so it is
  bit-identical to the training forward's at the same positions.
* The core attention: ``torch.nn.functional.scaled_dot_product_attention`` on the cache view instead
  of the local spec's unfused baddbmm/masked-softmax/bmm with an RNG-tracker fork per layer.
* The cache layout. ``allocate_cache`` hands megatron-core buffers that are [batch, groups, seq, dim]
  in memory, as the [seq, batch, groups, dim] views it indexes (it allocates them itself only for
  layers missing from ``key_value_memory_dict``): SDPA then reads each (row, group)'s keys as one
  contiguous block instead of ``dim``-sized pieces ``batch * groups * dim`` apart. On CPU, bf16/fp16
  attention is computed in fp32 and the cache itself is fp32 (``cache_dtype``; keys and values are
  stored exactly, each new one converted once as it enters): torch's CPU flash kernel in bf16 took
  ~13 ms per layer per decode step at 384 cached tokens (batch 8, 12 heads of 64; ~3.4 ms contiguous),
  and converting a bf16 cache to fp32 at every step was most of the 22% of a bf16 rollout's CPU time
  spent in copies at the same size (torch.profiler, 32 tokens; two copies of the whole cache per
  layer); keys are still rotated in the model's dtype, as in the
  training forward.

Each layer's ``get_query_key_value_tensors`` and ``core_attention.forward`` are overridden on the instance
(and restored afterwards), so the training path never sees any of this. Supported: RoPE (plain, llama3
or linear scaling), GQA, vanilla softmax, no sliding window; checked by ``check_supported``.

Masks: the engine passes ``keep`` [b, 1, q, k] (True = attend); every query attends to at least itself,
so no softmax row is empty (SDPA would return NaN for one). Batches without padding pass None: SDPA then
runs unmasked (causal when the forward's queries are the whole sequence), which skips building and
applying a mask at every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_supported(model: torch.nn.Module) -> None:
    """Raise ValueError for model features this kernel does not implement."""
    config = model.config
    problems = []
    if getattr(model, "position_embedding_type", None) != "rope" or config.multi_latent_attention:
        problems.append(f"position_embedding_type={getattr(model, 'position_embedding_type', None)!r} "
                        "(RoPE only)")
    if config.rotary_interleaved:
        problems.append("rotary_interleaved=True")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        problems.append(f"softmax_type={config.softmax_type!r}")
    if config.apply_query_key_layer_scaling:
        problems.append("apply_query_key_layer_scaling=True")
    if getattr(config, "window_size", None) is not None:
        problems.append(f"window_size={config.window_size}")
    if problems:
        raise ValueError("the rollout engine does not support " + ", ".join(problems))


class RolloutAttention:
    """Install on ``models`` (unwrapped GPTModel chunks) for the duration of a rollout."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        for model in models:
            check_supported(model)
        self.models = models
        self._freqs_n1d: torch.Tensor | None = None
        self._cos_sb1d = self._signed_sin_sb1d = self._keep_b1qk = None
        self._handles, self._overridden = [], []

    # ---- lifecycle -------------------------------------------------------------------------------
    def install(self) -> None:
        for model in self.models:
            self._handles.append(model.decoder.register_forward_pre_hook(_drop_rotary, with_kwargs=True))
            # GPTModel's table would be dropped there: not computing it also keeps megatron from slicing
            # it for context parallelism (which needs lengths that split into 2*CP chunks; decoding does not)
            self._override(model.rotary_pos_emb, "forward", _no_table)
            for layer in model.decoder.layers:
                attention = layer.self_attention
                self._override(attention, "get_query_key_value_tensors", _bind(self._rotated_qkv, attention))
                self._override(attention.core_attention, "forward", _bind(self._attend, attention.core_attention))

    def _override(self, obj, name: str, fn) -> None:
        setattr(obj, name, fn)
        self._overridden.append((obj, name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for obj, name in self._overridden:
            delattr(obj, name)  # back to the class's method
        self._handles.clear()
        self._overridden.clear()
        self._freqs_n1d = self._cos_sb1d = self._signed_sin_sb1d = self._keep_b1qk = None

    def allocate_cache(self, context, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Fill ``context``'s static KV cache (megatron's ``key_value_memory_dict``, keyed by layer
        number) with buffers laid out [batch, groups, seq, dim], seen as [seq, batch, groups, dim], in
        ``cache_dtype(dtype, device)``."""
        dtype = cache_dtype(dtype, device)
        for model in self.models:
            for layer in model.decoder.layers:
                attention = layer.self_attention
                context.key_value_memory_dict[attention.layer_number] = tuple(
                    _cache_buffer(batch, attention.num_query_groups_per_partition, context.max_sequence_length,
                                  dim, dtype, device)
                    for dim in (attention.key_hidden_size, attention.val_hidden_size))

    def prepare(self, max_positions: int) -> None:
        """RoPE angles [max_positions, 1, d] from the model's own rotary module (scaling included)."""
        # get_emb: the whole table (megatron's forward keeps this rank's part under context parallelism)
        self._freqs_n1d = self.models[0].rotary_pos_emb.get_emb(max_positions)[:, 0]

    def set_inputs(self, positions_bs: torch.Tensor, keep_b1qk: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Per forward: each new token's position [b, s] and the attention mask (True = attend; None: every
        query attends to every earlier key, no row has padding)."""
        freqs_sb1d = self._freqs_n1d[positions_bs.t()]
        half = freqs_sb1d.shape[-1] // 2
        self._cos_sb1d = torch.cos(freqs_sb1d).to(dtype)  # as megatron's _apply_rotary_pos_emb_bshd
        sin_sb1d = torch.sin(freqs_sb1d).to(dtype)
        # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2], exactly (negation is exact)
        self._signed_sin_sb1d = torch.cat((-sin_sb1d[..., :half], sin_sb1d[..., half:]), dim=-1)
        self._keep_b1qk = keep_b1qk

    # ---- the kernel ------------------------------------------------------------------------------
    def _rotate(self, x_sbhd: torch.Tensor) -> torch.Tensor:
        rot = self._cos_sb1d.shape[-1]
        x, x_pass = (x_sbhd, None) if rot == x_sbhd.shape[-1] else (x_sbhd[..., :rot], x_sbhd[..., rot:])
        out = x * self._cos_sb1d + x.roll(rot // 2, dims=-1) * self._signed_sin_sb1d
        return out if x_pass is None else torch.cat((out, x_pass), dim=-1)

    def _rotated_qkv(self, attention, *args, **kwargs):
        """megatron's ``get_query_key_value_tensors`` with RoPE applied to the query and the new keys, before
        megatron writes them into the cache (each key is rotated once, in the model's dtype)."""
        assert kwargs.get("split_qkv", True), "megatron-core asked for the unsplit QKV tensor while sampling"
        out = type(attention).get_query_key_value_tensors(attention, *args, **kwargs)
        return (self._rotate(out[0]), self._rotate(out[1]), *out[2:])

    def _attend(self, core, query_sbhd, key_kbgd, value_kbgd, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [s, b, heads, d]; key/value [k, b, groups, d] (for cached rollouts, a view of the
        cache whose last s slots belong to this forward's tokens) -> context [s, b, heads * d]."""
        assert attention_bias is None and packed_seq_params is None
        s, b, heads, d = query_sbhd.shape
        # From the config: TE's core attention has no ``softmax_scale`` attribute (the local one does).
        scale = core.config.softmax_scale or 1.0 / math.sqrt(d)
        query_bhsd, key_bgkd, value_bgkd, gqa = sdpa_operands(
            query_sbhd, key_kbgd, value_kbgd, on_cuda=query_sbhd.is_cuda)
        if not query_sbhd.is_cuda and query_sbhd.dtype != torch.float32:  # see the module docstring
            query_bhsd, key_bgkd, value_bgkd = query_bhsd.float(), key_bgkd.float(), value_bgkd.float()
        # without a mask: causal when this forward's queries are the whole sequence, all keys for one query
        causal = self._keep_b1qk is None and s > 1
        assert not causal or s == key_kbgd.shape[0], "a maskless multi-token forward must start at slot 0"
        context_bhsd = F.scaled_dot_product_attention(query_bhsd, key_bgkd, value_bgkd, attn_mask=self._keep_b1qk,
                                                      is_causal=causal, scale=scale, enable_gqa=gqa)
        return context_bhsd.permute(2, 0, 1, 3).reshape(s, b, heads * d).to(query_sbhd.dtype)


def sdpa_operands(query_sbhd, key_kbgd, value_kbgd, *, on_cuda: bool):
    """SDPA's [b, heads, s, d] operands, and whether to ask for grouped-query attention.

    With a mask, CUDA's fused kernels (memory-efficient, cuDNN) do not take ``enable_gqa`` (flash
    does, but takes no mask): SDPA would fall back to the unfused math kernel and materialise
    [b, heads, P, P] scores at prefill. There the key/value groups are expanded to one per head
    instead (a copy of the cache view, heads / groups times its size). On CPU, ``enable_gqa`` is
    fused and copies nothing.
    """
    heads, groups = query_sbhd.shape[2], key_kbgd.shape[2]
    query, key, value = (t.permute(1, 2, 0, 3) for t in (query_sbhd, key_kbgd, value_kbgd))
    if groups == heads:
        return query, key, value, False
    if not on_cuda:
        return query, key, value, True
    return query, key.repeat_interleave(heads // groups, dim=1), value.repeat_interleave(heads // groups, dim=1), False


def cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: the model's, except fp32 for bf16/fp16 models on CPU, whose attention
    runs in fp32 (see the module docstring)."""
    return torch.float32 if device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16) else model_dtype


def _cache_buffer(batch: int, groups: int, seq: int, dim: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """An uninitialised [seq, batch, groups, dim] view of [batch, groups, seq, dim] memory."""
    return torch.empty((batch, groups, seq, dim), dtype=dtype, device=device).permute(2, 0, 1, 3)


def select_cache_rows(key_kbgd: torch.Tensor, keep_b: torch.Tensor) -> torch.Tensor:
    """Batch entries ``keep_b`` of a cache buffer (repeats allowed), in the same layout."""
    return key_kbgd.permute(1, 2, 0, 3)[keep_b].contiguous().permute(2, 0, 1, 3)


def _bind(fn, core):
    def forward(*args, **kwargs):
        return fn(core, *args, **kwargs)

    return forward


def _no_table(*args, **kwargs) -> None:
    return None


def _drop_rotary(module, args, kwargs):
    assert "rotary_pos_emb" in kwargs, "megatron-core changed how GPTModel calls its TransformerBlock"
    return args, {**kwargs, "rotary_pos_emb": None}
