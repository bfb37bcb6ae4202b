"""Single-process (tp_group=None, i.e. TP=1) tests of megatron_opsd.losses against the fp64 reference.

Tolerances (fp32 kernel vs fp64 reference on the same input values): fp32 log-probabilities of
magnitude up to ~30 carry ~1e-6 absolute error, weighted by probabilities that sum to 1, so per-token
values (O(0.1)..O(10)) get 5e-6 absolute + 5e-6 relative, and gradient entries (O(p) <= 1/T) 2e-6
absolute + 1e-4 relative. Observed errors use at most ~20% of these.
The multi-process tier (tests/distributed/test_losses.py) repeats the reference comparisons at TP=2, 4.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opsd.losses import (
    sampled_token_advantage_loss,
    vocab_parallel_divergence,
    vocab_parallel_entropy,
    vocab_parallel_token_logprobs,
    vocab_parallel_topk_divergence,
)
from megatron_opsd.losses.sharding import vocab_shard
from megatron_opsd.losses.vocab_parallel import log_probs_at
from tests.distributed.workers import losses_reference as ref

VALUE_TOL = dict(rtol=5e-6, atol=5e-6)
GRAD_TOL = dict(rtol=1e-4, atol=2e-6)
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


def ours_value_and_grad(fn, logits, weights, *args, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    value = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad((value * weights).sum(), leaf)
    return value, grad


def check(value, grad, ref_value, ref_grad, what=""):
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, **VALUE_TOL, msg=lambda m: f"value {what}: {m}")
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL, msg=lambda m: f"grad {what}: {m}")


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("vocab_size", [96, 83])
def test_divergence_matches_reference(divergence, beta, clip, temperature, vocab_size):
    student, teacher, weights = ref.make_logits(0, vocab_size=vocab_size)
    kwargs = dict(divergence=divergence, beta=beta, temperature=temperature, clip=clip, vocab_size=vocab_size)
    ref_value, ref_grad = ref.value_and_grad(ref.divergence, student, weights, teacher, **kwargs)
    if clip is not None:  # the clip must bind on some entries and not on others, or the test proves little
        entry = ref.entries(ref.log_probs(student, temperature, vocab_size),
                            ref.log_probs(teacher, temperature, vocab_size), divergence, beta)
        assert 0 < (entry > clip).sum() < entry.numel() // 4
    value, grad = ours_value_and_grad(vocab_parallel_divergence, student, weights, teacher, chunk_size=4, **kwargs)
    check(value, grad, ref_value, ref_grad, f"{kwargs}")
    assert (grad[..., vocab_size:] == 0).all()


def test_padded_columns_take_no_mass_whatever_their_value():
    student, teacher, weights = ref.make_logits(1, vocab_size=80, pad_value=30.0)
    ref_value, ref_grad = ref.value_and_grad(ref.divergence, student, weights, teacher, vocab_size=80)
    value, grad = ours_value_and_grad(vocab_parallel_divergence, student, weights, teacher, vocab_size=80)
    check(value, grad, ref_value, ref_grad)
    assert ref_value.abs().max() > 0.1  # a mass leak into e^30 columns would change it completely


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("k,tail", [(1, True), (5, False), (5, True), (20, True)])
def test_topk_matches_reference(divergence, beta, k, tail):
    student, teacher, weights = ref.make_logits(2, vocab_size=90)
    kwargs = dict(divergence=divergence, beta=beta, temperature=1.3, vocab_size=90, k=k, tail=tail)
    ref_value, ref_grad = ref.value_and_grad(ref.topk_divergence, student, weights, teacher, **kwargs)
    value, grad = ours_value_and_grad(vocab_parallel_topk_divergence, student, weights, teacher, **kwargs)
    check(value, grad, ref_value, ref_grad, f"{kwargs}")


@pytest.mark.parametrize("clip", [None, 0.05])
def test_topk_clip_matches_reference(clip):
    student, teacher, weights = ref.make_logits(3)
    kwargs = dict(k=8, tail=True, clip=clip, divergence="reverse_kl")
    ref_value, ref_grad = ref.value_and_grad(ref.topk_divergence, student, weights, teacher, **kwargs)
    value, grad = ours_value_and_grad(vocab_parallel_topk_divergence, student, weights, teacher, **kwargs)
    check(value, grad, ref_value, ref_grad)


def test_topk_over_the_whole_vocabulary_is_the_full_divergence():
    student, teacher, weights = ref.make_logits(4, vocab_size=70)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        full = vocab_parallel_divergence(student, teacher, divergence=divergence, vocab_size=70)
        for tail in (False, True):
            top = vocab_parallel_topk_divergence(student, teacher, k=70, tail=tail, divergence=divergence,
                                                 vocab_size=70)
            torch.testing.assert_close(top, full, **VALUE_TOL)


def test_tail_mass_far_below_fp32_epsilon_is_accurate():
    """Confident tokens leave 1e-5..1e-10 of their mass outside the top-k; 1 − Σ p cannot resolve that in
    fp32 (it would give noise or log 0). The kernel sums the remaining entries instead: the log tail is
    checked to 1e-5 absolute (1e-5 relative in mass), its gradient like any gradient."""
    gen = torch.Generator().manual_seed(20)
    logits = torch.randn(4, 60, generator=gen)
    logits[:, :5] += torch.tensor([12.0, 16.0, 20.0, 24.0])[:, None]
    ids = torch.topk(logits, 5, dim=-1).indices
    shard = vocab_shard(60, None, None)

    def ours(x):
        return log_probs_at(x, ids, shard, 1.0, 2, with_tail=True)[:, 5]

    def reference(x):
        lp = torch.log_softmax(x, dim=-1)
        return (lp.exp() * torch.ones_like(lp, dtype=torch.bool).scatter(-1, ids, False)).sum(-1).log()

    weights = torch.ones(4)
    ref_value, ref_grad = ref.value_and_grad(reference, logits, weights)
    assert ref_value.max() < math.log(1e-4) and ref_value.min() > math.log(1e-11)
    value, grad = ours_value_and_grad(ours, logits, weights)
    torch.testing.assert_close(value.double(), ref_value, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)


def test_topk_tail_keeps_forward_kl_nonnegative_and_below_full():
    student, teacher, _ = ref.make_logits(5)
    full = vocab_parallel_divergence(student, teacher)
    tailed = vocab_parallel_topk_divergence(student, teacher, k=3, tail=True)
    assert (tailed >= -1e-6).all() and (tailed <= full + 1e-5).all()  # data processing inequality
    renormalised = vocab_parallel_topk_divergence(student, teacher, k=3, tail=False)
    assert not torch.allclose(renormalised, tailed)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_reference(temperature):
    logits, _, weights = ref.make_logits(6, vocab_size=77)
    ids = torch.randint(0, 77, ref.LEAD_SHAPE, generator=torch.Generator().manual_seed(0))
    kwargs = dict(temperature=temperature, vocab_size=77)
    ref_value, ref_grad = ref.value_and_grad(ref.token_logprobs, logits, weights, ids, **kwargs)
    value, grad = ours_value_and_grad(vocab_parallel_token_logprobs, logits, weights, ids, chunk_size=2, **kwargs)
    check(value, grad, ref_value, ref_grad, "token_logprobs")
    ref_value, ref_grad = ref.value_and_grad(ref.entropy, logits, weights, **kwargs)
    value, grad = ours_value_and_grad(vocab_parallel_entropy, logits, weights, chunk_size=2, **kwargs)
    check(value, grad, ref_value, ref_grad, "entropy")


def test_token_logprobs_normalise_and_uniform_entropy_is_log_vocab():
    logits = torch.randn(4, 50)
    every_id = torch.arange(50).expand(4, 50)
    logprobs = vocab_parallel_token_logprobs(logits[:, None].expand(4, 50, 50), every_id, vocab_size=50)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(4))
    uniform = vocab_parallel_entropy(torch.zeros(2, 64), vocab_size=40)
    torch.testing.assert_close(uniform, torch.full((2,), math.log(40)))


# ---------------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_identical_distributions_give_zero_value_and_gradient(divergence, beta):
    logits, _, _ = ref.make_logits(7, vocab_size=90)
    for clip in (None, 0.05):
        value, grad = ours_value_and_grad(vocab_parallel_divergence, logits, torch.ones(ref.LEAD_SHAPE), logits,
                                          divergence=divergence, beta=beta, clip=clip, temperature=1.3,
                                          vocab_size=90)
        assert value.abs().max() <= 1e-6  # exact in exact arithmetic; fp32 rounding of log p only
        assert grad.abs().max() <= 1e-6
        top = vocab_parallel_topk_divergence(logits, logits, k=4, tail=True, divergence=divergence, beta=beta)
        assert top.abs().max() <= 1e-6


def test_jsd_is_symmetric_at_half():
    student, teacher, _ = ref.make_logits(8)
    forward = vocab_parallel_divergence(student, teacher, divergence="jsd", beta=0.5)
    swapped = vocab_parallel_divergence(teacher, student, divergence="jsd", beta=0.5)
    torch.testing.assert_close(forward, swapped, **VALUE_TOL)
    assert forward.abs().max() > 0.1
    lopsided = vocab_parallel_divergence(teacher, student, divergence="jsd", beta=0.2)
    assert not torch.allclose(lopsided, vocab_parallel_divergence(student, teacher, divergence="jsd", beta=0.2))


def test_jsd_ends_are_forward_and_reverse_kl():
    """β = 0 / 1 are *defined* as forward / reverse KL (TRL's convention). The JSD itself vanishes at the
    ends like β KL(p_T‖p_S) + O(β²) and (1−β) KL(p_S‖p_T) + O((1−β)²), so JSD/β -> forward KL as β -> 0 and
    JSD/(1−β) -> reverse KL as β -> 1 (checked at β = 1e-3 with relative tolerance 1e-2: an O(β) bias
    plus fp32 cancellation in the (1−β) KL(p_S‖m) = O(β²) term)."""
    student, teacher, _ = ref.make_logits(9, scale=1.0)
    forward = vocab_parallel_divergence(student, teacher, divergence="forward_kl")
    reverse = vocab_parallel_divergence(student, teacher, divergence="reverse_kl")
    assert torch.equal(vocab_parallel_divergence(student, teacher, divergence="jsd", beta=0.0), forward)
    assert torch.equal(vocab_parallel_divergence(student, teacher, divergence="jsd", beta=1.0), reverse)
    beta = 1e-3
    near_zero = vocab_parallel_divergence(student, teacher, divergence="jsd", beta=beta) / beta
    near_one = vocab_parallel_divergence(student, teacher, divergence="jsd", beta=1.0 - beta) / beta
    mask = forward > 0  # the garbage rows are identical distributions: 0 everywhere
    torch.testing.assert_close(near_zero[mask], forward[mask], rtol=1e-2, atol=0)
    torch.testing.assert_close(near_one[mask], reverse[mask], rtol=1e-2, atol=0)


def test_clip_caps_each_entry_and_a_loose_clip_changes_nothing():
    student, teacher, _ = ref.make_logits(10)
    free = vocab_parallel_divergence(student, teacher)
    assert torch.equal(vocab_parallel_divergence(student, teacher, clip=1e6), free)
    clipped = vocab_parallel_divergence(student, teacher, clip=0.05)
    assert (clipped <= free + 1e-6).all() and (clipped < free - 1e-3).any()
    assert (clipped <= 0.05 * ref.PADDED_VOCAB).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_chunking_does_not_change_results(divergence, beta):
    student, teacher, weights = ref.make_logits(11, vocab_size=90)
    results = [ours_value_and_grad(vocab_parallel_divergence, student, weights, teacher, divergence=divergence,
                                   beta=beta, clip=0.05, temperature=1.2, vocab_size=90, chunk_size=chunk)
               for chunk in (1, 4, 7, None)]
    for value, grad in results[1:]:  # rows are independent: bit-identical, not just close
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_large_logits_are_finite_and_accurate(divergence, beta):
    """±1e4 logits: one-hot-like distributions, KL ~ 1e4. fp32 resolves 1e4 to ~1e-3, hence rtol 1e-5 on
    values; gradients are O(1) (differences of near-one-hot probabilities) with atol 1e-5."""
    gen = torch.Generator().manual_seed(12)
    student = torch.randn(6, 40, generator=gen).sign() * 1e4 + torch.randn(6, 40, generator=gen)
    teacher = torch.randn(6, 40, generator=gen).sign() * 1e4 + torch.randn(6, 40, generator=gen)
    weights = torch.ones(6)
    for clip in (None, 0.05):
        kwargs = dict(divergence=divergence, beta=beta, clip=clip)
        ref_value, ref_grad = ref.value_and_grad(ref.divergence, student, weights, teacher, **kwargs)
        value, grad = ours_value_and_grad(vocab_parallel_divergence, student, weights, teacher, **kwargs)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


def test_garbage_rows_are_finite_and_masked_rows_get_no_gradient():
    student, teacher, weights = ref.make_logits(13)
    teacher[1, 1] = 0.0  # a half-garbage row: uniform teacher, peaked student
    for divergence, beta in DIVERGENCES:
        value, grad = ours_value_and_grad(vocab_parallel_divergence, student, weights, teacher,
                                          divergence=divergence, beta=beta, clip=0.05)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        for row in ref.GARBAGE_ROWS:
            assert value[row] == 0 and grad[row].abs().max() == 0


def test_bf16_inputs_compute_in_fp32():
    """Values: the kernel upcasts, so it matches the fp64 reference of the same bf16 numbers to fp32
    accuracy. Gradients come back in bf16: relative rounding 2^-8, so rtol 1e-2 (and atol 1e-4 for the
    smallest entries)."""
    student, teacher, weights = ref.make_logits(14, vocab_size=90)
    student, teacher = student.bfloat16(), teacher.bfloat16()
    kwargs = dict(divergence="jsd", beta=0.3, temperature=1.1, clip=0.05, vocab_size=90)
    ref_value, ref_grad = ref.value_and_grad(ref.divergence, student, weights, teacher, **kwargs)
    value, grad = ours_value_and_grad(vocab_parallel_divergence, student, weights, teacher, **kwargs)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value.double(), ref_value, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-4)
    logprobs = vocab_parallel_token_logprobs(student, student[..., :90].argmax(-1), vocab_size=90)
    torch.testing.assert_close(logprobs.double(), ref.token_logprobs(student, student[..., :90].argmax(-1),
                                                                       vocab_size=90), **VALUE_TOL)
    kwargs = dict(k=5, tail=True, temperature=1.1, vocab_size=90)
    ref_value, ref_grad = ref.value_and_grad(ref.topk_divergence, student, weights, teacher, **kwargs)
    value, grad = ours_value_and_grad(vocab_parallel_topk_divergence, student, weights, teacher, **kwargs)
    torch.testing.assert_close(value.double(), ref_value, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-4)


def test_teacher_is_a_constant():
    student, teacher, weights = ref.make_logits(15)
    student.requires_grad_()
    teacher.requires_grad_()
    for fn, kwargs in ((vocab_parallel_divergence, {}), (vocab_parallel_topk_divergence, dict(k=4, tail=True))):
        (fn(student, teacher, **kwargs) * weights).sum().backward()
        assert teacher.grad is None and student.grad is not None
        student.grad = None


def test_shapes_and_empty_input():
    student, teacher, _ = ref.make_logits(16)
    assert vocab_parallel_divergence(student[0], teacher[0]).shape == (ref.LEAD_SHAPE[1],)
    assert vocab_parallel_divergence(student[0, 0], teacher[0, 0]).shape == ()
    empty = torch.zeros(0, 7, 96, requires_grad=True)
    out = vocab_parallel_divergence(empty, empty.detach(), clip=0.05)
    assert out.shape == (0, 7)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def test_sampled_token_advantage_loss():
    gen = torch.Generator().manual_seed(17)
    student = (-torch.rand(4, 6, generator=gen) * 3).requires_grad_()
    teacher = (-torch.rand(4, 6, generator=gen) * 3).requires_grad_()
    loss = sampled_token_advantage_loss(student, teacher)
    advantage = teacher.detach() - student.detach()
    torch.testing.assert_close(loss, -advantage * student.detach())
    loss.sum().backward()
    torch.testing.assert_close(student.grad, -advantage)  # the advantage is a constant
    assert teacher.grad is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(divergence="kl"), "divergence="),
    (dict(divergence="jsd", beta=1.5), "beta="),
    (dict(temperature=0.0), "temperature="),
    (dict(clip=-0.1), "clip="),
    (dict(vocab_size=97), "vocab_size="),
    (dict(vocab_size=0), "vocab_size="),
    (dict(chunk_size=0), "chunk_size="),
])
def test_bad_arguments_raise_value_errors(kwargs, match):
    student, teacher, _ = ref.make_logits(18)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_divergence(student, teacher, **kwargs)


def test_bad_shapes_raise_value_errors():
    student, teacher, _ = ref.make_logits(19)
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_divergence(student, teacher[..., :50])
    with pytest.raises(ValueError, match="k="):
        vocab_parallel_topk_divergence(student, teacher, k=91, vocab_size=90)
    with pytest.raises(ValueError, match="token_ids"):
        vocab_parallel_token_logprobs(student, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="floating-point"):
        vocab_parallel_entropy(torch.zeros(3, 4, dtype=torch.long))
