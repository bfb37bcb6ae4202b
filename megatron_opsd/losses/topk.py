"""Teacher top-k divergence: both distributions restricted to the teacher's global top-k ids.

The ids are found without gathering the vocabulary (``topk_ids``: local top-k, one exchange of k * TP
candidates); both models' log-probabilities at those ids (and their tail masses) come from the
differentiable ``log_probs_at``. After that everything is an [n, k] or [n, k + 1] tensor and plain
autograd does the rest.

Without ``tail`` both distributions are renormalised over the k ids. With ``tail`` a (k + 1)-th bucket
holds each model's remaining mass 1 − Σ_topk p under its full-vocabulary softmax, so the k + 1 buckets
are a coarsening of the full distributions and the truncated KL stays non-negative (and ≤ the full one).
The tail is summed over the remaining entries, not computed as 1 − Σ p: confident tokens of an LLM put
all but 1e-6..1e-9 of their mass in the top-k, far below what 1 − Σ p resolves in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opsd.losses.terms import check_clip, dense_divergence, resolve_divergence
from megatron_opsd.losses.vocab_parallel import log_probs_at, prepare, topk_ids


def vocab_parallel_topk_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int,
                                   divergence: str = "forward_kl", beta: float = 0.5, tail: bool = False,
                                   temperature: float = 1.0, clip: float | None = None,
                                   vocab_size: int | None = None, tp_group: dist.ProcessGroup | None = None,
                                   chunk_size: int | None = None) -> torch.Tensor:
    """Per-token divergence over the teacher's top-k ids (+ an optional tail bucket), vocab-parallel.

    Arguments as ``vocab_parallel_divergence`` plus ``k`` (1 <= k <= vocab_size) and ``tail``.
    Returns fp32 [...]; gradient to the student only (through its log-probabilities at the k ids and
    its tail). Collectives: forward 3 all-gathers (the teacher's candidates; each model's
    log-probabilities at the chosen ids), backward 0. Memory: O(n k) and one fp32 [chunk, V_local]
    buffer besides the gradient.
    """
    resolve_divergence(divergence, beta)
    check_clip(clip)
    s_nv, t_nv, shard, rows = prepare(student_logits, teacher_logits, temperature=temperature,
                                      vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size)
    true_vocab = vocab_size if vocab_size is not None else shard.num_local * shard.world_size
    if not 1 <= k <= true_vocab:
        raise ValueError(f"k={k} must lie in [1, vocab_size={true_vocab}]")
    ids_nk = topk_ids(t_nv, k, shard)
    logq_t = log_probs_at(t_nv, ids_nk, shard, temperature, rows, with_tail=tail)
    logq_s = log_probs_at(s_nv, ids_nk, shard, temperature, rows, with_tail=tail)
    if not tail:  # renormalise over the k ids
        logq_s, logq_t = torch.log_softmax(logq_s, dim=-1), torch.log_softmax(logq_t, dim=-1)
    per_token = dense_divergence(logq_s, logq_t, divergence=divergence, beta=beta, clip=clip)
    return per_token.view(student_logits.shape[:-1])
