"""The last stage's output-layer override (opsd.step.ResponseProjection), single process."""

from __future__ import annotations

import gc
import weakref

import torch

from megatron_opsd.models.description import ModelConfig


def tiny():
    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=32)


def test_projection_does_not_keep_a_dropped_model_alive(runtime):
    """No reference cycle: a model dropped by the caller is freed at once, not at the next GC pass
    (on GPU its memory would otherwise linger: teacher copies, re-initialisations)."""
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd.step import _projection

    chunk = build_model(tiny(), runtime)[0]
    _projection(chunk)
    weight = weakref.ref(chunk.output_layer.weight)
    gc.disable()
    try:
        del chunk
        assert weight() is None, "the output layer's weight outlived its model"
    finally:
        gc.enable()


def test_deferred_mode_returns_hidden_states_and_the_weight_plain_mode_logits(runtime):
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd.step import _projection

    chunk = build_model(tiny(), runtime)[0]
    tokens = torch.randint(0, 64, (2, 7))
    positions = torch.arange(7).expand(2, 7)
    mask = torch.triu(torch.ones(1, 1, 7, 7, dtype=torch.bool), diagonal=1)
    index = torch.tensor([[2, 3, 4], [4, 5, 6]])
    with torch.no_grad():
        full = chunk(tokens, positions, mask)  # [B, L, V]
        with _projection(chunk).at(index) as head:
            logits = chunk(tokens, positions, mask)
        with _projection(chunk).at(index, deferred=True) as head:
            hidden = chunk(tokens, positions, mask)
    assert head.weight is chunk.output_layer.weight
    expected = torch.stack([full[b, index[b]] for b in range(2)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert hidden.shape == (2, 3, 32)
    torch.testing.assert_close(hidden @ head.weight.t(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # outside the context the layer is itself again
        torch.testing.assert_close(chunk(tokens, positions, mask), full)
