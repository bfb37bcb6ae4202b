"""Vocabulary-parallel OPSD losses: per-token divergences between tensor-parallel sharded logits.

Logits are [..., V/TP] per rank and are never gathered; statistics are fp32; memory is bounded by
processing tokens in chunks. See ``vocab_parallel`` for the layout, dtype and memory policies.
"""

from megatron_opsd.losses.sampled import sampled_token_advantage_loss
from megatron_opsd.losses.terms import DIVERGENCES
from megatron_opsd.losses.topk import vocab_parallel_topk_divergence
from megatron_opsd.losses.vocab_parallel import (
    vocab_parallel_divergence,
    vocab_parallel_entropy,
    vocab_parallel_token_logprobs,
)

__all__ = [
    "DIVERGENCES",
    "sampled_token_advantage_loss",
    "vocab_parallel_divergence",
    "vocab_parallel_entropy",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_topk_divergence",
]
