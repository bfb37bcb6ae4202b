"""bf16 inputs to the divergence kernels and the fused projection: accuracy against the fp64 reference,
and nothing vocabulary-sized in fp32 beyond one chunk.

The memory check records every tensor an op returns (a TorchDispatchMode sees each one, views
included) while a kernel runs forward and backward on ``N`` bf16 rows with chunks of ``C`` rows: no
fp32 tensor may hold more than a few chunks' worth of ``[C, V]`` entries, while an upcast of the whole
input (what a kernel calling ``logits.float()`` would do) is ``N / C`` = 16 times that.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_opsd.losses import (
    vocab_parallel_divergence,
    vocab_parallel_entropy,
    vocab_parallel_token_logprobs,
    vocab_parallel_topk_divergence,
)
from megatron_opsd.losses.projected import projected_token_loss
from tests.distributed.workers import losses_reference as ref

N, C, V, H = 128, 8, 500, 32


class LargestFp32(TorchDispatchMode):
    """The largest fp32 tensor (in elements) any op returned while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def bf16_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, V, generator=gen) * 3).bfloat16()
    teacher = (student.float() + torch.randn(N, V, generator=gen)).bfloat16()
    return student, teacher, torch.rand(N, generator=gen)


KERNELS = {
    "forward_kl clip": (lambda s, t, **kw: vocab_parallel_divergence(s, t, clip=0.05, **kw),
                        lambda s, t: ref.divergence(s, t, divergence="forward_kl", beta=0.5, temperature=1.1,
                                                    clip=0.05, vocab_size=V)),
    "jsd": (lambda s, t, **kw: vocab_parallel_divergence(s, t, divergence="jsd", beta=0.3, **kw),
            lambda s, t: ref.divergence(s, t, divergence="jsd", beta=0.3, temperature=1.1, clip=None, vocab_size=V)),
    "top_k=8 tail": (lambda s, t, **kw: vocab_parallel_topk_divergence(s, t, k=8, tail=True, **kw),
                     lambda s, t: ref.topk_divergence(s, t, k=8, tail=True, temperature=1.1, vocab_size=V)),
    "entropy": (lambda s, t, **kw: vocab_parallel_entropy(s, **kw),
                lambda s, t: ref.entropy(s, temperature=1.1, vocab_size=V)),
    "token log-probs": (lambda s, t, **kw: vocab_parallel_token_logprobs(s, t.argmax(-1), **kw),
                        lambda s, t: ref.token_logprobs(s, t.argmax(-1), temperature=1.1, vocab_size=V)),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_bf16_kernel_matches_fp64_and_keeps_fp32_to_a_chunk(name):
    ours, reference = KERNELS[name]
    student, teacher, weights = bf16_logits(1)
    # the reference sees the same bf16 numbers in fp64: the kernel's own error is fp32 statistics (values)
    # and the bf16 rounding of the returned gradient (2^-9 relative, so rtol 1e-2 + atol 1e-4)
    ref_value, ref_grad = ref.value_and_grad(reference, student, weights, teacher)
    leaf = student.clone().requires_grad_()
    with LargestFp32() as seen:
        value = ours(leaf, teacher, temperature=1.1, vocab_size=V, chunk_size=C)
        (grad,) = torch.autograd.grad((value * weights).sum(), leaf)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value.double(), ref_value, rtol=5e-6, atol=5e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-4)
    # five [C, V] fp32 work buffers are the documented maximum; N / C = 16 chunks
    assert seen.numel <= 5 * C * V, f"{name}: an fp32 tensor of {seen.numel} elements ({seen.op}) > 5 chunks"


def test_bf16_fused_projection_keeps_fp32_to_a_chunk():
    """bf16 hidden states and weights: the only fp32 tensor larger than a chunk is the [V, H] weight-gradient
    accumulator (weight-sized, as megatron's fp32 main_grad); no [N, V] fp32 tensor exists."""
    gen = torch.Generator().manual_seed(2)
    h_s = torch.randn(N, H, generator=gen).bfloat16().requires_grad_()
    h_t = (h_s.detach().float() + 0.3 * torch.randn(N, H, generator=gen)).bfloat16()
    w = (torch.randn(V, H, generator=gen) * 0.5).bfloat16().requires_grad_()

    def token_loss(s, t, rows):
        assert s.dtype == torch.bfloat16  # the projection's matmul runs in bf16
        return vocab_parallel_divergence(s, t, clip=0.05, vocab_size=V)

    with LargestFp32() as seen:
        loss, _ = projected_token_loss(h_s, w, h_t, w, token_loss, torch.ones(N), chunk_tokens=C)
        loss.backward()
    assert w.grad.dtype == torch.bfloat16 and h_s.grad.dtype == torch.bfloat16
    assert seen.numel <= max(V * H, 5 * C * V), f"an fp32 tensor of {seen.numel} elements ({seen.op})"
    assert seen.numel < N * V
