"""Sample the next token from vocabulary-sharded logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits ``[b, v]`` for its contiguous slice of the (padded) vocabulary;
columns with global id >= ``vocab_size`` are padding and are never sampled. Tokens are drawn with the
Gumbel-max trick (``noise.py``): token = argmax over the allowed set of (z_v + g_v), z = logits / T,
with g_v a function of the row's key and the global id v, so every rank can score its own slice and
the result does not depend on how the vocabulary is split.

Two paths, both exact (see ``SamplingParams`` for the semantics):

* top-k (also greedy = top-1): each rank takes its local top-k (ties towards the lower id); one
  all-gather of the k candidates plus per-rank (max, sum-exp) statistics per row leaves every rank the
  global top-k, from which top-p, the noise, the choice and both log-probabilities are computed on
  k * TP numbers. 1 collective per step.
* full vocabulary (top_k = 0): the noise is computed for the local slice. Top-p needs the global
  threshold tau such that exactly the tokens with p_v >= tau are kept: a bisection over the bit patterns
  of the fp32 probabilities (non-negative floats order like their int32 bits), each probe an all-reduce
  of the [b] masses strictly above the probe; <= 32 probes find the exact boundary. Then one all-gather
  of each rank's best (score, id) and statistics. 1 collective per step, plus 1 + <= 32 with top-p.

Log-probabilities: the raw model's (T = 1, full vocabulary) via a vocab-parallel log-sum-exp of
per-rank (max, sum-exp) pairs; the sampling distribution's over the allowed set at temperature T.

Precision. The top-k path works in fp32 on the vocabulary slice (local top-k, max, sum-exp): the
logits are fp32 or bf16 already, and a fp64 copy of [b, v] cost more than the rest of the sampler. Candidate values are exact in fp64, so everything computed on the k * TP
candidates (temperature, top-p, noise, choice, sampling log-prob) is fp64. The full-vocabulary path
(top_k = 0) works in fp64 throughout. Shape legend: b rows, v local columns, k candidates per rank,
r ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opsd.losses.sharding import VocabShard, all_reduce_sum_, gather_ranks
from megatron_opsd.rollout import noise
from megatron_opsd.rollout.types import SamplingParams

_NO_ID = float(2**52)  # id of a missing candidate (exactly representable; sorts after every real id)


@dataclass
class StepSample:
    """One sampled token per row, identical on every rank of the group."""

    token_ids: torch.Tensor  # int64 [b]
    sampling_logprobs: torch.Tensor  # fp64 [b]
    model_logprobs: torch.Tensor  # fp64 [b]


def sample_next(logits_bv: torch.Tensor, keys_b: torch.Tensor, params: SamplingParams,
                vs: VocabShard) -> StepSample:
    """Sample one token per row from this rank's logits ``[b, v]``; ``keys_b`` int64 [b] noise keys."""
    x_bv = logits_bv[:, : vs.num_valid].float()
    if params.greedy or params.top_k > 0:
        return _sample_top_k(x_bv, keys_b, params, vs)
    return _sample_full(x_bv.double(), keys_b, params, vs)


# ---------------------------------------------------------------------------------------------------
# Collectives and log-sum-exp pieces


def _max_sumexp(z_bv: torch.Tensor, allowed_bv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: m = max z (-inf if none), s = sum exp(z - m) over the allowed entries (0 if none);
    computed in z's dtype, returned in fp64."""
    if allowed_bv is not None:
        z_bv = z_bv.masked_fill(~allowed_bv, -torch.inf)
    if z_bv.shape[1] == 0:
        empty = z_bv.new_full((z_bv.shape[0],), -torch.inf, dtype=torch.float64)
        return empty, torch.zeros_like(empty)
    m_b = z_bv.amax(dim=1)
    safe_b = torch.where(torch.isfinite(m_b), m_b, 0.0)
    return m_b.double(), (z_bv - safe_b[:, None]).exp().sum(dim=1).double()


def _combine_lse(m_rb: torch.Tensor, s_rb: torch.Tensor) -> torch.Tensor:
    """Global log-sum-exp from per-rank (max, sum-exp) pairs [r, b]."""
    m_b = m_rb.amax(dim=0)
    return m_b + (s_rb * (m_rb - m_b).exp()).sum(dim=0).log()


def _top_p_keep(z_bk: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask [b, k] of the nucleus over candidates: v survives iff the renormalised mass of the
    candidates strictly more likely than v is below top_p."""
    p_bk = torch.softmax(z_bk, dim=1)
    above_bk = (p_bk[:, None, :] * (p_bk[:, None, :] > p_bk[:, :, None])).sum(dim=2)
    return above_bk < top_p


# ---------------------------------------------------------------------------------------------------
# top-k path (greedy = top-1)


def _local_top_k(x_bv: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries per row and their local columns, ties towards the lower column."""
    fetch = min(2 * k, x_bv.shape[1])
    vals_bf, cols_bf = x_bv.topk(fetch, dim=1)
    if fetch == x_bv.shape[1] or bool((vals_bf[:, -1] < vals_bf[:, k - 1]).all()):
        # every entry tied with the k-th largest was fetched (bf16 logits tie often): order the fetched
        # ones by value, descending, then column, ascending; take k
        by_col_bf = cols_bf.argsort(dim=1)
        vals_bf, cols_bf = vals_bf.gather(1, by_col_bf), cols_bf.gather(1, by_col_bf)
        by_val_bk = vals_bf.argsort(dim=1, descending=True, stable=True)[:, :k]
        return vals_bf.gather(1, by_val_bk), cols_bf.gather(1, by_val_bk)
    # more than k ties at the k-th value: a pass over the whole slice
    vals_bk = vals_bf[:, :k]
    thr_b = vals_bk[:, -1:]
    greater_bv = x_bv > thr_b
    tied_bv = x_bv == thr_b
    room_b = k - greater_bv.sum(dim=1, keepdim=True)
    keep_bv = greater_bv | (tied_bv & (tied_bv.cumsum(dim=1) <= room_b))
    cols_bk = keep_bv.nonzero()[:, 1].view(x_bv.shape[0], k)  # row-major: ascending columns per row
    return x_bv.gather(1, cols_bk), cols_bk


def _sample_top_k(x_bv: torch.Tensor, keys_b: torch.Tensor, params: SamplingParams,
                  vs: VocabShard) -> StepSample:
    b = x_bv.shape[0]
    k = 1 if params.greedy else params.top_k
    k_local = min(k, vs.num_valid)
    pack_bp = x_bv.new_full((b, 2 * k + 2), -torch.inf, dtype=torch.float64)  # [vals (k), ids (k), max, sum-exp]
    pack_bp[:, k: 2 * k] = _NO_ID
    if k_local > 0:
        vals_bk, cols_bk = _local_top_k(x_bv, k_local)
        pack_bp[:, :k_local] = vals_bk
        pack_bp[:, k: k + k_local] = (cols_bk + vs.start).double()
    pack_bp[:, 2 * k], pack_bp[:, 2 * k + 1] = _max_sumexp(x_bv)
    gathered_rbp = gather_ranks(pack_bp, vs)  # the one collective of this path
    lse_b = _combine_lse(gathered_rbp[:, :, 2 * k], gathered_rbp[:, :, 2 * k + 1])
    vals_bc = gathered_rbp[:, :, :k].permute(1, 0, 2).reshape(b, -1)
    ids_bc = gathered_rbp[:, :, k: 2 * k].permute(1, 0, 2).reshape(b, -1)
    # global top-k: value descending, id ascending among equal values (two stable sorts)
    by_id = ids_bc.argsort(dim=1, stable=True)
    vals_bc, ids_bc = vals_bc.gather(1, by_id), ids_bc.gather(1, by_id)
    by_val = vals_bc.argsort(dim=1, descending=True, stable=True)[:, :k]
    vals_bk, ids_bk = vals_bc.gather(1, by_val), ids_bc.gather(1, by_val)
    if params.greedy:
        return StepSample(ids_bk[:, 0].long(), torch.zeros_like(lse_b), vals_bk[:, 0] - lse_b)
    z_bk = vals_bk / params.temperature  # -inf where the vocabulary has fewer than k tokens
    allowed_bk = torch.isfinite(z_bk)
    if params.top_p < 1.0:
        allowed_bk &= _top_p_keep(z_bk, params.top_p)
    z_bk = z_bk.masked_fill(~allowed_bk, -torch.inf)
    logp_bk = z_bk - torch.logsumexp(z_bk, dim=1, keepdim=True)
    real_ids_bk = torch.where(allowed_bk, ids_bk, 0.0).long()
    choice_b1 = (z_bk + noise.gumbel(keys_b, real_ids_bk)).argmax(dim=1, keepdim=True)
    return StepSample(ids_bk.gather(1, choice_b1)[:, 0].long(), logp_bk.gather(1, choice_b1)[:, 0],
                      vals_bk.gather(1, choice_b1)[:, 0] - lse_b)


# ---------------------------------------------------------------------------------------------------
# full-vocabulary path (top_k = 0)


def _top_p_threshold_bits(p_bv: torch.Tensor, top_p: float, vs: VocabShard) -> torch.Tensor:
    """int64 [b]: the smallest fp32 bit pattern t with sum_{bits(p_u) > t} p_u < top_p, over the
    global vocabulary. Keeping tokens with bits(p_v) >= t keeps exactly the nucleus.

    The local slice is sorted once, so each probe is a binary search plus a suffix-sum lookup; only
    the [b] masses cross ranks (one all-reduce per probe, <= 32 probes)."""
    b = p_bv.shape[0]
    bits_bv, order_bv = p_bv.float().view(torch.int32).long().sort(dim=1)
    suffix_bv = p_bv.gather(1, order_bv).flip(1).cumsum(dim=1).flip(1)  # mass from each sorted entry up
    suffix_bv = torch.cat([suffix_bv, suffix_bv.new_zeros(b, 1)], dim=1)
    lo_b = torch.full((b,), -1, dtype=torch.int64, device=p_bv.device)  # mass above lo >= top_p
    hi_b = torch.full((b,), 0x7F800000, dtype=torch.int64, device=p_bv.device)  # bits of +inf: mass 0
    while bool((hi_b - lo_b > 1).any()):  # the same on every rank: the masses are all-reduced
        mid_b = (lo_b + hi_b) // 2
        first_above_b1 = torch.searchsorted(bits_bv, mid_b[:, None], right=True)
        mass_b = all_reduce_sum_(suffix_bv.gather(1, first_above_b1)[:, 0], vs)
        below_b = mass_b < top_p
        hi_b = torch.where(below_b, mid_b, hi_b)
        lo_b = torch.where(below_b, lo_b, mid_b)
    return hi_b


def _sample_full(x_bv: torch.Tensor, keys_b: torch.Tensor, params: SamplingParams,
                 vs: VocabShard) -> StepSample:
    b, v = x_bv.shape
    z_bv = x_bv / params.temperature
    allowed_bv = None
    if params.top_p < 1.0:
        m_b, s_b = _max_sumexp(z_bv)
        stats_r2b = gather_ranks(torch.stack([m_b, s_b]), vs)
        lse_b = _combine_lse(stats_r2b[:, 0], stats_r2b[:, 1])
        p_bv = (z_bv - lse_b[:, None]).exp()
        allowed_bv = p_bv.float().view(torch.int32).long() >= _top_p_threshold_bits(p_bv, params.top_p, vs)[:, None]
    ids_v = torch.arange(vs.start, vs.start + v, device=x_bv.device)
    score_bv = z_bv + noise.gumbel(keys_b, ids_v)
    if allowed_bv is not None:
        score_bv = score_bv.masked_fill(~allowed_bv, -torch.inf)
    pack_b8 = x_bv.new_full((b, 8), -torch.inf)  # [score, id, z, x, max x, sum-exp x, max z, sum-exp z]
    pack_b8[:, 1] = _NO_ID
    if v > 0:
        best_b1 = score_bv.argmax(dim=1, keepdim=True)  # lowest column among exact ties
        pack_b8[:, 0] = score_bv.gather(1, best_b1)[:, 0]
        pack_b8[:, 1] = (best_b1[:, 0] + vs.start).double()
        pack_b8[:, 2] = z_bv.gather(1, best_b1)[:, 0]
        pack_b8[:, 3] = x_bv.gather(1, best_b1)[:, 0]
    pack_b8[:, 4], pack_b8[:, 5] = _max_sumexp(x_bv)
    pack_b8[:, 6], pack_b8[:, 7] = _max_sumexp(z_bv, allowed_bv)
    gathered_rb8 = gather_ranks(pack_b8, vs)
    score_rb, ids_rb = gathered_rb8[..., 0], gathered_rb8[..., 1]
    best_score_b = score_rb.amax(dim=0)
    # the owner of the best score; exact ties go to the lowest id
    owner_b = torch.where(score_rb == best_score_b, ids_rb, torch.inf).argmin(dim=0)
    chosen_b8 = gathered_rb8.gather(0, owner_b[None, :, None].expand(1, b, 8))[0]
    lse_model_b = _combine_lse(gathered_rb8[..., 4], gathered_rb8[..., 5])
    lse_allowed_b = _combine_lse(gathered_rb8[..., 6], gathered_rb8[..., 7])
    return StepSample(chosen_b8[:, 1].long(), chosen_b8[:, 2] - lse_allowed_b, chosen_b8[:, 3] - lse_model_b)
