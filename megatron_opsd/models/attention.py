"""The local spec's core attention, with packed (THD) micro-batches attended pair by pair.

megatron-core's local ``DotProductAttention`` refuses ``PackedSeqParams``: a packed row could only be
attended as one long sequence under a block-diagonal mask, computing (and storing for backward) every
score of the row, most of them masked, so packing n pairs would cost attention work of the square of
their total length instead of the sum of their squares. ``PackedDotProductAttention`` takes megatron's
THD path instead, as Transformer Engine's attention does on GPU: megatron's ``Attention`` squeezes the
batch dimension and rotates each sequence from position 0 by ``cu_seqlens`` itself, and this module
runs causal ``scaled_dot_product_attention`` on each sequence's own [n, heads, d] block (a fused
kernel on CPU and CUDA: the scores are never stored for backward).

Padded micro-batches (a boolean [b, 1, sq, sk] mask, True = masked, megatron's convention) that
autograd will differentiate go to the same fused SDPA with that mask, each query also allowed its own
key so that no row is empty (a padded query's output is never read; a real query attends to itself
under any causal mask anyway): megatron's unfused path keeps the fp32 [b, heads, sq, sk]
probabilities for backward: 82 against 17 MiB allocated at peak and 72 against 53 ms for a layer's
forward + backward at b=8, 384 tokens, 4 heads (fp32, one CPU thread, ``python benchmarks/cpu_kernels.py``).
Without autograd (evaluation, ``tools/verify_conversion.py``) nothing is stored and megatron's path
stays, bit for bit the same as HF's eager attention at TP1; the training step's teacher forward, for
which megatron's path would still materialise fp32 [b, heads, sq, sk] scores and probabilities for the
whole micro-batch (50 MiB each, by count, at b=8, 640 tokens, 4 heads), asks for SDPA with
``fused_attention_without_grad()`` (and so scores with the same kernel as the student). Attention
dropout, query-key layer scaling, softmax offsets, windows, biases or a non-boolean mask keep
megatron's ``DotProductAttention`` too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

_fused_without_grad = False  # see fused_attention_without_grad


@contextlib.contextmanager
def fused_attention_without_grad() -> Iterator[None]:
    """Padded micro-batches go to fused SDPA under no_grad too (the teacher forward of a training step)."""
    global _fused_without_grad
    was, _fused_without_grad = _fused_without_grad, True
    try:
        yield
    finally:
        _fused_without_grad = was


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also takes THD ``PackedSeqParams`` (see the module docstring)."""

    supports_packed_sequences = True

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            if not self._fused_padded(attention_mask, attention_bias):
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias)
            # query [sq, b, heads, d], key/value [sk, b, groups, d] -> [b, heads or groups, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            sq, sk = q.shape[2], k.shape[2]
            slots = torch.arange(sk, device=q.device)
            keep = ~attention_mask | (slots[None, :] == slots[sk - sq:, None])  # and each query's own key
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.softmax_scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            return out.permute(2, 0, 1, 3).reshape(sq, out.shape[0], self.hidden_size_per_partition)
        if packed_seq_params.qkv_format != "thd" or attention_bias is not None or attention_mask is not None:
            raise ValueError("packed attention takes THD PackedSeqParams without a mask or bias")
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
            raise ValueError("packed attention supports the vanilla softmax without a window")
        # query [t, heads, d], key/value [t, groups, d] (megatron squeezed the batch of one)
        cu_seqlens = packed_seq_params.cu_seqlens_q.tolist()
        if packed_seq_params.cu_seqlens_kv.tolist() != cu_seqlens:
            raise ValueError("packed attention needs the same sequences for queries and keys")
        if self.training and self.attention_dropout.p > 0:
            raise ValueError("packed attention has no attention dropout (attention_dropout must be 0)")
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        blocks = []
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))  # [1, h, n, d]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
            blocks.append(out[0].transpose(0, 1))  # [n, heads, d]
        context = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        return context.reshape(context.shape[0], self.hidden_size_per_partition)

    def _fused_padded(self, attention_mask, attention_bias) -> bool:
        """Whether a padded micro-batch can go to SDPA (see the module docstring)."""
        return ((torch.is_grad_enabled() or _fused_without_grad) and attention_mask is not None
                and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                and attention_bias is None and self.softmax_offset is None
                and self.scale_mask_softmax.window_size is None and not self.config.apply_query_key_layer_scaling
                and not (self.training and self.attention_dropout.p > 0))
