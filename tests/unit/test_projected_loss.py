"""The fused projection + loss (losses.projected) against a plain fp64 computation on whole logits.

The reference projects all tokens at once in fp64 (``h @ W^T``), applies the independent reference
divergences of ``losses_reference`` and differentiates with autograd; ours projects chunk by chunk in
fp32 and computes the gradient inside the forward. Tolerances: fp32 vs fp64 on O(1) values, as in
test_losses.py (values 5e-6, gradients 2e-6 absolute + 1e-4 relative).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opsd.losses import vocab_parallel_divergence, vocab_parallel_token_logprobs
from megatron_opsd.losses.projected import projected_token_loss
from tests.distributed.workers import losses_reference as ref

N, H, V, VOCAB = 13, 16, 40, 37  # 37 real ids, 3 padded columns (as after TP padding)
VALUE_TOL = dict(rtol=5e-6, atol=5e-6)
GRAD_TOL = dict(rtol=1e-4, atol=2e-6)


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, H, generator=gen, dtype=torch.float64)
    h_t = h_s + 0.5 * torch.randn(N, H, generator=gen, dtype=torch.float64)
    w_s = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.6
    w_t = w_s + 0.2 * torch.randn(V, H, generator=gen, dtype=torch.float64)
    mask = (torch.rand(N, generator=gen) > 0.25).double()
    ids = torch.randint(0, VOCAB, (N,), generator=gen)
    return h_s, w_s, h_t, w_t, mask, ids


def reference(h_s, w_s, h_t, w_t, mask, per_token):
    h_s, w_s = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss = (per_token(h_s @ w_s.t(), h_t @ w_t.t()) * mask).sum()
    grad_h, grad_w = torch.autograd.grad(loss, [h_s, w_s])
    return loss.detach(), grad_h, grad_w


def ours(h_s, w_s, h_t, w_t, mask, token_loss, chunk_tokens, grad_scale=1.0):
    h_s, w_s = h_s.float().requires_grad_(), w_s.float().requires_grad_()
    h_t = None if h_t is None else h_t.float()
    w_t = None if w_t is None else w_t.float()
    loss, per_token = projected_token_loss(h_s, w_s, h_t, w_t, token_loss, mask.float(), chunk_tokens=chunk_tokens)
    (loss * grad_scale).backward()
    return loss.detach(), per_token, h_s.grad, w_s.grad


@pytest.mark.parametrize("divergence,clip", [("forward_kl", 0.02), ("forward_kl", None), ("jsd", None),
                                             ("reverse_kl", 0.05)])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 100])
def test_divergence_through_projection_matches_fp64(divergence, clip, chunk_tokens):
    h_s, w_s, h_t, w_t, mask, _ = inputs()
    kwargs = dict(divergence=divergence, temperature=1.3, clip=clip, vocab_size=VOCAB)
    ref_loss, ref_gh, ref_gw = reference(h_s, w_s, h_t, w_t, mask, lambda s, t: ref.divergence(s, t, **kwargs))
    if clip is not None:  # the cap must bind somewhere, or the case proves little
        entries = ref.entries(ref.log_probs(h_s @ w_s.t(), 1.3, VOCAB), ref.log_probs(h_t @ w_t.t(), 1.3, VOCAB),
                              divergence, 0.5)
        assert 0 < (entries > clip).sum() < entries.numel()
    loss, per_token, gh, gw = ours(h_s, w_s, h_t, w_t, mask,
                                   lambda s, t, rows: vocab_parallel_divergence(s, t, chunk_size=3, **kwargs),
                                   chunk_tokens)
    torch.testing.assert_close(loss.double(), ref_loss, **VALUE_TOL)
    torch.testing.assert_close(gh.double(), ref_gh, **GRAD_TOL)
    torch.testing.assert_close(gw.double(), ref_gw, **GRAD_TOL)
    per_token_ref = ref.divergence(h_s @ w_s.t(), h_t @ w_t.t(), **kwargs)
    torch.testing.assert_close(per_token.double(), per_token_ref, **VALUE_TOL)


def test_token_loss_without_teacher_uses_the_rows_it_is_given():
    """The sft shape: no teacher, the per-token loss reads the token ids of its chunk's rows."""
    h_s, w_s, _, _, mask, ids = inputs(1)
    ref_loss, ref_gh, ref_gw = reference(
        h_s, w_s, h_s, w_s, mask, lambda s, t: -ref.token_logprobs(s, ids, vocab_size=VOCAB))
    loss, _, gh, gw = ours(h_s, w_s, None, None, mask,
                           lambda s, t, rows: -vocab_parallel_token_logprobs(s, ids[rows], vocab_size=VOCAB), 5)
    torch.testing.assert_close(loss.double(), ref_loss, **VALUE_TOL)
    torch.testing.assert_close(gh.double(), ref_gh, **GRAD_TOL)
    torch.testing.assert_close(gw.double(), ref_gw, **GRAD_TOL)


def test_incoming_gradient_scales_and_live_teacher_gets_no_gradient_path():
    """Backward multiplies by the upstream scalar (megatron scales losses); with the live teacher's
    weight being the student's own tensor, the gradient is still that of the student side alone."""
    h_s, w_s, h_t, _, mask, _ = inputs(2)
    kwargs = dict(divergence="forward_kl", temperature=1.0, clip=None, vocab_size=VOCAB)
    ref_loss, ref_gh, ref_gw = reference(h_s, w_s, h_t, w_s, mask, lambda s, t: ref.divergence(s, t, **kwargs))
    w = w_s.float().requires_grad_()
    h = h_s.float().requires_grad_()
    loss, _ = projected_token_loss(h, w, h_t.float(), w, lambda s, t, rows: vocab_parallel_divergence(s, t, **kwargs),
                                   mask.float(), chunk_tokens=4)
    (3.0 * loss).backward()
    torch.testing.assert_close(h.grad.double(), 3.0 * ref_gh, **GRAD_TOL)
    torch.testing.assert_close(w.grad.double(), 3.0 * ref_gw, **GRAD_TOL)


def test_no_grad_mode_gives_the_value_and_no_graph():
    h_s, w_s, h_t, w_t, mask, _ = inputs(3)
    kwargs = dict(divergence="jsd", temperature=1.0, clip=None, vocab_size=VOCAB)
    fn = lambda s, t, rows: vocab_parallel_divergence(s, t, **kwargs)  # noqa: E731
    with torch.no_grad():
        loss, _ = projected_token_loss(h_s.float().requires_grad_(), w_s.float(), h_t.float(), w_t.float(), fn,
                                       mask.float())
    assert loss.grad_fn is None
    ref_loss = (ref.divergence(h_s @ w_s.t(), h_t @ w_t.t(), **kwargs) * mask).sum()
    torch.testing.assert_close(loss.double(), ref_loss, **VALUE_TOL)


def test_empty_selection_gives_zero_and_a_zero_gradient():
    w = torch.randn(V, H, requires_grad=True)
    h = torch.zeros(0, H, requires_grad=True)
    loss, per_token = projected_token_loss(h, w, h.detach(), w, lambda s, t, rows: (s - t).sum(-1),
                                           torch.zeros(0))
    loss.backward()
    assert loss.item() == 0.0 and per_token.numel() == 0
    assert w.grad is not None and (w.grad == 0).all()


def test_bad_shapes_are_named():
    w = torch.randn(V, H)
    with pytest.raises(ValueError, match="expected"):
        projected_token_loss(torch.randn(3, H + 1), w, None, None, lambda s, t, r: s.sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="neither"):
        projected_token_loss(torch.randn(3, H), w, torch.randn(3, H), None, lambda s, t, r: s.sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        projected_token_loss(torch.randn(3, H), w, None, None, lambda s, t, r: s.sum(-1), torch.ones(3),
                             chunk_tokens=0)


@pytest.mark.parametrize("block", [None, 7])
def test_bf16_weights_accumulate_the_weight_gradient_in_fp32(block, monkeypatch):
    """bf16 hidden states and weights (GPU training): the value and gradients follow the fp64
    reference to bf16 resolution, and the weight gradient is returned in the weight's dtype; also with
    the dW product split into blocks of 7 weight rows (a ragged last one)."""
    from megatron_opsd.losses import projected

    if block is not None:
        monkeypatch.setattr(projected, "_PRODUCT_BLOCK", block)
        assert V % block  # a ragged last block
    h_s, w_s, h_t, w_t, mask, _ = inputs(4)
    kwargs = dict(divergence="forward_kl", temperature=1.0, clip=None, vocab_size=VOCAB)
    # the reference sees the same bf16-rounded inputs
    h_s, w_s, h_t, w_t = (x.bfloat16().double() for x in (h_s, w_s, h_t, w_t))
    ref_loss, ref_gh, ref_gw = reference(h_s, w_s, h_t, w_t, mask, lambda s, t: ref.divergence(s, t, **kwargs))
    h = h_s.bfloat16().requires_grad_()
    w = w_s.bfloat16().requires_grad_()
    loss, _ = projected_token_loss(h, w, h_t.bfloat16(), w_t.bfloat16(),
                                   lambda s, t, rows: vocab_parallel_divergence(s, t, **kwargs), mask.float(),
                                   chunk_tokens=3)
    loss.backward()
    assert w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16
    # bf16 logits carry ~0.4% relative error; scale the tolerances to the largest reference entry
    torch.testing.assert_close(loss.double(), ref_loss, rtol=3e-2, atol=3e-2 * ref_loss.abs().item())
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=5e-2, atol=2e-2 * ref_gh.abs().max().item())
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=5e-2, atol=2e-2 * ref_gw.abs().max().item())


@pytest.mark.parametrize("tied", [False, True])
def test_weight_gradient_goes_into_megatron_main_grad(tied):
    """Under megatron-core's DDP the weight carries an fp32 ``main_grad`` (holding earlier micro-batches'
    gradients) and ``grad_added_to_main_grad``: dW x the incoming scale is added there, the flag is set
    (so DDP's hook adds nothing more), and the placeholder grad is zeros for a weight megatron marks
    ``zero_out_wgrad`` (tied to the embedding, whose own gradient arrives through the same leaf and must
    survive: here a second use of the weight stands in for the embedding)."""
    h_s, w_s, h_t, w_t, mask, _ = inputs(5)
    kwargs = dict(divergence="forward_kl", temperature=1.0, clip=None, vocab_size=VOCAB)
    token_loss = lambda s, t, rows: vocab_parallel_divergence(s, t, **kwargs)  # noqa: E731
    _, ref_gh, ref_gw = reference(h_s, w_s, h_t, w_t, mask, lambda s, t: ref.divergence(s, t, **kwargs))
    earlier = torch.randn(V, H, dtype=torch.float64)
    h = h_s.float().requires_grad_()
    w = w_s.float().requires_grad_()
    w.main_grad = earlier.float().clone()
    w.grad_added_to_main_grad = False
    if tied:
        w.zero_out_wgrad = True
    loss, _ = projected_token_loss(h, w, h_t.float(), w_t.float(), token_loss, mask.float(), chunk_tokens=4)
    other_use = (w * 0.5).sum() if tied else 0.0  # d/dw = 0.5 everywhere
    (3.0 * loss + other_use).backward()
    assert w.grad_added_to_main_grad
    torch.testing.assert_close(w.main_grad.double(), earlier + 3.0 * ref_gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), 3.0 * ref_gh, rtol=1e-5, atol=1e-6)
    if tied:  # the embedding's gradient is what the hook will add
        torch.testing.assert_close(w.grad, torch.full_like(w, 0.5))


def allocations(fn) -> list[int]:
    """Bytes of each CPU allocation made while ``fn`` runs (frees are negative)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while ``fn`` runs."""
    return max([0, *allocations(fn)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_known_grad_scale_puts_dw_into_main_grad_during_forward(dtype, monkeypatch):
    """With ``grad_scale`` (the factor megatron's schedule will backpropagate: the loss scale) and
    megatron's fp32 ``main_grad``, dW x that factor is already in ``main_grad`` when forward returns,
    with no weight-sized accumulator (no allocation of its [V, H] fp32 bytes, which the path without
    ``grad_scale`` makes); backward brings the input gradient and sets the flag; a backward that brings
    another factor raises instead of leaving a wrongly scaled dW."""
    from megatron_opsd.losses import projected

    wide = 128  # hidden size: the [V, H] accumulator then dwarfs the chunk's [c, V] buffers
    monkeypatch.setattr(projected, "_PRODUCT_BLOCK", 8)  # bf16's dW product blocks: 8 of the V rows
    gen = torch.Generator().manual_seed(6)
    h_s, h_t = (torch.randn(N, wide, generator=gen, dtype=torch.float64) / wide ** 0.5 for _ in range(2))
    w_s, w_t = (torch.randn(V, wide, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = (torch.rand(N, generator=gen) > 0.25).double()
    kwargs = dict(divergence="forward_kl", temperature=1.0, clip=None, vocab_size=VOCAB)
    token_loss = lambda s, t, rows: vocab_parallel_divergence(s, t, **kwargs)  # noqa: E731
    h_s, w_s, h_t, w_t = (x.to(dtype).double() for x in (h_s, w_s, h_t, w_t))  # the inputs we feed
    _, ref_gh, ref_gw = reference(h_s, w_s, h_t, w_t, mask, lambda s, t: ref.divergence(s, t, **kwargs))
    earlier = torch.randn(V, wide, dtype=torch.float64)
    tol = (dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32
           else dict(rtol=5e-2, atol=2e-2 * ref_gw.abs().max().item()))

    def run(grad_scale):
        h = h_s.to(dtype).requires_grad_()
        w = w_s.to(dtype).requires_grad_()
        w.main_grad = earlier.float().clone()
        w.grad_added_to_main_grad = False
        box, teacher = {}, (h_t.to(dtype), w_t.to(dtype), mask.float())

        def forward():
            box["loss"] = projected_token_loss(h, w, teacher[0], teacher[1], token_loss, teacher[2],
                                               chunk_tokens=4, grad_scale=grad_scale)[0]
        sizes = allocations(forward)
        return h, w, box["loss"], sizes

    h, w, loss, sizes = run(2.0)
    torch.testing.assert_close(w.main_grad.double(), earlier + 2.0 * ref_gw, **tol)  # before backward
    assert V * wide * 4 not in sizes
    (2.0 * loss).backward()
    assert w.grad_added_to_main_grad
    torch.testing.assert_close(w.main_grad.double(), earlier + 2.0 * ref_gw, **tol)  # nothing added twice
    torch.testing.assert_close(h.grad.double(), 2.0 * ref_gh, rtol=tol["rtol"],
                               atol=1e-6 if dtype == torch.float32 else 2e-2 * ref_gh.abs().max().item())
    assert V * wide * 4 in run(None)[3]  # the accumulator this path does without
    h, w, loss, _ = run(2.0)
    with pytest.raises(RuntimeError, match="grad_scale=2.0"):
        (3.0 * loss).backward()


def test_gradient_buffer_is_used_once_per_offer():
    """A token loss that calls the divergence twice on the same chunk (here the sum of two divergences)
    gets two distinct gradients: the projection's reused gradient buffer serves only the first call."""
    h_s, w_s, h_t, w_t, mask, _ = inputs(8)
    fkl = dict(divergence="forward_kl", temperature=1.0, clip=None, vocab_size=VOCAB)
    rkl = dict(fkl, divergence="reverse_kl")
    ref_loss, ref_gh, ref_gw = reference(
        h_s, w_s, h_t, w_t, mask, lambda s, t: ref.divergence(s, t, **fkl) + 0.5 * ref.divergence(s, t, **rkl))
    token_loss = lambda s, t, rows: (vocab_parallel_divergence(s, t, **fkl)  # noqa: E731
                                     + 0.5 * vocab_parallel_divergence(s, t, **rkl))
    loss, _, grad_h, grad_w = ours(h_s, w_s, h_t, w_t, mask, token_loss, chunk_tokens=4)
    torch.testing.assert_close(loss.double(), ref_loss, **VALUE_TOL)
    torch.testing.assert_close(grad_h.double(), ref_gh, **GRAD_TOL)
    torch.testing.assert_close(grad_w.double(), ref_gw, **GRAD_TOL)


def test_bf16_gradient_is_scaled_without_fp32_copies():
    """Under ``gradient_in_forward`` the divergence's backward scales its stored bf16 gradient by the
    incoming fp32 per-token factor in fp32, with one rounding (bit for bit the product computed in fp32
    and rounded), through a chunk-sized buffer: a plain mixed-dtype ``mul_`` on CPU allocates fp32
    copies of the whole [n, V] gradient."""
    from megatron_opsd.losses import vocab_parallel

    n, v = 40, 1000
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(n, v, generator=gen).bfloat16().requires_grad_()
    t = torch.randn(n, v, generator=gen).bfloat16()
    scale = torch.rand(n, generator=gen) * 3
    with vocab_parallel.gradient_in_forward():
        value = vocab_parallel_divergence(s, t, chunk_size=8)
        unscaled = torch.autograd.grad(value.sum(), s, retain_graph=False)[0]
    with vocab_parallel.gradient_in_forward():
        value = vocab_parallel_divergence(s, t, chunk_size=8)
        box = {}
        largest = largest_allocation(lambda: box.update(g=torch.autograd.grad((value * scale).sum(), s)[0]))
    # the stored gradient is rounded to bf16 once in forward; backward multiplies it in fp32, rounds once
    assert torch.equal(box["g"], (unscaled.float() * scale[:, None]).bfloat16())
    assert largest < n * v * 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("divergence,clip", [("forward_kl", 0.02), ("forward_kl", None), ("jsd", None),
                                             ("reverse_kl", 0.05)])
def test_gradient_in_forward_equals_the_recomputing_backward(divergence, clip, dtype, monkeypatch):
    """``gradient_in_forward`` (the fused projection's mode: the divergence's forward writes the gradient,
    backward only scales it) against the default backward, which recomputes both distributions; in
    that mode the backward never recomputes a log-probability (``_log_probs`` is not called)."""
    from megatron_opsd.losses import vocab_parallel

    gen = torch.Generator().manual_seed(7)
    s = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 2).to(dtype)
    t = (s.double() + torch.randn(N, V, generator=gen, dtype=torch.float64)).to(dtype)
    scale = torch.rand(N, generator=gen)
    kwargs = dict(divergence=divergence, temperature=1.3, clip=clip, vocab_size=VOCAB, chunk_size=4)

    def value_and_grad():
        leaf = s.clone().requires_grad_()
        value = vocab_parallel_divergence(leaf, t, **kwargs)
        return value, torch.autograd.grad((value * scale).sum(), leaf)[0]

    value, grad = value_and_grad()

    def no_recomputation(*args, **kwargs):
        raise AssertionError("backward recomputed the log-probabilities")

    with vocab_parallel.gradient_in_forward():
        monkeypatch.setattr(vocab_parallel, "_log_probs", no_recomputation)
        value_f, grad_f = value_and_grad()
    assert vocab_parallel._in_forward is None
    torch.testing.assert_close(value_f, value, rtol=0, atol=0)
    assert grad_f.dtype == dtype and grad_f[:, VOCAB:].eq(0).all()
    # fp32 math on both paths, from probabilities rounded differently (e·exp(−offset) in forward,
    # exp(log p) in backward: ~1e-7 relative each, and g − p_S G cancels: observed 2e-8 absolute);
    # bf16: one more rounding of the returned gradient
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(grad_f.double(), grad.double(), **tol)
    # the fused projection differentiates right after each chunk's forward: it runs in this mode
    h_s, w_s, h_t, _, mask, _ = inputs(8)
    h_s.requires_grad_()
    loss, _ = projected_token_loss(h_s, w_s, h_t, w_s, lambda s_, t_, rows: vocab_parallel_divergence(s_, t_, **kwargs),
                                   mask, chunk_tokens=5)
    loss.backward()
    assert h_s.grad is not None
