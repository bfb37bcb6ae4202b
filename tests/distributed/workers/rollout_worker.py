"""Rollout under TP / PP / VPP / DP layouts vs TP=1 and HF transformers, in one 4-process launch.

Every rank first computes the references itself: HF greedy continuations of each prompt alone, and
the TP=1 engine's samples (paper settings: T=1.1, top-k 20, top-p 0.95; and full-vocabulary top-p).
Then, per layout (the 4 processes split into TP x PP x DP; DP ranks take every dp-th prompt):
  * greedy tokens equal HF generate(do_sample=False) on each prompt alone;
  * sampled tokens equal the TP=1 samples for the same (seed, step, prompt, sample) keys, and their
    log-probs agree within 1e-5;
  * (TP2+SP x PP2) the same with sequence parallelism on for training (decoding runs it off), and
    the flag is restored afterwards;
  * (TP2xCP2) the same with context parallelism (the test-only attention of tests/cp_attention.py for
    training): decoding does not split sequences, the CP ranks decode the same prompts like TP peers;
  * (TP2xPP2) KV-cached == no-cache recompute; reported log-probs == the trainer's recomputation
    (megatron-core schedule + vocab_parallel_token_logprobs) within 1e-5; a prompt alone == in a batch.
Sampler alone (TP2, TP4): the same random logits split over ranks give exactly the TP=1 samples.

usage: torchrun --nproc_per_node=4 rollout_worker.py
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from rollout_common import PROMPTS, hf_greedy, hf_model, megatron_from_hf, trainer_logprobs
from common import rank_print
from megatron_opsd.models.provider import ModelBuildConfig
from megatron_opsd.parallel import ParallelConfig, init_parallel
from megatron_opsd.rollout import MegatronRolloutEngine, SampleKey, SamplingParams
from megatron_opsd.rollout import noise
from tests.cp_attention import use_cp_test_attention
from megatron_opsd.losses.sharding import vocab_shard
from megatron_opsd.rollout.sampler import sample_next

TOL = 1e-5
MAX_NEW = 12
KEYS = [SampleKey(step=2, prompt_id=i, sample_idx=0) for i in range(len(PROMPTS))]
SAMPLED = {
    "paper": SamplingParams(temperature=1.1, top_k=20, top_p=0.95, max_new_tokens=MAX_NEW, seed=7),
    "top-p": SamplingParams(temperature=1.1, top_p=0.9, max_new_tokens=MAX_NEW, seed=8),
}
GREEDY = SamplingParams(greedy=True, max_new_tokens=MAX_NEW, stop_ids=(2,))


def worst(value: float) -> float:
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def max_err(a, b) -> float:
    """Largest |a - b| over rows of per-token values (lists or tensors)."""
    return max((torch.as_tensor(x, dtype=torch.float64) - torch.as_tensor(y, dtype=torch.float64)).abs().max().item()
               for x, y in zip(a, b))


def references(hf):
    runtime = init_parallel(ParallelConfig(tp=1, pp=1), seed=1)
    chunks, cfg = megatron_from_hf(hf, runtime)
    engine = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size)
    refs = {name: engine.generate(PROMPTS, params, KEYS) for name, params in SAMPLED.items()}
    runtime.destroy()
    return refs


def check_layout(name, hf, greedy_ref, sampled_ref, *, tp=1, pp=1, vpp=None, sp=False, cp=1, extra=False):
    start = time.time()
    runtime = init_parallel(ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp, cp=cp), seed=1)
    chunks, cfg = megatron_from_hf(hf, runtime, ModelBuildConfig())
    mine = list(range(runtime.dp_rank, len(PROMPTS), runtime.dp))  # this DP rank's prompts
    prompts, keys = [PROMPTS[i] for i in mine], [KEYS[i] for i in mine]
    engine = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size)

    greedy = engine.generate(prompts, GREEDY, keys)
    for i, ids in zip(mine, greedy.response_ids):
        assert ids == greedy_ref[i], f"{name}: greedy prompt {i}: {ids} != HF {greedy_ref[i]}"
    lp_err = 0.0
    for kind, ref in sampled_ref.items():
        got = engine.generate(prompts, SAMPLED[kind], keys)
        for j, i in enumerate(mine):
            assert got.response_ids[j] == ref.response_ids[i], (
                f"{name} {kind}: prompt {i} sampled {got.response_ids[j]} != TP1 {ref.response_ids[i]}")
        lp_err = max(lp_err, max_err(got.model_logprobs, [ref.model_logprobs[i] for i in mine]),
                     max_err(got.sampling_logprobs, [ref.sampling_logprobs[i] for i in mine]))
    assert lp_err <= TOL, f"{name}: log-probs differ from TP1 by {lp_err}"
    if sp:  # decoding ran with SP off; training's SP is back on
        config = chunks[0].config
        flags = [m.sequence_parallel for m in chunks[0].modules() if hasattr(m, "sequence_parallel")]
        assert config.sequence_parallel and flags and all(flags), f"{name}: sequence parallelism not restored"
    line = f"{name:<10} dp={runtime.dp} greedy==HF sampled==TP1 max|dlogp vs TP1|={worst(lp_err):.1e}"

    if extra:
        params = SAMPLED["paper"]
        cached = engine.generate(prompts, params, keys)
        nocache = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size, kv_cache=False).generate(
            prompts, params, keys)
        assert cached.response_ids == nocache.response_ids, f"{name}: KV cache != recompute"
        cache_err = max(max_err(cached.model_logprobs, nocache.model_logprobs),
                        max_err(cached.sampling_logprobs, nocache.sampling_logprobs))
        assert cache_err <= TOL, f"{name}: KV cache log-probs differ by {cache_err}"
        plain = SamplingParams(temperature=1.1, max_new_tokens=MAX_NEW, seed=9)
        train_err = 0.0
        for p in (params, plain):
            got = engine.generate(prompts, p, keys)
            ref = trainer_logprobs(chunks, runtime, prompts, got.response_ids, vocab_size=cfg.vocab_size,
                                   temperatures=(1.0, p.temperature))
            if ref is not None:
                train_err = max(train_err, max_err(got.model_logprobs, [r[1.0] for r in ref]))
                if p is plain:  # untruncated sampling distribution: the trainer's softmax at T
                    train_err = max(train_err, max_err(got.sampling_logprobs, [r[p.temperature] for r in ref]))
        assert train_err <= TOL, f"{name}: log-probs differ from the trainer's recomputation by {train_err}"
        alone = engine.generate(prompts[-1:], params, keys[-1:])
        assert alone.response_ids[0] == cached.response_ids[-1], f"{name}: alone != in batch"
        # GRPO's n samples per prompt: one prefill per prompt, its cache replicated across stages' layers
        group_prompts = [p for p in prompts for _ in range(3)]
        group_keys = [SampleKey(step=1, prompt_id=j // 3, sample_idx=j % 3) for j in range(len(group_prompts))]
        shared = engine.generate(group_prompts, params, group_keys)
        independent = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size, shared_prefill=False).generate(
            group_prompts, params, group_keys)
        assert shared.response_ids == independent.response_ids, f"{name}: shared prefill != independent"
        assert engine.stats["prefill_rows"] == len(prompts)
        line += (f" | kv==nocache max|dlogp|={worst(cache_err):.1e} vs trainer max|dlogp|={worst(train_err):.1e}"
                 " alone==batch shared-prefill==independent")
    rank_print(f"{line} ({time.time() - start:.1f}s)")
    runtime.destroy()


def check_sampler_layouts():
    """The sampler alone: TP-split logits give bit-identical samples to the unsplit ones."""
    vocab, padded, rows = 250, 252, 48
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(rows, padded, generator=gen) * 2
    logits[:8] = 0.5  # constant rows: ties everywhere
    logits[8:16, 100:180] = 4.0  # ties across the TP boundaries
    logits[:, vocab:] = 30.0  # padding must never win
    keys = noise.row_keys(4, [SampleKey(1, i, 0) for i in range(rows)], 0, torch.device("cpu"))
    cases = [SamplingParams(greedy=True), *SAMPLED.values(), SamplingParams(top_k=5), SamplingParams()]
    full = [sample_next(logits, keys, p, vocab_shard(padded, vocab, None)) for p in cases]
    for tp in (2, 4):
        runtime = init_parallel(ParallelConfig(tp=tp), seed=1)
        width = padded // tp
        shard = logits[:, runtime.tp_rank * width:(runtime.tp_rank + 1) * width]
        for p, ref in zip(cases, full):
            got = sample_next(shard, keys, p, vocab_shard(width, vocab, runtime.tp_group))
            assert torch.equal(got.token_ids, ref.token_ids), f"sampler TP{tp} {p}: tokens differ"
            torch.testing.assert_close(got.sampling_logprobs, ref.sampling_logprobs, atol=1e-12, rtol=1e-12)
            # the model's log-sum-exp: fp32 per-rank sums on the top-k path (regrouped by the split:
            # ~2e-7 observed), fp64 on the full-vocabulary path
            model_tol = 1e-6 if p.greedy or p.top_k else 1e-12
            torch.testing.assert_close(got.model_logprobs, ref.model_logprobs, atol=model_tol, rtol=0)
        rank_print(f"sampler TP{tp}: {len(cases)} settings x {rows} rows == TP1 exactly")
        runtime.destroy()


def main() -> None:
    hf = hf_model("llama")  # GQA, llama3 RoPE scaling, vocab 250 (padded to 252 at TP4)
    greedy_ref = [hf_greedy(hf, p, MAX_NEW, GREEDY.stop_ids) for p in PROMPTS]
    sampled_ref = references(hf)
    check_sampler_layouts()
    check_layout("TP2xPP2", hf, greedy_ref, sampled_ref, tp=2, pp=2, extra=True)
    check_layout("TP2", hf, greedy_ref, sampled_ref, tp=2)
    check_layout("TP2+SPxPP2", hf, greedy_ref, sampled_ref, tp=2, pp=2, sp=True)
    check_layout("TP4", hf, greedy_ref, sampled_ref, tp=4)
    check_layout("PP2", hf, greedy_ref, sampled_ref, pp=2)
    check_layout("PP2xVPP2", hf, greedy_ref, sampled_ref, pp=2, vpp=2)
    check_layout("TP1 (DP4)", hf, greedy_ref, sampled_ref)
    use_cp_test_attention()
    check_layout("TP2xCP2", hf, greedy_ref, sampled_ref, tp=2, cp=2)
    rank_print("rollout: all checks passed")


if __name__ == "__main__":
    main()
