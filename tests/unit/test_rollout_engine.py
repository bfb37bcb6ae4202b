"""The rollout engine at TP=1 in one process, against HF transformers on converted tiny models.

Independent references: HF ``generate(do_sample=False)`` on each prompt alone (greedy tokens) and HF's
forward (model log-probs); the trainer's recomputation (a training-style forward through megatron-core's
schedule + ``vocab_parallel_token_logprobs``) for the reported log-probs. Multi-process layouts
(TP2, PP2, TP2xPP2, VPP, DP) are in tests/distributed/test_rollout.py.

Tolerances: reported log-probs vs recomputation 1e-5 (the issue's bar; fp32 logits of O(1-10) from a
KV-cached vs a full forward differ by a few ulps, observed ~1.5e-6).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opsd.rollout import MegatronRolloutEngine, SampleKey, SamplingParams
from megatron_opsd.rollout.attention import RolloutAttention
from tests.distributed.workers.rollout_common import (PROMPTS, hf_greedy, hf_model, hf_token_logprobs,
                                                      megatron_from_hf, trainer_logprobs)

LOGPROB_TOL = 1e-5
PAPER = SamplingParams(temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=12, seed=17)
RUNTIME_SEED = 1  # the conftest runtime's seed in this module


@pytest.fixture(scope="module")
def llama(runtime):
    hf = hf_model("llama")
    chunks, cfg = megatron_from_hf(hf, runtime)
    return hf, chunks, cfg


def engine(model, runtime, **kwargs):
    _, chunks, cfg = model
    return MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_equals_hf_generate_on_each_prompt_alone(runtime, family):
    """Batched prompts of 1..11 tokens (left-padded together) give HF's tokens for each prompt alone;
    llama has llama3 RoPE scaling and GQA, qwen3 q/k norms and tied embeddings."""
    hf = hf_model(family)
    chunks, cfg = megatron_from_hf(hf, runtime)
    max_new = 16
    # a stop id that HF's greedy continuation of prompt 0 reaches early, so both finish reasons occur
    stop = hf_greedy(hf, PROMPTS[0], max_new, ())[3]
    rollout = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size).generate(
        PROMPTS, SamplingParams(greedy=True, max_new_tokens=max_new, stop_ids=(stop,)))
    for prompt, ids, reason in zip(PROMPTS, rollout.response_ids, rollout.finish_reasons):
        expected = hf_greedy(hf, prompt, max_new, (stop,))
        assert ids == expected, f"prompt {prompt}: ours {ids} != HF {expected}"
        assert reason == ("stop" if ids[-1] == stop else "length")
        assert len(ids) == max_new or reason == "stop"
    assert rollout.finish_reasons[0] == "stop" and len(rollout.response_ids[0]) <= 4
    assert "length" in rollout.finish_reasons
    assert all(lp == 0.0 for row in rollout.sampling_logprobs for lp in row)  # greedy: a point mass


def test_finished_rows_are_compacted_away(runtime, llama):
    """Rows that stop leave the static batch (and the KV cache); the others still match HF."""
    hf, _, _ = llama
    max_new = 12
    continuations = [hf_greedy(hf, p, max_new, ()) for p in PROMPTS]
    assert all(len(c) == max_new for c in continuations)
    stops = (continuations[0][1], continuations[1][3], continuations[2][5])
    for kv_cache in (True, False):
        eng = engine(llama, runtime, kv_cache=kv_cache)
        rollout = eng.generate(PROMPTS, SamplingParams(greedy=True, max_new_tokens=max_new, stop_ids=stops))
        for prompt, ids in zip(PROMPTS, rollout.response_ids):
            assert ids == hf_greedy(hf, prompt, max_new, stops)
        assert rollout.finish_reasons.count("stop") >= 3
        assert eng.stats["compactions"] >= 1
        assert eng.stats["row_steps"] < len(PROMPTS) * max(len(r) for r in rollout.response_ids)
        assert eng.stats["tokens"] == sum(len(r) for r in rollout.response_ids)


def test_logprobs_equal_trainer_recomputation_and_hf(runtime, llama):
    hf, chunks, cfg = llama
    plain = SamplingParams(temperature=1.1, max_new_tokens=12, seed=3)  # untruncated: trainer's T=1.1
    for params in (PAPER, plain):
        rollout = engine(llama, runtime).generate(PROMPTS, params)
        ref = trainer_logprobs(chunks, runtime, PROMPTS, rollout.response_ids, vocab_size=cfg.vocab_size,
                               temperatures=(1.0, params.temperature))
        for i, prompt in enumerate(PROMPTS):
            model_lp = torch.tensor(rollout.model_logprobs[i])
            assert len(model_lp) == len(rollout.response_ids[i]) > 0
            torch.testing.assert_close(model_lp, ref[i][1.0], atol=LOGPROB_TOL, rtol=0)
            torch.testing.assert_close(model_lp.double(), hf_token_logprobs(hf, prompt, rollout.response_ids[i]),
                                       atol=LOGPROB_TOL, rtol=0)
            sampling_lp = torch.tensor(rollout.sampling_logprobs[i])
            if params is plain:
                torch.testing.assert_close(sampling_lp, ref[i][params.temperature], atol=LOGPROB_TOL, rtol=0)
            else:  # truncation renormalises: the sampled token gets more mass than under plain softmax
                assert (sampling_lp >= ref[i][params.temperature] - LOGPROB_TOL).all()


def test_kv_cache_equals_no_cache_recompute(runtime, llama):
    stops = tuple(range(0, 250, 7))  # ~14% of the vocabulary: rows stop at different steps
    for params in (PAPER, SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=10, seed=1),
                   SamplingParams(greedy=True, max_new_tokens=10),
                   SamplingParams(temperature=1.1, top_k=20, max_new_tokens=16, seed=2, stop_ids=stops)):
        cached = engine(llama, runtime).generate(PROMPTS, params)
        recomputed = engine(llama, runtime, kv_cache=False).generate(PROMPTS, params)
        assert cached.response_ids == recomputed.response_ids
        assert cached.finish_reasons == recomputed.finish_reasons
        if params.stop_ids:
            assert 0 < cached.finish_reasons.count("stop") < len(PROMPTS)
        for a, b in zip(cached.model_logprobs + cached.sampling_logprobs,
                        recomputed.model_logprobs + recomputed.sampling_logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=LOGPROB_TOL, rtol=0)


def test_samples_do_not_depend_on_batch_composition(runtime, llama):
    keys = [SampleKey(step=5, prompt_id=100 + i, sample_idx=0) for i in range(len(PROMPTS))]
    batched = engine(llama, runtime).generate(PROMPTS, PAPER, keys)
    order = [3, 0, 4, 2, 1]
    shuffled = engine(llama, runtime, max_batch_size=2).generate([PROMPTS[i] for i in order], PAPER,
                                                                [keys[i] for i in order])
    for j, i in enumerate(order):
        alone = engine(llama, runtime).generate([PROMPTS[i]], PAPER, [keys[i]])
        assert alone.response_ids[0] == batched.response_ids[i] == shuffled.response_ids[j]
    # and the keys matter: another sample index gives other samples
    other = engine(llama, runtime).generate(PROMPTS, PAPER, [SampleKey(5, 100 + i, 1) for i in range(len(PROMPTS))])
    assert other.response_ids != batched.response_ids


def test_shared_prefill_equals_independent_prompts(runtime, llama):
    """n samples per prompt (GRPO) prefilled once per prompt, cache replicated: the same samples as
    the rows prefilled independently (and as each prompt alone), with rows stopping at different steps
    so the replicated cache is also compacted."""
    n, stops = 4, tuple(range(0, 250, 9))
    prompts = [p for p in PROMPTS for _ in range(n)]
    keys = [SampleKey(step=2, prompt_id=i // n, sample_idx=i % n) for i in range(len(prompts))]
    params = SamplingParams(temperature=1.1, top_k=20, max_new_tokens=12, seed=3, stop_ids=stops)
    shared_engine = engine(llama, runtime)
    shared = shared_engine.generate(prompts, params, keys)
    assert shared_engine.stats["prefill_rows"] == len(PROMPTS)
    independent_engine = engine(llama, runtime, shared_prefill=False)
    independent = independent_engine.generate(prompts, params, keys)
    assert independent_engine.stats["prefill_rows"] == len(prompts)
    assert shared.response_ids == independent.response_ids
    assert shared.finish_reasons == independent.finish_reasons
    assert len({tuple(r) for r in shared.response_ids[:n]}) > 1  # the samples of a prompt differ
    for a, b in zip(shared.model_logprobs + shared.sampling_logprobs,
                    independent.model_logprobs + independent.sampling_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=LOGPROB_TOL, rtol=0)
    alone = engine(llama, runtime).generate([prompts[6]], params, [keys[6]])
    assert alone.response_ids[0] == shared.response_ids[6]


def test_eval_no_grad_during_rollout_then_train_mode_and_cache_freed(runtime, llama, monkeypatch):
    from megatron.core.inference import contexts

    hf, chunks, cfg = llama
    seen, created = [], []
    original = contexts.StaticInferenceContext

    class Recording(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(contexts, "StaticInferenceContext", Recording)
    hook = chunks[0].decoder.register_forward_pre_hook(
        lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    try:
        chunks[0].train()
        engine(llama, runtime).generate(PROMPTS[:2], SamplingParams(max_new_tokens=3))
    finally:
        hook.remove()
    assert seen and all(mode == (False, False) for mode in seen)
    assert chunks[0].training
    assert len(created) == 1 and created[0].key_value_memory_dict == {}
    assert created[0].max_batch_size == 2


def test_bad_requests_raise(runtime, llama):
    eng = engine(llama, runtime)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[3], []], PAPER)
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[3, 10_000]], PAPER)
    with pytest.raises(ValueError, match="sample keys"):
        eng.generate([[3]], PAPER, keys=[SampleKey(), SampleKey()])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kv_cache_is_row_major_per_head_and_fp32_on_cpu(runtime, dtype, monkeypatch):
    """megatron's static cache as views of [batch, groups, seq, dim] memory (each row's and group's keys
    one contiguous block for SDPA), fp32 on CPU (where attention runs in fp32: a bf16 cache would be
    converted whole at every step); a bf16 model's log-probs follow the
    trainer's bf16 recomputation (bf16 logits of O(10) carry up to 0.03 of rounding each; observed
    differences <= 0.021)."""
    from megatron.core.inference import contexts

    from megatron_opsd.models.provider import ModelBuildConfig

    hf = hf_model("llama")
    chunks, cfg = megatron_from_hf(hf, runtime, ModelBuildConfig(dtype=dtype))
    created, layouts = [], []

    class Recording(contexts.StaticInferenceContext):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    def record(module, args):
        layouts.extend((t.dtype, t.permute(1, 2, 0, 3).is_contiguous())
                       for kv in created[-1].key_value_memory_dict.values() for t in kv)

    monkeypatch.setattr(contexts, "StaticInferenceContext", Recording)
    hook = chunks[0].output_layer.register_forward_pre_hook(record)
    try:
        params = SamplingParams(temperature=1.1, max_new_tokens=8, seed=3)
        rollout = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size).generate(PROMPTS, params)
    finally:
        hook.remove()
    assert len(layouts) == 8 * 2 * cfg.num_hidden_layers
    assert set(layouts) == {(torch.float32, True)}
    ref = trainer_logprobs(chunks, runtime, PROMPTS, rollout.response_ids, vocab_size=cfg.vocab_size)
    tol = 0.05 if dtype == "bf16" else LOGPROB_TOL
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(torch.tensor(rollout.model_logprobs[i]), ref[i][1.0], atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_packed_weights_compute_what_the_default_kernels_do(runtime, dtype):
    """CPU decoding on oneDNN-prepacked weights (``rollout/packed_linear.py``) against the same engine on
    torch's default kernels: bf16 bit for bit (the same oneDNN kernel, weights pre-reordered), fp32 the
    same tokens and log-probs within 1e-5 (MKL's sgemm sums in another order). The packed path is
    taken for every linear and nothing of it outlives the call."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_opsd.models.provider import ModelBuildConfig
    from megatron_opsd.rollout.packed_linear import packed_kernel_available

    if not packed_kernel_available():
        pytest.skip("this torch build has no oneDNN packed linear")
    chunks, cfg = megatron_from_hf(hf_model("llama"), runtime, ModelBuildConfig(dtype=dtype))
    linears = [m for m in chunks[0].modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    runs = {}
    for packed in (True, False):
        eng = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size, packed_weights=packed)
        runs[packed] = eng.generate(PROMPTS, PAPER)
        products = eng.stats["packed_products"]
        steps = max(len(r) for r in runs[packed].response_ids)
        assert products == (len(linears) * steps if packed else 0)
        assert not any("_forward_impl" in vars(m) for m in linears)
    assert runs[True].response_ids == runs[False].response_ids
    for a, b in zip(runs[True].model_logprobs, runs[False].model_logprobs):
        if dtype == "bf16":
            assert a == b
        else:
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_packed_weights_leave_replaced_linears_alone(runtime, llama):
    """A linear whose ``_forward_impl`` someone else replaced on the instance (LoRA's row-parallel
    adapters) keeps it: packing would drop that wrapper's work."""
    from megatron.core.tensor_parallel import RowParallelLinear

    from megatron_opsd.rollout.packed_linear import PackedLinears

    _, chunks, _ = llama
    row = next(m for m in chunks[0].modules() if isinstance(m, RowParallelLinear))
    wrapper = row._forward_impl
    row._forward_impl = wrapper
    try:
        packed = PackedLinears([chunks[0]], rows=2)
        assert row not in packed.linears and packed.linears
        packed.install()
        assert row._forward_impl is wrapper
        packed.remove()
        assert row._forward_impl is wrapper
    finally:
        del row._forward_impl


def test_unpadded_batches_attend_without_a_mask(runtime, llama, monkeypatch):
    """Prompts of one length need no attention mask (causal prefill, then every cached key; causal at
    every step without the cache): the same tokens as HF on each prompt alone and the trainer's
    log-probs, with no mask ever built."""
    hf, chunks, cfg = llama
    prompts = [p[:4] for p in PROMPTS if len(p) >= 4]
    assert len(prompts) >= 2
    masks = []
    set_inputs = RolloutAttention.set_inputs

    def recording(self, positions, keep, dtype):
        masks.append(keep)
        set_inputs(self, positions, keep, dtype)

    monkeypatch.setattr(RolloutAttention, "set_inputs", recording)
    greedy_params = SamplingParams(greedy=True, max_new_tokens=8)
    greedy = engine(llama, runtime).generate(prompts, greedy_params)
    recomputed = engine(llama, runtime, kv_cache=False).generate(prompts, greedy_params)  # causal every step
    for prompt, ids, again in zip(prompts, greedy.response_ids, recomputed.response_ids):
        assert ids == again == hf_greedy(hf, prompt, 8, ())
    plain = SamplingParams(temperature=1.1, max_new_tokens=8, seed=3)
    sampled = engine(llama, runtime).generate(prompts, plain)
    ref = trainer_logprobs(chunks, runtime, prompts, sampled.response_ids, vocab_size=cfg.vocab_size,
                           temperatures=(1.0, plain.temperature))
    for i in range(len(prompts)):
        torch.testing.assert_close(torch.tensor(sampled.model_logprobs[i]), ref[i][1.0], atol=LOGPROB_TOL, rtol=0)
    assert masks and all(m is None for m in masks)
    engine(llama, runtime).generate(PROMPTS, plain)  # prompts of several lengths: masked
    assert masks[-1] is not None


def test_decode_steps_leave_the_placement_mode_with_the_same_samples(runtime, llama):
    """At TP=1 every decode step after the probe runs outside cpu_compat's placement mode; the samples
    and log-probs are those of a rollout that keeps the mode throughout."""
    fast = engine(llama, runtime)
    free = fast.generate(PROMPTS, PAPER)
    assert fast.stats["steps_outside_placement_mode"] == PAPER.max_new_tokens - 2  # prefill, probe
    slow = engine(llama, runtime, leave_placement_mode=False)
    kept = slow.generate(PROMPTS, PAPER)
    assert slow.stats["steps_outside_placement_mode"] == 0
    assert free.response_ids == kept.response_ids
    assert free.model_logprobs == kept.model_logprobs and free.sampling_logprobs == kept.sampling_logprobs
