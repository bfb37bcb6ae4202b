"""The rollout interface: what a generator is asked for and what it hands back.

A rollout engine turns prompts (token ids) into sampled responses. It is a seeded data producer and
knows nothing about losses: the trainer consumes ``Rollout`` and recomputes whatever it needs.
Any engine (the built-in megatron-core one, or later an external server such as vLLM/SGLang kept in
sync with the trained weights) implements ``RolloutEngine.generate``.

Seeding: every sampled token is a deterministic function of (``SamplingParams.seed``, the row's
``SampleKey`` = (step, prompt id, sample index), the response position, and the model's logits), so a
prompt's sample does not depend on which other prompts share its batch, on their order, or on the
parallel layout (up to the last-ulp differences that sharded matmuls make to the logits themselves).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from megatron_opsd.config_io import doc

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """How to sample a response. Filters apply in HF ``generate``'s order: temperature, top-k, top-p.

    Semantics, exactly (``z = logits / temperature`` over the true vocabulary; padded ids never count):
    top-k keeps the k largest ``z`` (ties broken towards the lower token id, so exactly k survive);
    top-p then keeps token v iff the probability mass of the tokens strictly more likely than v (after
    renormalising over the survivors) is below ``top_p``: the smallest nucleus with mass >= top_p,
    with tokens tied at its boundary all kept. The sample is drawn from the survivors renormalised.
    """

    temperature: float = doc("Softmax temperature (> 0); ignored when greedy.", default=1.0)
    top_p: float = doc("Nucleus mass in (0, 1]; 1 disables.", default=1.0)
    top_k: int = doc("Keep the k most likely tokens; 0 disables.", default=0)
    greedy: bool = doc("Take the most likely token (lowest id on ties); sampling log-probs are then 0.",
                       default=False)
    max_new_tokens: int = doc("Most tokens sampled per response (the stop token included).", default=1024)
    stop_ids: tuple[int, ...] = doc(
        "Token ids that end a response (kept as its last token); usually the tokenizer's stop_ids. "
        "Empty: only max_new_tokens ends a response.", default=())
    seed: int = doc("Sampling seed, combined with each row's (step, prompt id, sample index).", default=0)

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"sampling.temperature={self.temperature} must be a positive finite number "
                             "(use greedy=true for argmax decoding)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p={self.top_p} must lie in (0, 1]; 1 disables nucleus filtering")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k} must be >= 0; 0 disables top-k filtering")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1")
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        if any(i < 0 for i in self.stop_ids):
            raise ValueError(f"sampling.stop_ids={list(self.stop_ids)} must be non-negative token ids")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"sampling.seed={self.seed} must lie in [0, 2**63)")


@dataclass(frozen=True)
class SampleKey:
    """Identifies one sampled response: the noise behind it is a function of these and the seed."""

    step: int = 0
    prompt_id: int = 0
    sample_idx: int = 0


@dataclass
class Rollout:
    """Sampled responses, one row per prompt, in the order of the prompts.

    ``response_ids[i]`` ends with the stop token when ``finish_reasons[i] == "stop"``.
    ``sampling_logprobs[i][n]``: log-probability of token n under the distribution it was drawn from
    (temperature, top-k, top-p applied and renormalised; 0.0 under greedy decoding).
    ``model_logprobs[i][n]``: under the raw model (temperature 1, full vocabulary).
    Log-probabilities are fp32 values.
    """

    response_ids: list[list[int]] = field(default_factory=list)
    sampling_logprobs: list[list[float]] = field(default_factory=list)
    model_logprobs: list[list[float]] = field(default_factory=list)
    finish_reasons: list[FinishReason] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    def extend(self, other: "Rollout") -> None:
        self.response_ids += other.response_ids
        self.sampling_logprobs += other.sampling_logprobs
        self.model_logprobs += other.model_logprobs
        self.finish_reasons += other.finish_reasons


class RolloutEngine(Protocol):
    """Anything that samples responses from the current policy.

    The built-in ``MegatronRolloutEngine`` runs on the training model's own shards. An external engine
    (an inference server holding its own copy of the weights) would implement the same ``generate``
    plus a way to receive the trained weights before each rollout; the trainer only sees ``Rollout``.
    """

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams,
                 keys: Sequence[SampleKey] | None = None) -> Rollout:
        """Sample one response per prompt. ``keys[i]`` seeds row i (default: step 0, prompt id i,
        sample 0). Every rank of a model-parallel group must call it with the same arguments; each
        data-parallel rank passes its own prompts. Returns the same ``Rollout`` on every rank."""
        ...
