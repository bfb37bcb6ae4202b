"""TEST ONLY: a context-parallel core attention, so context parallelism can be tested on CPU.

megatron-core 0.16.1 has context parallelism (CP) only inside Transformer Engine attention (CUDA); the
local spec's ``DotProductAttention`` asserts CP size 1, and megatron_opsd refuses ``parallel.cp > 1``
without TE. What the package itself does under CP (the load-balanced split of each context, the
response-row selection over CP, the per-rank loss shares and their normalisation) does not depend on
how attention exchanges keys and values, so the tests swap in this plain reference for TE's ring
attention (``use_cp_test_attention``):

* keys and values are all-gathered over the CP group (autograd: backward sums the gradient over CP,
  every rank's queries having read every rank's keys, and keeps this rank's part; gloo has no
  reduce_scatter), then reordered from rank order into global order (rank r holds chunks r and
  2*CP-1-r of 2*CP: derived here independently of ``megatron_opsd.data.batch``);
* the attention mask's rows are this rank's queries over all keys ([B, 1, L/CP, L], as
  ``split_for_context_parallel`` slices it, causal + key padding by global positions);
* softmax in fp32 at megatron's scale, GQA by repeating key/value groups as megatron does.

megatron's ``get_pos_emb_on_this_cp_rank`` (RoPE table slicing) places an index tensor with
``pin_memory=True``, which CPU-only torch refuses; the same slicing without pinning replaces it here.
Never used outside tests.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class _AllGatherOverCP(torch.autograd.Function):
    """[s, ...] on each rank -> [CP * s, ...] in rank order; backward: the gradient summed over CP, this
    rank's rows kept. Per call: 1 all-gather forward, 1 all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        size = grad.shape[0] // ctx.group.size()
        rank = ctx.group.rank()
        return grad[rank * size:(rank + 1) * size], None


def global_order(length: int, cp: int) -> torch.Tensor:
    """Indices that reorder the rank-order concatenation of every rank's positions into 0 .. length-1."""
    chunk = length // (2 * cp)
    held = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]  # chunk ids in gathered (rank) order
    return torch.cat([torch.arange(chunk) + held.index(c) * chunk for c in range(2 * cp)])


class AllGatherCPAttention(torch.nn.Module):
    """Drop-in for the local spec's core attention (``PackedDotProductAttention``, i.e. megatron's
    ``DotProductAttention``: same constructor and forward arguments; packed rows are refused under CP)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.config = config
        self.cp_group = pg_collection.cp
        tp = pg_collection.tp.size()
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = config.num_query_groups // tp
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None and attention_mask is not None
        cp = self.cp_group.size()
        if cp > 1:
            order = global_order(key.shape[0] * cp, cp).to(key.device)
            key = _AllGatherOverCP.apply(key, self.cp_group)[order]
            value = _AllGatherOverCP.apply(value, self.cp_group)[order]
        sq, b = query.shape[:2]
        repeat = self.num_heads // self.num_groups
        q_bnsd = query.permute(1, 2, 0, 3)
        k_bnld = key.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)
        v_bnld = value.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)
        scores = torch.matmul(q_bnsd.float(), k_bnld.float().transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(attention_mask, float("-inf"))  # [B, 1, sq, L], True = masked
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out_bnsd = torch.matmul(probs, v_bnld)
        return out_bnsd.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """megatron's ``get_pos_emb_on_this_cp_rank`` without ``pin_memory`` (CPU-only torch refuses it)."""
    cp, rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([rank, 2 * cp - rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def use_cp_test_attention() -> None:
    """For the rest of this process: models built with ``parallel.cp > 1`` get ``AllGatherCPAttention``
    instead of refusing (CP1 models are untouched: the local spec's own attention)."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from megatron_opsd import config
    from megatron_opsd.models import provider
    from megatron_opsd.models.attention import PackedDotProductAttention

    plain_layer_spec = provider.layer_spec

    def layer_spec(model, build, config=None, runtime=None, vp_stage=None):
        spec = plain_layer_spec(model, build, config, runtime, vp_stage)
        if runtime is not None and runtime.cp > 1:
            spec = provider._replace_modules(spec, PackedDotProductAttention, AllGatherCPAttention)
        return spec

    provider.layer_spec = layer_spec
    provider.check_context_parallel = config.check_context_parallel = lambda cp, build: None
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
