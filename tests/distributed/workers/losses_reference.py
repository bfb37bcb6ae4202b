"""Unsharded fp64 references for ``megatron_opsd.losses``, and the test data both test tiers share.

Written independently of the kernels, in the most literal plain PyTorch: full-vocabulary
``log_softmax`` over the true vocabulary (padding columns sliced off), the whole [..., V] entry matrix,
``torch.minimum`` for the per-entry clip, the JSD mixture's log formed as TRL does
(``logaddexp(log β + log p_T, log(1−β) + log p_S)``), top-k ids from ``torch.topk`` of the full teacher
row, the tail bucket summed over the other ids, and autograd for every gradient.
"""

from __future__ import annotations

import math

import torch

PADDED_VOCAB = 96  # divisible by TP in {1, 2, 4}
LEAD_SHAPE = (3, 5)  # tokens as [batch, seq]
GARBAGE_ROWS = ((0, 4), (2, 0))  # all-zero logits in both models (masked-out positions), weight 0


def log_probs(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    return torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)


def entries(lps: torch.Tensor, lpt: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """The [..., V] per-entry terms ℓ_v."""
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    p_s, p_t = lps.exp(), lpt.exp()
    if divergence == "forward_kl":
        return p_t * (lpt - lps)
    if divergence == "reverse_kl":
        return p_s * (lps - lpt)
    log_m = torch.logaddexp(lpt + math.log(beta), lps + math.log(1.0 - beta))  # TRL's form: finite
    return beta * p_t * (lpt - log_m) + (1.0 - beta) * p_s * (lps - log_m)


def clipped_sum(entry: torch.Tensor, clip: float | None) -> torch.Tensor:
    if clip is not None:
        entry = torch.minimum(entry, torch.full_like(entry, clip))
    return entry.sum(-1)


def divergence(student: torch.Tensor, teacher: torch.Tensor, *, divergence: str = "forward_kl",
               beta: float = 0.5, temperature: float = 1.0, clip: float | None = None,
               vocab_size: int | None = None) -> torch.Tensor:
    vocab_size = vocab_size or student.shape[-1]
    lps = log_probs(student, temperature, vocab_size)
    lpt = log_probs(teacher.detach(), temperature, vocab_size)
    return clipped_sum(entries(lps, lpt, divergence, beta), clip)


def topk_divergence(student: torch.Tensor, teacher: torch.Tensor, *, k: int, tail: bool,
                    divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                    clip: float | None = None, vocab_size: int | None = None) -> torch.Tensor:
    vocab_size = vocab_size or student.shape[-1]
    lps = log_probs(student, temperature, vocab_size)
    lpt = log_probs(teacher.detach(), temperature, vocab_size)
    ids = torch.topk(lpt, k, dim=-1).indices
    top_s, top_t = lps.gather(-1, ids), lpt.gather(-1, ids)
    if tail:  # the remaining mass, summed over the ids not in the top-k
        outside = torch.ones_like(lps, dtype=torch.bool).scatter(-1, ids, False)
        lqs = torch.cat([top_s, (lps.exp() * outside).sum(-1, keepdim=True).log()], dim=-1)
        lqt = torch.cat([top_t, (lpt.exp() * outside).sum(-1, keepdim=True).log()], dim=-1)
    else:
        lqs, lqt = torch.log_softmax(top_s, dim=-1), torch.log_softmax(top_t, dim=-1)
    return clipped_sum(entries(lqs, lqt, divergence, beta), clip)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                   vocab_size: int | None = None) -> torch.Tensor:
    lp = log_probs(logits, temperature, vocab_size or logits.shape[-1])
    return lp.gather(-1, token_ids[..., None])[..., 0]


def entropy(logits: torch.Tensor, *, temperature: float = 1.0, vocab_size: int | None = None) -> torch.Tensor:
    lp = log_probs(logits, temperature, vocab_size or logits.shape[-1])
    return -(lp.exp() * lp).sum(-1)


def value_and_grad(fn, logits: torch.Tensor, weights: torch.Tensor, *args, **kwargs):
    """fp64 value of ``fn(logits, ...)`` and d Σ(weights · value) / d logits (zero on padding)."""
    leaf = logits.detach().double().requires_grad_()
    value = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad((value * weights.double()).sum(), leaf)
    return value.detach(), grad


def make_logits(seed: int, *, scale: float = 3.0, vocab_size: int = PADDED_VOCAB,
                pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full fp32 student and teacher logits [*LEAD_SHAPE, PADDED_VOCAB] and per-token weights.

    Columns >= vocab_size hold ``pad_value`` (converted checkpoints pad with zero rows: 0.0). Two rows are
    all-zero garbage in both models with weight 0 (a loss mask); the other weights are random.
    The scale makes distributions peaked enough that the paper's clip (0.05) binds on some entries.
    """
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*LEAD_SHAPE, PADDED_VOCAB, generator=gen) * scale
    teacher = student * 0.5 + torch.randn(*LEAD_SHAPE, PADDED_VOCAB, generator=gen) * scale
    weights = torch.rand(*LEAD_SHAPE, generator=gen) + 0.5
    for row in GARBAGE_ROWS:
        student[row] = 0.0
        teacher[row] = 0.0
        weights[row] = 0.0
    student[..., vocab_size:] = pad_value
    teacher[..., vocab_size:] = pad_value
    return student, teacher, weights
