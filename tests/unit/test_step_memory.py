"""What the step's last phases allocate on CPU: nothing the size of a buffer or of the largest parameter.

At the OPSD step's end (gradient sync, optimizer update, parameter gather) the fixed state is live, so
a transient as large as the fp32 gradient buffer or a [V, H] vocabulary matrix sets the process's peak
(``benchmarks/vs_trl.py``). Single process, TP1 / DP1: the largest single allocation, from the torch
profiler's memory events, stays far below those sizes, and the results are still the reference's.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opsd.models.description import ModelConfig

VOCAB, HIDDEN = 4096, 64  # the vocabulary matrices dominate, as in real models: 256K params each


def tiny():
    return ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64)


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return max([0, *sizes])


@pytest.fixture
def model(runtime):
    from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
    from megatron_opsd.models.provider import build_model

    ddp = wrap_ddp(build_model(tiny(), runtime), runtime)
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=1e-2, clip_grad=0.0))
    gen = torch.Generator().manual_seed(0)
    for p in ddp[0].module.parameters():  # what a backward pass leaves in megatron's fp32 buffer
        p.main_grad.copy_(torch.randn(p.shape, generator=gen))
    return ddp, optimizer


def test_single_rank_grad_sync_and_param_gather_copy_no_buffer(model):
    ddp, _ = model
    chunk = ddp[0]
    assert chunk.ddp_config.use_distributed_optimizer  # the default: reduce-scatter and all-gather
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in chunk.buffers)
    param_bytes = sum(b.param_data.numel() * b.param_data.element_size() for b in chunk.buffers)
    grads = {n: p.main_grad.clone() for n, p in chunk.module.named_parameters()}
    params = {n: p.detach().clone() for n, p in chunk.module.named_parameters()}

    def sync():
        chunk.start_grad_sync()
        chunk.finish_grad_sync()
        chunk.start_param_sync(force_sync=True)

    assert largest_allocation(sync) < min(grad_bytes, param_bytes) / 8
    for n, p in chunk.module.named_parameters():  # one rank: both collectives are the identity
        assert torch.equal(p.main_grad, grads[n]), n
        assert torch.equal(p.detach(), params[n]), n


def test_cpu_adamw_is_fused_updates_in_place_and_matches_adam(model):
    from megatron_opsd.engine import _torch_optimizers
    from megatron_opsd.opsd.step import optimizer_step

    ddp, optimizer = model
    (inner,) = _torch_optimizers(optimizer)
    assert all(group["fused"] for group in inner.param_groups)
    named = dict(ddp[0].module.named_parameters())
    before = {n: p.detach().double().clone() for n, p in named.items()}
    grads = {n: p.main_grad.double().clone() for n, p in named.items()}
    largest = max(p.numel() * 4 for p in named.values())  # fp32 main params and Adam moments

    optimizer_step(optimizer, 0.0, 1)
    # Adam's first step, in fp64 from its definition: m̂ = g, v̂ = g², p -= lr g / (|g| + eps)
    for n, p in named.items():
        want = before[n] - 1e-2 * grads[n] / (grads[n].abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-6, msg=n)
    # the first step creates the moments; a later one allocates nothing parameter-sized
    assert largest_allocation(lambda: optimizer_step(optimizer, 0.0, 2)) < largest / 8


def test_fused_flag_survives_loading_a_state_dict_without_it(model):
    from megatron_opsd.engine import _torch_optimizers

    _, optimizer = model
    (inner,) = _torch_optimizers(optimizer)
    state = inner.state_dict()
    for group in state["param_groups"]:  # as saved before the flag existed
        group["fused"] = None
    inner.load_state_dict(state)
    assert all(group["fused"] is True and group["foreach"] is False for group in inner.param_groups)


def ops_run(fn) -> set[str]:
    """Names of the torch ops ``fn`` runs (autograd's backward included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("tied,wraps", [(False, 1), (True, 1), (False, 2)])
def test_embedding_gradient_goes_into_main_grad_row_by_row(runtime, monkeypatch, dtype, tied, wraps):
    """The word embedding's gradient over two micro-batches (repeated ids) reaches ``main_grad`` without
    the dense [V, H] gradient of ``F.embedding``'s backward (``aten::embedding_dense_backward``, which
    megatron's own path runs, and whose sum it adds to ``main_grad``): row by row, equal to the exact
    sums (an upstream gradient of ones times the micro-batch's scale: each row gets the scale times the
    id's count). A tied embedding (``zero_out_wgrad``) is left to megatron's hook. Wrapped twice (the
    embedded default's warm-up, then the trainer), the gradient is still added once."""
    from dataclasses import replace

    from megatron_opsd import cpu_compat
    from megatron_opsd.engine import wrap_ddp
    from megatron_opsd.models.provider import ModelBuildConfig, build_model

    cfg = replace(tiny(), tie_word_embeddings=tied)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))  # ids repeat
    positions = torch.arange(16).expand(2, 16)
    want = torch.zeros(VOCAB, HIDDEN, dtype=torch.float64)
    want.index_add_(0, tokens.flatten(), torch.ones(tokens.numel(), HIDDEN, dtype=torch.float64) * (1.0 + 3.0))

    def embedding_grads(ours: bool):
        if not ours:
            monkeypatch.setattr(cpu_compat, "embedding_grads_into_main_grad", lambda chunks: None)
        torch.manual_seed(0)
        chunks = build_model(cfg, runtime, ModelBuildConfig(dtype=dtype))
        for _ in range(wraps):
            ddp = wrap_ddp(chunks, runtime)
        monkeypatch.undo()
        model = ddp[0].module
        weight = model.embedding.word_embeddings.weight
        ddp[0].zero_grad_buffer()
        ops = set()
        for scale in (1.0, 3.0):  # two micro-batches
            out = model.embedding(tokens, positions)
            ops |= ops_run(lambda: (out.float().sum() * scale).backward())
        return weight.main_grad.double(), "aten::embedding_dense_backward" in ops

    grads, dense = embedding_grads(ours=True)
    reference, reference_dense = embedding_grads(ours=False)
    assert reference_dense and dense == tied
    if tied:  # megatron's hook adds the embedding's and the (unused) output layer's gradients
        torch.testing.assert_close(grads, reference, rtol=0, atol=0)
    else:
        torch.testing.assert_close(grads, want, rtol=0, atol=0)
        torch.testing.assert_close(reference, want, rtol=0, atol=0)
