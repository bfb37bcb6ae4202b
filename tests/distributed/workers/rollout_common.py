"""Shared pieces of the rollout tests: a tiny HF model converted to megatron shards, HF's greedy
generate as the independent reference, and the trainer-side recomputation of token log-probs.

Used in-process by tests/unit/test_rollout.py (TP=1) and by the multi-process worker
tests/distributed/workers/rollout_worker.py.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))

from megatron_opsd import cpu_compat  # noqa: E402
from megatron_opsd.losses import vocab_parallel_token_logprobs  # noqa: E402
from megatron_opsd.models.description import ModelConfig  # noqa: E402
from megatron_opsd.models.hf_mapping import hf_to_unsharded  # noqa: E402
from megatron_opsd.models.provider import build_model  # noqa: E402
from megatron_opsd.models.sharding import load_unsharded  # noqa: E402
from tests.hf_fixtures import build_hf_model  # noqa: E402

# Prompts of different lengths (1..11 tokens), ids away from the fixture's bos/eos (1, 2).
PROMPTS = [[5, 17, 42, 9, 33, 71, 8], [120, 4], [64, 3, 77, 200, 13, 90, 31, 45, 6, 150, 22], [99],
           [11, 12, 13, 14, 15]]


def hf_model(family: str = "llama", seed: int = 0):
    return build_hf_model(family, seed)


def megatron_from_hf(hf, runtime, build=None) -> tuple[list[torch.nn.Module], ModelConfig]:
    """This rank's GPTModel chunks holding ``hf``'s weights (through the HF name map)."""
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    chunks = build_model(cfg, runtime, build)
    full = dict(hf_to_unsharded(hf.state_dict().items(), cfg))
    load_unsharded(chunks, full, runtime.tp_rank, runtime.tp, tied=cfg.tie_word_embeddings)
    return chunks, cfg


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[int]:
    """HF ``generate(do_sample=False)`` on ``prompt`` alone: the new tokens, the stop token included.
    No stop ids: exactly ``max_new_tokens`` (the model's own eos is not a stop either)."""
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id = list(stop_ids) or None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          generation_config=config, max_new_tokens=max_new_tokens, min_new_tokens=0,
                          do_sample=False, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    for i, t in enumerate(new):  # HF pads rows that stopped early
        if t in stop_ids:
            return new[: i + 1]
    return new


def hf_token_logprobs(hf, prompt: list[int], response: list[int]) -> torch.Tensor:
    """fp64 log-probs of ``response`` under HF's model (T = 1), one forward of prompt + response."""
    tokens = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = hf(input_ids=tokens, use_cache=False).logits[0].double()
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return torch.log_softmax(logits[pos], dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0]


def trainer_logprobs(chunks, runtime, prompts, responses, *, vocab_size: int,
                     temperatures=(1.0,)) -> list[dict[float, torch.Tensor]] | None:
    """The trainer's view: one training-style forward of each prompt + response (no KV cache, through
    megatron-core's pipeline schedule, forward only), then ``vocab_parallel_token_logprobs`` on the
    vocab-sharded logits at the response positions. Returns, on the last pipeline stage, per row
    {temperature: fp32 [n]}; None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows = [p + r for p, r in zip(prompts, responses)]
    seq = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), seq, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)  # right padding: never seen by earlier positions
    position_ids = torch.arange(seq).expand(len(rows), seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None].expand(len(rows), 1, seq, seq)
    tp_group = runtime.tp_group if runtime.tp > 1 else None
    out: list[dict[float, torch.Tensor]] = []

    def forward_step(data_iterator, model):
        next(data_iterator)
        logits = model(tokens, position_ids, mask)

        def loss_func(logits_blv):
            for i, (p, r) in enumerate(zip(prompts, responses)):
                pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
                ids = torch.tensor(r)
                out.append({t: vocab_parallel_token_logprobs(logits_blv[i, pos], ids, temperature=t,
                                                             vocab_size=vocab_size, tp_group=tp_group)
                            for t in temperatures})
            return torch.zeros(()), {}

        return logits, loss_func

    for c in chunks:
        c.eval()
    iterators = [iter([0]) for _ in chunks] if len(chunks) > 1 else iter([0])
    with torch.no_grad(), cpu_compat.placement_context():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iterators,
                                    model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
                                    seq_length=seq, micro_batch_size=len(rows), forward_only=True)
    for c in chunks:
        c.train()
    return out if runtime.is_last_stage else None


def tiny_hf_vocab() -> int:
    """Vocabulary of the tiny model tools/generate.py is tested with: the fixture tokenizer's size."""
    return 402
