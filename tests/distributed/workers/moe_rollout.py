"""Rollout of a mixture of experts at EP2 (2 processes, DP2): the two data-parallel ranks share the
experts (alltoall every forward) but hold different prompts that finish at different steps, and one rank
has two batches (max_batch_size=2) while the other has one; every rank must keep taking part in the
forwards of the other (the classic EP rollout hang: here a 1-minute collective timeout turns a hang into
an error). Greedy tokens equal HF generate(do_sample=False) on each prompt alone. The ranks' forward
counts differ (rank 0: 10 + 10 then none; rank 1: 10 then 1), so without lockstep they would not pair up.

usage: torchrun --nproc_per_node=2 moe_rollout.py
"""

from __future__ import annotations

import tempfile


from common import rank_print
from rollout_common import PROMPTS, hf_greedy
from megatron_opsd.models.description import ModelConfig
from megatron_opsd.models.hf_mapping import hf_to_unsharded
from megatron_opsd.models.provider import build_model
from megatron_opsd.models.sharding import ExpertLayout, load_unsharded
from megatron_opsd.parallel import ParallelConfig, init_parallel
from megatron_opsd.rollout import MegatronRolloutEngine, SamplingParams
from tests.hf_fixtures import build_hf_model

MAX_NEW = 10
RANK_PROMPTS = [[PROMPTS[0], PROMPTS[2], PROMPTS[4]], [PROMPTS[3]]]  # rank 0: 2 batches, rank 1: 1


def main() -> None:
    from safetensors.torch import load_file

    hf = build_hf_model("qwen3_moe")
    with tempfile.TemporaryDirectory(prefix="moe-rollout-") as d:  # checkpoint names (per expert)
        hf.save_pretrained(d)
        tensors = load_file(f"{d}/model.safetensors")
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    # a stop token the first prompt reaches at its 3rd step: its row finishes early, the others do not
    stop = hf_greedy(hf, PROMPTS[0], MAX_NEW, ())[2]
    sampling = SamplingParams(greedy=True, max_new_tokens=MAX_NEW, stop_ids=(stop,))
    runtime = init_parallel(ParallelConfig(ep=2, timeout_minutes=1), seed=3)
    chunks = build_model(cfg, runtime)
    load_unsharded(chunks, dict(hf_to_unsharded(tensors.items(), cfg, names=set(tensors))), runtime.tp_rank,
                   runtime.tp, tied=cfg.tie_word_embeddings, experts=ExpertLayout.of(runtime))
    engine = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size, max_batch_size=2)
    prompts = RANK_PROMPTS[runtime.dp_rank]
    out = engine.generate(prompts, sampling)
    lengths = []
    for prompt, got in zip(prompts, out.response_ids):
        expected = hf_greedy(hf, prompt, MAX_NEW, (stop,))
        assert got == expected, f"rank {runtime.rank} prompt {prompt}: {got} vs HF {expected}"
        lengths.append(len(got))
    print(f"[rank {runtime.rank}] EP2: {len(prompts)} prompt(s), response lengths {lengths}: greedy == HF generate",
          flush=True)
    mine = [PROMPTS[0]] if runtime.dp_rank == 1 else []  # rank 0 has no prompts while its peer decodes
    again = engine.generate(mine, sampling)
    assert again.response_ids == [hf_greedy(hf, p, MAX_NEW, (stop,)) for p in mine]
    print(f"[rank {runtime.rank}] EP2 with {len(mine)} prompt(s) vs the peer's {1 - len(mine)}: no hang", flush=True)
    runtime.destroy()
    rank_print("moe_rollout: all checks passed")


if __name__ == "__main__":
    main()
