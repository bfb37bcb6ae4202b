"""Vocabulary-parallel per-token statistics: the one place where sharded logits become numbers.

Every loss in this package is built from the primitives here; none of them re-derives the sharding.

Layout (``sharding``): rank r of ``tp_group`` holds global ids ``[r * V_local, (r + 1) * V_local)``.
Ids ``>= vocab_size`` are padding (converted checkpoints pad with zero rows, so their logits are 0.0,
not -inf): they get zero probability and zero gradient. Padding is a suffix of the vocabulary, so each
rank's real columns are a prefix of its slice and the kernels simply never read the rest.

Shape legend: n tokens (leading dims flattened), v this rank's columns, c tokens of one chunk,
k selected ids, r ranks of the group.

Dtype policy: logits may be any float dtype; every statistic and every vocabulary entry is computed in
fp32, gradients are returned in the logits' dtype. Temperature: z = logits / T for both models.

Memory policy: autograd Functions save only their inputs (no copies) and O(n) fp32 statistics. Forward
and backward walk the tokens in chunks of ``c`` rows, so the extra memory is a few fp32 ``[c, v]``
buffers (plus the gradient itself) whatever n is. Backward recomputes probabilities from the saved
inputs and statistics and issues no collective (or, for the divergence under ``gradient_in_forward``,
only scales the gradient its forward computed).

Collectives: each docstring states them. Kernels that need probabilities in forward exchange a chunk's
normalisers right away (1 small all-gather per chunk) so that one exp per entry serves both the
normaliser and the probabilities; everything else is exchanged once per call. Every rank of the group
must make the same calls with the same number of tokens (chunking depends only on n and V_local).

Inputs must be finite. Rows whose loss is masked out (zeros, padding garbage) give finite values and
gradients; the per-token outputs are unmasked and the caller multiplies by its loss mask.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_opsd.losses.sharding import (VocabShard, all_reduce_sum_, chunk_rows, gather_ranks, row_chunks,
                                           vocab_shard)
from megatron_opsd.losses.terms import Terms, check_clip, select_terms

# A tail mass below exp(-80) ~ 2e-35 is floored there: its log stays finite (no 0 · log 0 = NaN in the
# divergence) and, being a constant, it has no gradient.
_MIN_LOG_TAIL = -80.0


# ---------------------------------------------------------------------------------------------------
# Normalisers and chunk helpers (fp32).
#
# A token's softmax over the global vocabulary is kept as two fp32 numbers: ``shift`` M, the largest
# logit (in logit units), and ``log_norm`` r = log Σ_v exp((x_v − M) / T), so log p_v = (x_v − M) / T − r.
# Unlike a single log-sum-exp (which for logits of 1e4 is itself ~1e4 and carries ~1e-3 of fp32
# rounding into every log-probability), both pieces are exact or small, and (x − M) is exact for the
# logits that matter. Ranks combine their local pairs with one all-gather.
#
# Each call allocates its fp32 [c, v] buffers once (``_workspace``) and every chunk reuses them through
# ``out=`` and in-place ops: the extra memory is exactly ``count`` buffers, with no allocator churn
# (on CPU, mixed-dtype ops would also allocate hidden cast copies).


def _workspace(count: int, rows: int, num_rows: int, shard: VocabShard, device: torch.device) -> torch.Tensor:
    """fp32 [count, c, v_valid] scratch for one call; a chunk uses ``ws[:, : len(chunk)]``. Under
    ``gradient_in_forward`` a buffer kept by the context (calls never nest: each call's scratch is dead
    when it returns)."""
    shape = (count, min(rows, num_rows), shard.num_valid)
    if _in_forward is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    kept = _in_forward.workspace
    if (kept is None or kept.device != device or kept.shape[0] < count or kept.shape[1] < shape[1]
            or kept.shape[2] != shape[2]):
        kept = _in_forward.workspace = None  # drop the old one first
        kept = _in_forward.workspace = torch.empty(shape, dtype=torch.float32, device=device)
    return kept[:count, : shape[1]]


def _log_probs(x_cv: torch.Tensor, shift_c: torch.Tensor, log_norm_c: torch.Tensor, temperature: float,
               out: torch.Tensor) -> torch.Tensor:
    """``out`` = fp32 log p = (x − M) / T − r for a [c, v_valid] chunk."""
    out.copy_(x_cv).sub_(shift_c[:, None])
    if temperature != 1.0:
        out.div_(temperature)
    return out.sub_(log_norm_c[:, None])


def _local_normaliser(x_cv: torch.Tensor, temperature: float, z_out: torch.Tensor,
                      e_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes z = (x − m) / T with m the local row max, and e = exp(z) (``e_out`` may be ``z_out``).
    Returns this rank's (m, log Σ e), fp32 [c] each; (−inf, 0) on a rank without real columns."""
    if x_cv.shape[1] == 0:
        max_c = torch.full((x_cv.shape[0],), -math.inf, dtype=torch.float32, device=x_cv.device)
        return max_c, torch.zeros_like(max_c)
    max_c = x_cv.amax(dim=-1).float()
    z_out.copy_(x_cv).sub_(max_c[:, None])
    if temperature != 1.0:
        z_out.div_(temperature)
    return max_c, torch.exp(z_out, out=e_out).sum(dim=-1).log_()


def _rank_offsets(max_r: torch.Tensor, log_norm_r: torch.Tensor, temperature: float, dim: int):
    """Combine per-rank (m_r, r_r) along ``dim`` into the global (M, r), and each rank's offset
    log(Z_r / Z) = (m_r − M) / T + r_r − r."""
    shift = max_r.amax(dim=dim, keepdim=True)
    offset_r = (max_r - shift).div_(temperature).add_(log_norm_r)
    log_norm = torch.logsumexp(offset_r, dim=dim, keepdim=True)
    return shift.squeeze(dim), log_norm.squeeze(dim), offset_r.sub_(log_norm)


def _global_normaliser(max_kc: torch.Tensor, log_norm_kc: torch.Tensor, shard: VocabShard,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (m, r) [k, c] -> global (M, r) [k, c]. Collectives: 1 all-gather of [2, k, c] (none at TP=1)."""
    if shard.world_size == 1:
        return max_kc, log_norm_kc
    gathered = gather_ranks(torch.stack([max_kc, log_norm_kc]), shard)  # [r, 2, k, c]
    shift, log_norm, _ = _rank_offsets(gathered[:, 0], gathered[:, 1], temperature, dim=0)
    return shift, log_norm


def _chunk_distributions(xs_cv: list[torch.Tensor], shard: VocabShard, temperature: float,
                         bufs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For one chunk of rows of each [c, v_valid] input ``i``, fill ``bufs[2i]`` with the fp32
    log-probabilities and ``bufs[2i + 1]`` with the probabilities under the global softmax of x / T;
    return the global (M, r), [k, c] each. One exp per entry serves both the normaliser and the
    probabilities (p = e · exp(−offset)). Collectives: 1 all-gather (every rank calls it, also one
    without real columns).
    """
    local = [_local_normaliser(x_cv, temperature, bufs[2 * i], bufs[2 * i + 1]) for i, x_cv in enumerate(xs_cv)]
    max_kc = torch.stack([m for m, _ in local])
    shift_kc, log_norm_kc = _global_normaliser(max_kc, torch.stack([r for _, r in local]), shard, temperature)
    offset_kc = (shift_kc - max_kc).div_(temperature).add_(log_norm_kc)  # log p = z − offset
    for i, offset_c in enumerate(offset_kc):
        bufs[2 * i].sub_(offset_c[:, None])
        bufs[2 * i + 1].mul_(offset_c.neg().exp_()[:, None])
    return shift_kc, log_norm_kc


def _local_normalisers(x_nv: torch.Tensor, shard: VocabShard, temperature: float,
                       rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (m, log Σ exp((x − m) / T)) fp32 [n] each, over its real columns; no collective."""
    max_n = torch.full((x_nv.shape[0],), -math.inf, dtype=torch.float32, device=x_nv.device)
    log_norm_n = torch.zeros_like(max_n)
    if shard.num_valid == 0:
        return max_n, log_norm_n
    x_nv = x_nv[:, : shard.num_valid]
    ws = _workspace(1, rows, x_nv.shape[0], shard, x_nv.device)
    for chunk in row_chunks(x_nv.shape[0], rows):
        z_cv = ws[0, : chunk.stop - chunk.start]
        max_n[chunk], log_norm_n[chunk] = _local_normaliser(x_nv[chunk], temperature, z_cv, z_cv)
    return max_n, log_norm_n


def topk_ids(x_nv: torch.Tensor, k: int, shard: VocabShard) -> torch.Tensor:
    """int64 [n, k]: the ids of the k largest logits per token over the global real vocabulary (the k most
    likely under any temperature), without gathering the vocabulary. No gradient.

    Each rank takes the top-k of its real columns; the k * TP candidates (logits and global ids) travel
    in 1 all-gather of an fp64 [n, 2k] tensor, and every rank picks the same global top-k (descending).
    Ties are broken arbitrarily.
    """
    num_rows = x_nv.shape[0]
    pack = torch.full((num_rows, 2 * k), -math.inf, dtype=torch.float64, device=x_nv.device)
    num_local_k = min(k, shard.num_valid)
    if num_local_k > 0:
        values, index = torch.topk(x_nv[:, : shard.num_valid], num_local_k, dim=-1)
        pack[:, :num_local_k] = values.double()
        pack[:, k:k + num_local_k] = (index + shard.start).double()  # exact: ids < 2^53
    gathered = gather_ranks(pack, shard).transpose(0, 1)  # [n, r, 2k]
    _, where = torch.topk(gathered[..., :k].reshape(num_rows, -1), k, dim=-1)
    return gathered[..., k:].reshape(num_rows, -1).gather(1, where).long()


# ---------------------------------------------------------------------------------------------------
# Autograd Functions


class _InForward:
    """The state of an active ``gradient_in_forward``."""

    def __init__(self) -> None:
        self.workspace: torch.Tensor | None = None  # reused by every kernel call (``_workspace``)
        self.grad_slot: torch.Tensor | None = None  # one-shot gradient buffer (``offer_gradient_buffer``)

    def offer_gradient_buffer(self, buffer: torch.Tensor) -> None:
        """The next divergence forward writes its [n, v] gradient into ``buffer[:n]`` (same dtype and
        columns, enough rows; padding columns zero) instead of a fresh tensor; used once, then forgotten.
        The caller must be done with what an earlier use of the buffer returned."""
        self.grad_slot = buffer

    def take_gradient_buffer(self, like_nv: torch.Tensor) -> torch.Tensor | None:
        slot, self.grad_slot = self.grad_slot, None
        if (slot is None or slot.dtype != like_nv.dtype or slot.device != like_nv.device
                or slot.shape[1] != like_nv.shape[1] or slot.shape[0] < like_nv.shape[0]):
            return None
        return slot[: like_nv.shape[0]]


_in_forward: _InForward | None = None  # see gradient_in_forward


@contextlib.contextmanager
def gradient_in_forward() -> Iterator[_InForward]:
    """While active, ``vocab_parallel_divergence`` computes the student's
    gradient (up to the incoming per-token scale) in its forward pass, from the probabilities it has at
    hand, and its backward only scales it, instead of recomputing both distributions chunk by chunk.

    For callers that differentiate right after the forward, on a bounded number of rows: the fused
    projection (``losses.projected``), whose ``[c, V/TP]`` chunk logits are fresh. The gradient is then
    held from forward to backward, one ``[n, V/TP]`` tensor in the logits' dtype (the size of the
    gradient backward returns anyway). Collectives: one more all-reduce of [c] per chunk (the row sums
    G, needed before the chunk's buffers are reused); none at TP=1.

    Memory: every kernel call inside reuses one fp32 workspace kept by the context, and a caller that
    walks chunks can offer one gradient buffer per chunk (``offer_gradient_buffer`` on the yielded
    state): no [c, v] allocation per chunk, whose freed pages would otherwise pile up in the CPU heap.
    """
    global _in_forward
    was, _in_forward = _in_forward, _InForward()
    try:
        yield _in_forward
    finally:
        _in_forward = was


class _VocabParallelDivergence(torch.autograd.Function):
    """Per-token Σ_v min(ℓ_v, τ) between vocab-sharded student and teacher logits (see ``terms``).

    Inputs: ``student_nv``, ``teacher_nv`` [n, v] (this rank's columns; any float dtypes).
    Output: fp32 [n], identical on every rank of the group. Gradient to the student only.
    Collectives per call: forward ceil(n / c) + 1 (per chunk, 1 all-gather of the [2, 2, c] local
    normalisers; at the end, 1 all-reduce of the [2, n] per-token sums: the value and G = Σ_v g_v);
    backward 0. With tp_group=None: none.
    Gradient: ∂/∂s_j = (g_j [ℓ_j <= τ] − p_S,j G) / T with G summed over the unclipped entries, so a
    clipped entry contributes nothing. G comes from forward; backward recomputes ℓ, g and p_S chunk by
    chunk from the saved inputs and the saved normalisers (under ``gradient_in_forward``, forward
    writes (g − p_S G) / T as it goes, after one more all-reduce of the chunk's G, and backward scales it).
    Memory: saves the inputs and 5 fp32 [n] statistics; five fp32 [c, v] buffers while running.
    """

    @staticmethod
    def forward(ctx, student_nv, teacher_nv, terms: Terms, beta: float, clip: float | None,
                temperature: float, shard: VocabShard, rows: int):
        s_nv, t_nv = student_nv[:, : shard.num_valid], teacher_nv[:, : shard.num_valid]
        shift_2n = s_nv.new_empty((2, s_nv.shape[0]), dtype=torch.float32)
        log_norm_2n = torch.empty_like(shift_2n)
        sums_2n = torch.zeros_like(shift_2n)  # [value, G]
        ws = _workspace(5, rows, s_nv.shape[0], shard, s_nv.device)
        # gradient_in_forward: the gradient / incoming scale, (g − p_S G) / T, written chunk by chunk
        ctx.grad_nv = None
        if _in_forward is not None and ctx.needs_input_grad[0]:
            ctx.grad_nv = _in_forward.take_gradient_buffer(student_nv)
            if ctx.grad_nv is None:
                ctx.grad_nv = _empty_grad(student_nv, shard)
        for chunk in row_chunks(s_nv.shape[0], rows):
            logp_s, p_s, logp_t, p_t, scratch = ws[:, : chunk.stop - chunk.start]
            shift_2n[:, chunk], log_norm_2n[:, chunk] = _chunk_distributions(
                [s_nv[chunk], t_nv[chunk]], shard, temperature, [logp_s, p_s, logp_t, p_t])
            entry_cv, grad_cv = terms(logp_s, logp_t, p_s, p_t, scratch, beta, need_entry=True)
            if clip is not None:
                grad_cv.mul_(torch.le(entry_cv, clip, out=scratch))  # clipped entries: no gradient
                entry_cv.clamp_max_(clip)
            sums_2n[0, chunk] = entry_cv.sum(dim=-1)
            sums_2n[1, chunk] = grad_cv.sum(dim=-1)
            if ctx.grad_nv is not None:
                g_sum_c = all_reduce_sum_(sums_2n[1, chunk].clone(), shard)
                ctx.grad_nv[chunk, : shard.num_valid] = grad_cv.sub_(p_s.mul_(g_sum_c[:, None])).div_(temperature)
        all_reduce_sum_(sums_2n, shard)
        if ctx.grad_nv is None:
            ctx.save_for_backward(student_nv, teacher_nv, shift_2n, log_norm_2n, sums_2n[1].clone())
        ctx.config = (terms, beta, clip, temperature, shard, rows)
        return sums_2n[0].clone()

    @staticmethod
    def backward(ctx, grad_n):
        if ctx.grad_nv is not None:  # gradient_in_forward
            grad_nv, ctx.grad_nv = ctx.grad_nv, None
            _, _, _, _, shard, rows = ctx.config
            return _scale_rows_(grad_nv, grad_n, shard, rows), None, None, None, None, None, None, None
        student_nv, teacher_nv, shift_2n, log_norm_2n, g_sum_n = ctx.saved_tensors
        terms, beta, clip, temperature, shard, rows = ctx.config
        grad_nv = _empty_grad(student_nv, shard)
        if shard.num_valid > 0:
            scale_n = grad_n.float() / temperature
            s_nv, t_nv = student_nv[:, : shard.num_valid], teacher_nv[:, : shard.num_valid]
            ws = _workspace(5, rows, s_nv.shape[0], shard, s_nv.device)
            for chunk in row_chunks(s_nv.shape[0], rows):
                logp_s, p_s, logp_t, p_t, scratch = ws[:, : chunk.stop - chunk.start]
                for x_nv, i, logp, p in ((s_nv, 0, logp_s, p_s), (t_nv, 1, logp_t, p_t)):
                    torch.exp(_log_probs(x_nv[chunk], shift_2n[i, chunk], log_norm_2n[i, chunk], temperature,
                                         out=logp), out=p)
                entry_cv, grad_cv = terms(logp_s, logp_t, p_s, p_t, scratch, beta, need_entry=clip is not None)
                if clip is not None:
                    grad_cv.mul_(torch.le(entry_cv, clip, out=entry_cv))
                grad_cv.sub_(p_s.mul_(g_sum_n[chunk, None])).mul_(scale_n[chunk, None])
                grad_nv[chunk, : shard.num_valid] = grad_cv
        return grad_nv, None, None, None, None, None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    """Per-token entropy H = −Σ_v p_v log p_v of vocab-sharded logits.

    Input [n, v]; output fp32 [n]. Collectives per call: forward ceil(n / c) + 1 (per chunk, 1
    all-gather of the [2, 1, c] local normalisers; 1 all-reduce of H); backward 0. Gradient
    ∂H/∂x_j = −p_j (log p_j + H) / T, recomputed chunk by chunk. Memory: saves the input and 3 fp32 [n];
    two fp32 [c, v] buffers.
    """

    @staticmethod
    def forward(ctx, x_nv, temperature: float, shard: VocabShard, rows: int):
        x_nv_valid = x_nv[:, : shard.num_valid]
        shift_n = x_nv.new_empty(x_nv.shape[0], dtype=torch.float32)
        log_norm_n, entropy_n = torch.empty_like(shift_n), torch.zeros_like(shift_n)
        ws = _workspace(2, rows, x_nv.shape[0], shard, x_nv.device)
        for chunk in row_chunks(x_nv.shape[0], rows):
            logp_cv, p_cv = ws[:, : chunk.stop - chunk.start]
            shift_n[None, chunk], log_norm_n[None, chunk] = _chunk_distributions(
                [x_nv_valid[chunk]], shard, temperature, [logp_cv, p_cv])
            entropy_n[chunk] = p_cv.mul_(logp_cv).sum(dim=-1).neg_()
        all_reduce_sum_(entropy_n, shard)
        ctx.save_for_backward(x_nv, shift_n, log_norm_n, entropy_n)
        ctx.config = (temperature, shard, rows)
        return entropy_n.clone()

    @staticmethod
    def backward(ctx, grad_n):
        x_nv, shift_n, log_norm_n, entropy_n = ctx.saved_tensors
        temperature, shard, rows = ctx.config
        grad_nv = _empty_grad(x_nv, shard)
        if shard.num_valid > 0:
            scale_n = grad_n.float() / -temperature
            x_nv_valid = x_nv[:, : shard.num_valid]
            ws = _workspace(2, rows, x_nv.shape[0], shard, x_nv.device)
            for chunk in row_chunks(x_nv.shape[0], rows):
                logp_cv, p_cv = ws[:, : chunk.stop - chunk.start]
                _log_probs(x_nv_valid[chunk], shift_n[chunk], log_norm_n[chunk], temperature, out=logp_cv)
                torch.exp(logp_cv, out=p_cv)
                grad_nv[chunk, : shard.num_valid] = logp_cv.add_(entropy_n[chunk, None]).mul_(p_cv).mul_(
                    scale_n[chunk, None])
        return grad_nv, None, None, None


class _VocabParallelLogProbsAt(torch.autograd.Function):
    """log p(ids) under the global softmax of x / T for k distinct ids per token, and optionally the
    log of the remaining ("tail") mass log Σ_{v ∉ ids} p_v.

    Inputs: ``x_nv`` [n, v]; ``ids_nk`` int64 [n, k], distinct global ids in [0, vocab_size), the same on
    every rank. Output: fp32 [n, k] or, ``with_tail``, [n, k + 1]; identical on every rank.
    The tail is summed over the other entries (the ids' exponentials are subtracted from themselves,
    exactly 0), never as 1 − Σ p, so tails far below fp32 epsilon keep their relative accuracy; it is
    floored at exp(_MIN_LOG_TAIL), below which it has no gradient.
    Collectives per call: forward 1 (all-gather of an fp32 [n, k + 3]: each id's owner contributes its
    log-probability under its local softmax, the others 0, plus every rank's local normaliser and local
    tail); backward 0 (the output is replicated, so each rank computes the gradient of its own columns:
    ∂ log p_y / ∂x_j = ([j = y] − p_j) / T, ∂ log tail / ∂x_j = ([j ∉ ids] p_j / tail − p_j) / T).
    Memory: saves the input, [n, k] indices and outputs, 2 fp32 [n]; one fp32 [c, v] buffer per pass.
    """

    @staticmethod
    def forward(ctx, x_nv, ids_nk, temperature: float, shard: VocabShard, rows: int, with_tail: bool):
        num_rows, k = ids_nk.shape
        local_nk = ids_nk - shard.start
        owned_nk = (local_nk >= 0) & (local_nk < shard.num_valid)
        index_nk = torch.where(owned_nk, local_nk, 0)
        # Per rank: [log p_local(ids) (0 where not owned), local max m, log Σ_local e, log tail_local].
        pack = torch.zeros((num_rows, k + 3), dtype=torch.float32, device=x_nv.device)
        pack[:, k], pack[:, k + 2] = -math.inf, -math.inf
        if shard.num_valid > 0:
            x_nv_valid = x_nv[:, : shard.num_valid]
            ws = _workspace(1, rows, num_rows, shard, x_nv.device)
            for chunk in row_chunks(num_rows, rows):
                z_cv, index_ck, owned_ck = ws[0, : chunk.stop - chunk.start], index_nk[chunk], owned_nk[chunk]
                pack[chunk, k] = x_nv_valid[chunk].amax(dim=-1).float()
                z_cv.copy_(x_nv_valid[chunk]).sub_(pack[chunk, k, None])
                if temperature != 1.0:
                    z_cv.div_(temperature)
                z_ck = z_cv.gather(1, index_ck)
                e_ck = z_cv.exp_().gather(1, index_ck).masked_fill_(~owned_ck, 0.0)
                # e − e: the ids' own entries become exactly 0 (distinct ids; dummies subtract 0)
                tail_c = z_cv.scatter_add_(1, index_ck, e_ck.neg()).sum(dim=-1) if with_tail else None
                log_total_c = (tail_c + e_ck.sum(dim=-1) if with_tail else z_cv.sum(dim=-1)).log_()
                pack[chunk, :k] = z_ck.sub_(log_total_c[:, None]).masked_fill_(~owned_ck, 0.0)
                pack[chunk, k + 1] = log_total_c
                if with_tail:
                    pack[chunk, k + 2] = tail_c.log_().sub_(log_total_c)
        gathered = gather_ranks(pack, shard)  # [r, n, k + 3]
        shift_n, log_norm_n, offset_rn = _rank_offsets(gathered[..., k], gathered[..., k + 1], temperature, dim=0)
        owner_nk = torch.div(ids_nk, shard.num_local, rounding_mode="floor").clamp_(0, shard.world_size - 1)
        logp_nk = gathered[..., :k].sum(dim=0) + offset_rn.t().gather(1, owner_nk)  # one owner per id
        if with_tail:
            log_tail_n = torch.logsumexp(offset_rn + gathered[..., k + 2], dim=0).clamp_(min=_MIN_LOG_TAIL)
            logp_nk = torch.cat([logp_nk, log_tail_n[:, None]], dim=1)
        ctx.save_for_backward(x_nv, index_nk, owned_nk, shift_n, log_norm_n, logp_nk)
        ctx.config = (temperature, shard, rows, with_tail)
        return logp_nk

    @staticmethod
    def backward(ctx, grad_out):
        x_nv, index_nk, owned_nk, shift_n, log_norm_n, logp_out = ctx.saved_tensors
        temperature, shard, rows, with_tail = ctx.config
        k = index_nk.shape[1]
        grad_out = grad_out.float() / temperature
        grad_nk = grad_out[:, :k].masked_fill(~owned_nk, 0.0)
        # ∂/∂x_j = p_j (all_n + [j ∉ ids] outside_n) + [j ∈ ids] grad_j: the ids' entries are zeroed
        # exactly before the dense update, since outside_n = grad_tail / tail can be ~1e9.
        all_n = -grad_out[:, :k].sum(dim=1)
        outside_n = torch.zeros_like(all_n)
        if with_tail:
            log_tail_n = logp_out[:, k]
            grad_tail_n = grad_out[:, k].masked_fill(log_tail_n <= _MIN_LOG_TAIL, 0.0)  # floored: constant
            all_n -= grad_tail_n
            outside_n = grad_tail_n / log_tail_n.exp()
        grad_nv = _empty_grad(x_nv, shard)
        if shard.num_valid > 0:
            x_nv_valid = x_nv[:, : shard.num_valid]
            ws = _workspace(1, rows, x_nv.shape[0], shard, x_nv.device)
            for chunk in row_chunks(x_nv.shape[0], rows):
                p_cv, index_ck = ws[0, : chunk.stop - chunk.start], index_nk[chunk]
                _log_probs(x_nv_valid[chunk], shift_n[chunk], log_norm_n[chunk], temperature, out=p_cv).exp_()
                p_ck = p_cv.gather(1, index_ck).masked_fill_(~owned_nk[chunk], 0.0)
                p_cv.scatter_add_(1, index_ck, p_ck.neg()).mul_((all_n[chunk] + outside_n[chunk])[:, None])
                p_cv.scatter_add_(1, index_ck, p_ck.mul_(all_n[chunk, None]).add_(grad_nk[chunk]))
                grad_nv[chunk, : shard.num_valid] = p_cv
        return grad_nv, None, None, None, None, None


def _scale_rows_(x_nv: torch.Tensor, scale_n: torch.Tensor, shard: VocabShard, rows: int) -> torch.Tensor:
    """``x *= scale[:, None]`` in place over the real columns, computed in fp32 with one rounding. For a
    bf16/fp16 ``x`` chunk by chunk through an fp32 buffer: on CPU a mixed-dtype ``mul_`` materialises
    two fp32 copies of the whole ``x`` (32 MiB each, by count, for a 55-token chunk at V=151,936)."""
    if x_nv.element_size() >= 4 or x_nv.is_cuda:  # fp32/fp64: in place; CUDA converts inside the kernel
        return x_nv.mul_(scale_n[:, None])
    buf = _workspace(1, rows, x_nv.shape[0], shard, x_nv.device)[0]
    for chunk in row_chunks(x_nv.shape[0], rows):
        part = buf[: chunk.stop - chunk.start]
        x_nv[chunk, : shard.num_valid] = part.copy_(x_nv[chunk, : shard.num_valid]).mul_(scale_n[chunk, None])
    return x_nv


def _empty_grad(x_nv: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Gradient buffer in the input's dtype; the padding columns (never written) are zero."""
    if shard.num_valid == shard.num_local:
        return torch.empty_like(x_nv, memory_format=torch.contiguous_format)
    return torch.zeros_like(x_nv, memory_format=torch.contiguous_format)


def log_probs_at(x_nv: torch.Tensor, ids_nk: torch.Tensor, shard: VocabShard, temperature: float, rows: int,
                 *, with_tail: bool = False) -> torch.Tensor:
    """Differentiable fp32 log p(ids) [n, k] under the global softmax of x / T; ``with_tail`` appends
    the log of the remaining mass as column k (ids must then be distinct per token)."""
    return _VocabParallelLogProbsAt.apply(x_nv, ids_nk, temperature, shard, rows, with_tail)


# ---------------------------------------------------------------------------------------------------
# Public API


def _flatten(logits: torch.Tensor, name: str) -> torch.Tensor:
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension, got a scalar")
    return logits.reshape(-1, logits.shape[-1])


def check_temperature(temperature: float) -> None:
    if not temperature > 0.0 or not math.isfinite(temperature):
        raise ValueError(f"temperature={temperature} must be a positive finite number")


def prepare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float,
            vocab_size: int | None, tp_group: dist.ProcessGroup | None, chunk_size: int | None):
    """Validate a (student, teacher) pair; return ([n, v] student, detached [n, v] teacher, shard, rows)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape [..., V_local]")
    check_temperature(temperature)
    s_nv = _flatten(student_logits, "student_logits")
    t_nv = _flatten(teacher_logits.detach(), "teacher_logits")
    shard = vocab_shard(s_nv.shape[-1], vocab_size, tp_group)
    return s_nv, t_nv, shard, chunk_rows(chunk_size, shard, s_nv.device)


def vocab_parallel_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                              divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                              clip: float | None = None, vocab_size: int | None = None,
                              tp_group: dist.ProcessGroup | None = None,
                              chunk_size: int | None = None) -> torch.Tensor:
    """Per-token divergence between teacher and student distributions sharded over the vocabulary.

    ``student_logits``, ``teacher_logits``: [..., V_local], this rank's slice of the padded vocabulary.
    ``divergence``: "forward_kl" Σ p_T (log p_T − log p_S), "reverse_kl" Σ p_S (log p_S − log p_T), or
    "jsd": generalized JSD(β) with the mixture m = β p_T + (1−β) p_S in probability space (TRL's GKD
    convention; β = 0 is forward KL and β = 1 reverse KL by definition). ``temperature`` divides both
    logits. ``clip``: per-entry cap τ, Σ_v min(ℓ_v, τ); clipped entries (ℓ_v > τ) carry no gradient.
    ``vocab_size``: the true vocabulary; padded columns are ignored. ``chunk_size``: tokens per chunk.

    Returns fp32 [...] (unmasked: multiply by the loss mask). The gradient flows to ``student_logits``
    only: ``teacher_logits`` is a constant (detached here even if it requires grad).
    Collectives: forward one all-gather of the [2, 2, chunk] normalisers per chunk plus one all-reduce of
    [2, n]; backward none. Numerics: fp32 statistics whatever the input dtype; logits of ±1e4 are fine.
    Extra memory: five fp32 [chunk, V_local] buffers besides the gradient.
    """
    terms = select_terms(divergence, beta)
    check_clip(clip)
    s_nv, t_nv, shard, rows = prepare(student_logits, teacher_logits, temperature=temperature,
                                      vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size)
    per_token = _VocabParallelDivergence.apply(s_nv, t_nv, terms, beta, clip, temperature, shard, rows)
    return per_token.view(student_logits.shape[:-1])


def vocab_parallel_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                                  vocab_size: int | None = None, tp_group: dist.ProcessGroup | None = None,
                                  chunk_size: int | None = None) -> torch.Tensor:
    """fp32 [...]: log p(token_ids) under softmax(logits / T) over the sharded vocabulary, with gradient.

    ``logits`` [..., V_local]; ``token_ids`` [...] global ids in [0, vocab_size) (not checked, to avoid a
    device sync). Collectives: 1 forward, 0 backward.
    """
    check_temperature(temperature)
    if token_ids.shape != logits.shape[:-1]:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must have the logits' leading shape "
                         f"{tuple(logits.shape[:-1])}")
    x_nv = _flatten(logits, "logits")
    shard = vocab_shard(x_nv.shape[-1], vocab_size, tp_group)
    rows = chunk_rows(chunk_size, shard, x_nv.device)
    logp_n1 = log_probs_at(x_nv, token_ids.reshape(-1, 1).long(), shard, temperature, rows)
    return logp_n1[:, 0].view(token_ids.shape)


def vocab_parallel_entropy(logits: torch.Tensor, *, temperature: float = 1.0, vocab_size: int | None = None,
                           tp_group: dist.ProcessGroup | None = None,
                           chunk_size: int | None = None) -> torch.Tensor:
    """fp32 [...]: entropy of softmax(logits / T) over the sharded vocabulary, with gradient.

    Collectives: forward one all-gather of the [2, 1, chunk] normalisers per chunk plus one all-reduce of
    [n]; backward none.
    """
    check_temperature(temperature)
    x_nv = _flatten(logits, "logits")
    shard = vocab_shard(x_nv.shape[-1], vocab_size, tp_group)
    rows = chunk_rows(chunk_size, shard, x_nv.device)
    return _VocabParallelEntropy.apply(x_nv, temperature, shard, rows).view(logits.shape[:-1])
