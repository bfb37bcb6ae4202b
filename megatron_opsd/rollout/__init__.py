"""On-policy rollout: sample responses from the current student, seeded, with per-token log-probs.

``RolloutEngine`` is the interface (``generate(prompt_token_ids, sampling, keys) -> Rollout``);
``MegatronRolloutEngine`` is the built-in engine on the training shards (KV cache, TP/PP/DP).
"""

from megatron_opsd.rollout.megatron_engine import MegatronRolloutEngine
from megatron_opsd.rollout.types import Rollout, RolloutEngine, SampleKey, SamplingParams

__all__ = ["MegatronRolloutEngine", "Rollout", "RolloutEngine", "SampleKey", "SamplingParams"]
