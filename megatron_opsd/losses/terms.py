"""Per-entry divergence terms: the math of OPSD_METHOD.md §2, separate from any sharding.

Two forms of the same formulas:

* ``*_terms`` work on one chunk of vocabulary entries: fp32 ``[c, v]`` log-probabilities and
  probabilities in the caller's scratch buffers, plus one more scratch buffer; they may overwrite
  everything but ``p_S`` and allocate nothing. They return the entry ``ℓ`` and its
  derivative ``∂ℓ/∂log p_S`` (``g``), from which the vocab-parallel kernel builds the exact gradient
  ``∂/∂z_S,j Σ_v ℓ_v = g_j − p_S,j · Σ_v g_v``  (because ``∂log p_S,v/∂z_S,j = δ_vj − p_S,j``).
* ``dense_divergence`` is the plain-autograd version for small ``[n, k]`` inputs (the top-k variant).

Entry conventions (p = student S or teacher T; m = β p_T + (1−β) p_S, TRL's generalized JSD):
  forward KL  ℓ = p_T (log p_T − log p_S)                       g = −p_T
  reverse KL  ℓ = p_S (log p_S − log p_T)                       g = p_S (log p_S − log p_T + 1) = ℓ + p_S
  JSD(β)      ℓ = β p_T (log p_T − log m) + (1−β) p_S (log p_S − log m)
                                                                g = (1−β) p_S (log p_S − log m)
For JSD the derivative through the mixture cancels: the ∂/∂m terms sum to −(β p_T + (1−β) p_S)/m ·
(1−β) p_S = −(1−β) p_S, which cancels the +(1−β) p_S of differentiating p_S log p_S.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# log m is taken of max(m, TINY): where m < TINY both p_S and p_T are below TINY / min(β, 1−β), so
# every affected entry contributes < 1e-28 to the sum, and 0·log 0 can never turn into NaN.
_TINY = torch.finfo(torch.float32).tiny

Terms = Callable[..., tuple[torch.Tensor | None, torch.Tensor]]


def forward_kl_terms(logp_s: torch.Tensor, logp_t: torch.Tensor, p_s: torch.Tensor, p_t: torch.Tensor,
                     scratch: torch.Tensor, beta: float, *, need_entry: bool):
    """Returns (ℓ or None, g), written over ``logp_t`` and ``p_t``."""
    entry = logp_t.sub_(logp_s).mul_(p_t) if need_entry else None
    return entry, p_t.neg_()


def reverse_kl_terms(logp_s: torch.Tensor, logp_t: torch.Tensor, p_s: torch.Tensor, p_t: torch.Tensor,
                     scratch: torch.Tensor, beta: float, *, need_entry: bool):
    """Returns (ℓ, g), written over ``logp_s`` and ``logp_t``."""
    entry = logp_s.sub_(logp_t).mul_(p_s)
    return entry, torch.add(entry, p_s, out=logp_t)


def jsd_terms(logp_s: torch.Tensor, logp_t: torch.Tensor, p_s: torch.Tensor, p_t: torch.Tensor,
              scratch: torch.Tensor, beta: float, *, need_entry: bool):
    """Returns (ℓ or None, g) for 0 < β < 1, written over ``logp_t`` and ``logp_s``; log m goes to
    ``scratch``."""
    log_m = torch.mul(p_t, beta, out=scratch).add_(p_s, alpha=1.0 - beta).clamp_min_(_TINY).log_()
    grad = logp_s.sub_(log_m).mul_(p_s).mul_(1.0 - beta)
    entry = logp_t.sub_(log_m).mul_(p_t).mul_(beta).add_(grad) if need_entry else None
    return entry, grad


def resolve_divergence(divergence: str, beta: float) -> str:
    """Validate; JSD at β = 0 is defined as forward KL and at β = 1 as reverse KL (the mixture
    formula degenerates to 0 there)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not one of {DIVERGENCES}")
    if divergence != "jsd":
        return divergence
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1] for divergence='jsd' "
                         "(0 is forward KL, 1 is reverse KL)")
    return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")


def select_terms(divergence: str, beta: float) -> Terms:
    """The ``*_terms`` function for a (validated) divergence name."""
    return {"forward_kl": forward_kl_terms, "reverse_kl": reverse_kl_terms,
            "jsd": jsd_terms}[resolve_divergence(divergence, beta)]


def check_clip(clip: float | None) -> None:
    if clip is not None and not clip > 0.0:
        raise ValueError(f"clip={clip} must be None or a positive per-entry cap (the paper uses 0.05)")


def dense_divergence(logq_s: torch.Tensor, logq_t: torch.Tensor, *, divergence: str, beta: float,
                     clip: float | None) -> torch.Tensor:
    """Σ over the last dim of min(ℓ, clip) for fp32 log-distributions ``[n, k]``, by plain autograd.

    Meant for small ``k`` (top-k buckets); ``logq_t`` is treated as a constant.
    """
    divergence = resolve_divergence(divergence, beta)
    logq_t = logq_t.detach()
    if divergence == "forward_kl":
        entry = logq_t.exp() * (logq_t - logq_s)
    elif divergence == "reverse_kl":
        entry = logq_s.exp() * (logq_s - logq_t)
    else:
        log_m = torch.logaddexp(logq_t + math.log(beta), logq_s + math.log(1.0 - beta))
        entry = (beta * logq_t.exp() * (logq_t - log_m)
                 + (1.0 - beta) * logq_s.exp() * (logq_s - log_m))
    if clip is not None:
        entry = entry.clamp(max=clip)
    return entry.sum(-1)
