"""Single-process (TP=1) tests of the rollout sampler and its noise.

References: HF transformers' own logits warpers (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper, applied in generate's order) define the allowed set and the sampling distribution;
python-int SplitMix64 defines the hash. The multi-process worker (rollout_worker.py) checks that the
same logits split over TP=2/4 give identical samples.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opsd.rollout import noise
from megatron_opsd.losses.sharding import vocab_shard
from megatron_opsd.rollout.sampler import sample_next
from megatron_opsd.rollout.types import SampleKey, SamplingParams


def keys_for(n: int, seed: int = 0, position: int = 0) -> torch.Tensor:
    return noise.row_keys(seed, [SampleKey(step=3, prompt_id=i, sample_idx=1) for i in range(n)], position,
                          torch.device("cpu"))


def hf_warped(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF generate's warped scores (fp64): -inf outside the allowed set."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(params.temperature)(None, logits.double())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores


# ---- noise ---------------------------------------------------------------------------------------
def test_tensor_hash_equals_python_reference():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-2**63, 2**63 - 1, (2000,), generator=gen, dtype=torch.int64)
    words = torch.cat([words, torch.tensor([0, 1, -1, 2**63 - 1, -2**63])])
    ours = noise.mix64(words).tolist()
    expected = [noise._signed(noise.mix64_int(w & noise._MASK64)) for w in words.tolist()]
    assert ours == expected


def test_noise_is_a_function_of_its_coordinates():
    ids = torch.arange(50)
    a = noise.uniform(keys_for(4), ids)
    assert torch.equal(a, noise.uniform(keys_for(4), ids))  # deterministic
    assert ((a > 0) & (a < 1)).all()
    # every coordinate changes the stream
    base = noise.row_key(7, SampleKey(1, 2, 3), 4)
    others = [noise.row_key(8, SampleKey(1, 2, 3), 4), noise.row_key(7, SampleKey(0, 2, 3), 4),
              noise.row_key(7, SampleKey(1, 3, 3), 4), noise.row_key(7, SampleKey(1, 2, 4), 4),
              noise.row_key(7, SampleKey(1, 2, 3), 5), noise.row_key(7, SampleKey(1, 3, 2), 4)]
    assert len({base, *others}) == len(others) + 1
    # a token's noise depends on its global id only, not on where the slice starts
    keys = keys_for(3)
    assert torch.equal(noise.uniform(keys, torch.arange(20, 40)), noise.uniform(keys, torch.arange(0, 40))[:, 20:])


def test_gumbel_moments():
    g = noise.gumbel(keys_for(1, seed=11), torch.arange(200_000))[0]
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


# ---- sampler semantics vs HF warpers -------------------------------------------------------------
CASES = [
    SamplingParams(temperature=1.1, top_k=20, top_p=0.95),  # the paper's settings
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),  # full-vocabulary path with the nucleus bisection
    SamplingParams(temperature=1.0),  # plain sampling, full vocabulary
    SamplingParams(temperature=2.0, top_k=40, top_p=0.3),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_samples_lie_in_hf_allowed_set_with_hf_logprobs(params):
    vocab, padded, rows = 83, 88, 64
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, padded, generator=gen) * 3
    logits[:, vocab:] = 50.0  # padding columns: never sampled even when they are the largest
    sample = sample_next(logits, keys_for(rows), params, vocab_shard(padded, vocab, None))
    warped = hf_warped(logits[:, :vocab], params)
    ids = sample.token_ids
    assert (ids < vocab).all()
    assert torch.isfinite(warped.gather(1, ids[:, None])).all(), "sampled a token HF would have filtered"
    expected_sampling = torch.log_softmax(warped, dim=-1).gather(1, ids[:, None])[:, 0]
    expected_model = torch.log_softmax(logits[:, :vocab].double(), dim=-1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(sample.sampling_logprobs, expected_sampling, atol=1e-9, rtol=1e-9)
    # the model's log-sum-exp over the vocabulary: fp32 on the top-k path (exponentials within ~1 ulp,
    # 6e-8 relative, and their sum: ~1e-7 here), fp64 on the full-vocabulary path
    model_tol = 1e-6 if params.top_k else 1e-9
    torch.testing.assert_close(sample.model_logprobs, expected_model, atol=model_tol, rtol=0)
    # the filters bind (the test would prove little otherwise)
    num_allowed = torch.isfinite(warped).sum(dim=1)
    if params.top_k or params.top_p < 1:
        assert (num_allowed < vocab).all() and (num_allowed > 1).any()


@pytest.mark.parametrize("params", [CASES[0], CASES[2], CASES[3]], ids=["topk-topp", "topp", "plain"])
def test_sample_frequencies_match_the_warped_distribution(params):
    """Gumbel-max with our noise draws from softmax(warped scores): 40k rows with distinct keys."""
    vocab, rows = 30, 40_000
    logits = (torch.randn(1, vocab, generator=torch.Generator().manual_seed(2)) * 1.5).expand(rows, vocab)
    ids = sample_next(logits, keys_for(rows, seed=5), params, vocab_shard(vocab, vocab, None)).token_ids
    freq = torch.bincount(ids, minlength=vocab).double() / rows
    probs = torch.softmax(hf_warped(logits[:1], params)[0], dim=-1)
    # binomial std <= sqrt(0.25 / 40000) = 0.0025; 0.012 is ~5 std
    assert (freq - probs).abs().max() < 0.012, (freq, probs)
    assert (freq[probs == 0] == 0).all()


def test_greedy_is_argmax_with_lowest_id_on_ties():
    vocab = 10
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 99.0, 99.0],
                           [1.0] * 12])
    s = sample_next(logits, keys_for(3), SamplingParams(greedy=True), vocab_shard(12, vocab, None))
    assert s.token_ids.tolist() == [1, 0, 0]
    assert s.sampling_logprobs.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(s.model_logprobs,
                               torch.log_softmax(logits[:, :vocab].double(), -1)[[0, 1, 2], [1, 0, 0]])


def test_top_k_ties_keep_exactly_k_lowest_ids():
    """Constant logits (e.g. a zero output layer): top-k keeps ids 0..k-1, uniformly."""
    rows, k = 4000, 4
    logits = torch.zeros(rows, 16)
    s = sample_next(logits, keys_for(rows), SamplingParams(top_k=k), vocab_shard(16, 16, None))
    assert set(s.token_ids.tolist()) == set(range(k))
    torch.testing.assert_close(s.sampling_logprobs, torch.full((rows,), -math.log(k), dtype=torch.float64))


def test_sampling_params_validation():
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                dict(max_new_tokens=0), dict(stop_ids=(-3,))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


@pytest.mark.parametrize("levels", [3, 40, 1000], ids=["many-ties", "some-ties", "few-ties"])
def test_local_top_k_breaks_ties_towards_lower_ids(levels):
    """The k largest per row, ties at the k-th value towards the lower column, against python's sort
    by (value descending, column ascending); integer logits make ties within and beyond the 2k
    entries the fast path fetches."""
    from megatron_opsd.rollout.sampler import _local_top_k

    rows, vocab, k = 64, 50, 6
    x = torch.randint(0, levels, (rows, vocab), generator=torch.Generator().manual_seed(4)).float()
    vals, cols = _local_top_k(x, k)
    for row in range(rows):
        expected = sorted(range(vocab), key=lambda c: (-x[row, c].item(), c))[:k]
        assert sorted(cols[row].tolist()) == sorted(expected)
        assert torch.equal(vals[row], x[row, cols[row]])


def test_top_k_path_works_in_fp32_on_the_vocabulary():
    """The issue's precision policy: no fp64 tensor of the vocabulary's size on the top-k path (fp64
    only on the k candidates and per-row statistics); bf16 logits sample as their fp32 values do."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fp64Sizes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    Fp64Sizes.largest = max(Fp64Sizes.largest, t.numel())
            return out

    rows, vocab = 4, 5000
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    params, vs = CASES[0], vocab_shard(vocab, vocab, None)
    with Fp64Sizes():
        sample = sample_next(logits, keys_for(rows), params, vs)
    assert 0 < Fp64Sizes.largest <= rows * params.top_k**2 < vocab  # top-p's [b, k, k] comparison
    as_fp32 = sample_next(logits.float(), keys_for(rows), params, vs)
    assert torch.equal(sample.token_ids, as_fp32.token_ids)
    assert torch.equal(sample.model_logprobs, as_fp32.model_logprobs)
