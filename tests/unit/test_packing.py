"""Packed micro-batches (``collate_pairs(pack=True)``): the same loss and gradients as padded ones.

Single process, TP1, fp64: every parameter gradient of one OPSD (and SFT) step on pairs whose lengths
differ 10x, packed (THD, ``PackedDotProductAttention``) vs padded (megatron's ``DotProductAttention``),
within 1e-6 relative; the packed layout itself (positions restart per pair, block-diagonal causal
mask); a packed row refused for an attention without THD. Layouts (TP2+SP, PP2, PP2xVPP2):
tests/distributed/test_opsd_step.py."""

from __future__ import annotations

import pytest
import torch

from megatron_opsd.data.batch import collate_pairs, pad_to_lengths
from megatron_opsd.data.contexts import build_pair
from megatron_opsd.models.description import ModelConfig


def tiny():
    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def pairs_10x(vocab: int, seed: int = 0):
    """Responses of 3..4 and 30..40 tokens alternating, teacher contexts longer than the student's."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(6):
        ls, extra = int(torch.randint(3, 8, (1,), generator=gen)), int(torch.randint(4, 12, (1,), generator=gen))
        lr = int(torch.randint(3, 5, (1,), generator=gen)) if i % 2 else int(torch.randint(30, 41, (1,), generator=gen))
        s, t, r = (torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (ls, ls + extra, lr))
        out.append(build_pair(s, t, r, stop_ids=set(), max_seq_len=128, overlong="drop"))
    return out


def test_packed_layout():
    pairs = pairs_10x(64)
    padded, packed = collate_pairs(pairs, 0), collate_pairs(pairs, 0, pack=True)
    for side_p, side in ((packed.student, padded.student), (packed.teacher, padded.teacher)):
        assert side_p.packed and not side.packed and side_p.tokens.shape == (1, int(side.lengths.sum()))
        sizes = side.lengths.tolist()
        assert torch.equal(side_p.position_ids[0], torch.cat([torch.arange(n) for n in sizes]))
        rows = [side.tokens[b, :n] for b, n in enumerate(sizes)]
        assert torch.equal(side_p.tokens[0], torch.cat(rows))
        # pair 1's first token attends to itself only; its last to its own tokens only
        start, n = sizes[0], sizes[1]
        mask = side_p.attention_mask[0, 0]
        assert (~mask[start]).nonzero().flatten().tolist() == [start]
        assert (~mask[start + n - 1]).nonzero().flatten().tolist() == list(range(start, start + n))
    # the loss sees the same tokens: ids at the packed index maps equal those at the padded ones
    keep = padded.loss_mask > 0
    assert torch.equal(packed.response_ids[0], padded.response_ids[keep])
    for name in ("student", "teacher"):
        got = getattr(packed, name).tokens[0][getattr(packed, f"{name}_index")[0]]
        rows = torch.arange(len(pairs))[:, None].expand_as(padded.loss_mask)[keep]
        want = getattr(padded, name).tokens[rows, getattr(padded, f"{name}_index")[keep]]
        assert torch.equal(got, want)
    # re-padding a packed batch (interleaved pipelines, sequence parallelism) keeps the pairs apart
    longer = pad_to_lengths(packed, packed.student.tokens.shape[1] + 3, packed.teacher.tokens.shape[1] + 5, 0)
    assert longer.student.packed and torch.equal(longer.student.pack_lengths, packed.student.pack_lengths)
    n = packed.student.tokens.shape[1]
    assert torch.equal(longer.student.attention_mask[..., :n, :n], packed.student.attention_mask)
    assert longer.student.attention_mask[0, 0, :n, n:].all()


def _step(runtime, full, batches, mode):
    from megatron_opsd.engine import wrap_ddp
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.models.sharding import load_unsharded
    from megatron_opsd.opsd import LossConfig, StepContext, Teacher
    from megatron_opsd.opsd.step import run_schedule, zero_grads

    chunks = [chunk.double() for chunk in build_model(tiny(), runtime)]  # two attention kernels: fp64
    load_unsharded(chunks, full, 0, 1)
    ddp = wrap_ddp(chunks, runtime)
    loss = LossConfig(mode=mode) if mode == "sft" else LossConfig(clip=None)
    ctx = StepContext(runtime=runtime, loss=loss, temperature=1.1, vocab_size=64,
                      teacher=None if mode == "sft" else Teacher(ddp))
    zero_grads(ddp, None)
    metrics = run_schedule(ctx, ddp, batches, pad_id=0)
    for chunk in ddp:  # the schedule leaves the grads summed in main_grad; finalize divides by tokens
        chunk.finish_grad_sync()
    return metrics, {n: p.main_grad.clone() for n, p in ddp[0].module.named_parameters()}


@pytest.mark.parametrize("mode", ["opsd", "sft"])
def test_packed_step_equals_padded(runtime, mode):
    from megatron_opsd.models.provider import build_model

    full = {n: p.detach().clone() for n, p in build_model(tiny(), runtime)[0].state_dict().items()
            if not n.endswith("_extra_state")}
    pairs = pairs_10x(64, seed=1)
    padded = [collate_pairs(pairs[i:i + 3], 0) for i in (0, 3)]
    packed = [collate_pairs(pairs[i:i + 3], 0, pack=True) for i in (0, 3)]
    ref, ref_grads = _step(runtime, full, padded, mode)
    got, grads = _step(runtime, full, packed, mode)
    assert got["response_tokens"] == ref["response_tokens"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert g.abs().max() > 0 or "bias" in name, name
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-6 * scale, msg=name)


def test_token_budget_groups():
    from megatron_opsd.data.batch import token_budget_groups

    # longest first: 12 > budget, a group of its own; 9; 7 and 5 open groups (9+7, 7+5 > 10); 3 joins 7;
    # 2 joins 5 (first fit: 9 has room 1, 7+3 none); 1 joins 9
    costs = [9, 3, 7, 5, 2, 1, 12]
    assert token_budget_groups(costs, 10) == [[6], [0, 5], [1, 2], [3, 4]]
    gen = torch.Generator().manual_seed(0)
    costs = torch.randint(1, 50, (40,), generator=gen).tolist()
    groups = token_budget_groups(costs, 64)
    assert sorted(i for g in groups for i in g) == list(range(40))
    assert all(sum(costs[i] for i in g) <= 64 for g in groups)


def test_token_budget_micro_batches_equal_fixed_ones(runtime):
    """Packed micro-batches formed by token count (their number differs from the fixed split) give the
    loss and gradients of fixed-size padded micro-batches: the loss is normalised by global tokens."""
    from megatron_opsd.data.batch import token_budget_groups
    from megatron_opsd.models.provider import build_model

    full = {n: p.detach().clone() for n, p in build_model(tiny(), runtime)[0].state_dict().items()
            if not n.endswith("_extra_state")}
    pairs = pairs_10x(64, seed=2)
    fixed = [collate_pairs(pairs[i:i + 2], 0) for i in range(0, 6, 2)]
    costs = [len(p.student_ids) + len(p.teacher_ids) for p in pairs]
    groups = token_budget_groups(costs, 80)
    assert len(groups) not in (1, 3, 6)  # a split of its own
    budget = [collate_pairs([pairs[i] for i in g], 0, pack=True) for g in groups]
    ref, ref_grads = _step(runtime, full, fixed, "opsd")
    got, grads = _step(runtime, full, budget, "opsd")
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-6 * scale, msg=name)


def test_thd_packed_seq_params_of_a_packed_side():
    """The THD parameters handed to Transformer Engine attention (GPU only: not run on them here)."""
    from megatron_opsd.opsd.step import packed_seq_params

    pairs = pairs_10x(64)
    side = collate_pairs(pairs, 0, pack=True, pad_to_multiple_of=64).student
    sizes = [len(p.student_ids) for p in pairs]
    params = packed_seq_params(side)
    assert side.tokens.shape[1] > sum(sizes)  # the trailing padding is a sequence of its own
    expected = torch.tensor([0, *sizes, side.tokens.shape[1] - sum(sizes)]).cumsum(0)
    assert params.qkv_format == "thd" and torch.equal(params.cu_seqlens_q.long(), expected)
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == int(expected.diff().max())


def test_packed_side_needs_an_attention_that_takes_thd(runtime):
    """A packed row through megatron's plain DotProductAttention would attend across pairs: refused."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd.step import _model_inputs

    chunk = build_model(tiny(), runtime)[0]
    packed = collate_pairs(pairs_10x(64), 0, pack=True)
    assert _model_inputs(chunk, packed.student)["attention_mask"] is None
    chunk.decoder.layers[1].self_attention.core_attention.__class__ = DotProductAttention
    with pytest.raises(ValueError, match="THD sequences; this model has DotProductAttention"):
        _model_inputs(chunk, packed.student)


def test_transformer_engine_gets_no_mask_for_padded_rows(runtime):
    """Under TE (its causal mask type) a padded side goes without the [B, 1, L, L] mask (TE wants none
    for causal; under CP it would be [B, 1, L/CP, L]); a packed one as THD."""
    from megatron_opsd.models.attention import PackedDotProductAttention
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd.step import _model_inputs

    chunk = build_model(tiny(), runtime)[0]
    padded = collate_pairs(pairs_10x(64), 0)
    assert _model_inputs(chunk, padded.student)["attention_mask"] is padded.student.attention_mask
    te_like = type("TEDotProductAttention", (PackedDotProductAttention,), {})
    for layer in chunk.decoder.layers:
        layer.self_attention.core_attention.__class__ = te_like
    assert _model_inputs(chunk, padded.student) == {"attention_mask": None}
    packed = collate_pairs(pairs_10x(64), 0, pack=True)
    assert _model_inputs(chunk, packed.student)["packed_seq_params"].qkv_format == "thd"


def test_moe_local_spec_takes_packed_micro_batches(runtime):
    """MoE models' local block spec gets the THD-capable attention too (it is built by megatron's own
    block-spec function, not the dense path)."""
    from megatron_opsd.models.attention import PackedDotProductAttention
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd.step import _model_inputs
    from tests.hf_fixtures import hf_config

    cfg = ModelConfig.from_hf_dict(hf_config("qwen3_moe").to_dict())
    chunk = build_model(cfg, runtime)[0]
    assert all(type(layer.self_attention.core_attention) is PackedDotProductAttention
               for layer in chunk.decoder.layers)
    packed = collate_pairs(pairs_10x(cfg.vocab_size), 0, pack=True)
    assert _model_inputs(chunk, packed.student)["packed_seq_params"].qkv_format == "thd"


def test_padded_rows_with_autograd_take_sdpa_equal_to_megatrons_attention(runtime, monkeypatch):
    """A padded micro-batch under autograd goes to SDPA with its mask: the same output and input
    gradients as megatron's unfused ``DotProductAttention`` (fp64, right- and left-padded rows, GQA);
    without autograd megatron's path runs (bit for bit HF's eager attention in the conversion check),
    except inside ``fused_attention_without_grad`` (the step's teacher forward)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_opsd.models import attention
    from megatron_opsd.models.provider import build_model

    chunk = build_model(tiny(), runtime)[0].double()
    core = chunk.decoder.layers[0].self_attention.core_attention
    s, b, heads, groups, d = 12, 3, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, n, d, generator=gen, dtype=torch.float64) for n in (heads, groups, groups))
    real = torch.ones(b, s, dtype=torch.bool)
    real[0, 9:] = False  # right padding
    real[1, :4] = False  # left padding: its first queries see no real key
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = ~(causal[None] & real[:, None, :])[:, None]  # True = masked, [b, 1, s, s]

    # real queries only: a padded query's output is never read (megatron's path gives it a uniform row)
    rows = real.t()[:, :, None].expand(s, b, heads * d)

    def run(forward):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = forward(core, *leaves, mask)
        out.backward(rows.double())
        return out.detach(), [x.grad for x in leaves]

    calls = []
    real_sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real_sdpa(*a, **kw))
    out, grads = run(lambda m, *args: m(*args))
    ref_out, ref_grads = run(lambda m, *args: DotProductAttention.forward(m, *args))
    assert calls, "the padded micro-batch did not take SDPA"
    torch.testing.assert_close(out[rows], ref_out[rows], rtol=1e-12, atol=1e-12)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12)
    calls.clear()
    with torch.no_grad():
        core(q, k, v, mask)
    assert not calls
    # the training step's teacher forward asks for SDPA without autograd too: the same real rows
    with torch.no_grad(), attention.fused_attention_without_grad():
        teacher_out = core(q, k, v, mask)
    assert calls
    torch.testing.assert_close(teacher_out[rows], ref_out[rows], rtol=1e-12, atol=1e-12)
    calls.clear()
    with torch.no_grad():  # and only inside the context
        core(q, k, v, mask)
    assert not calls


def test_the_steps_teacher_forward_takes_sdpa(runtime, monkeypatch):
    """The OPSD step's teacher forward (no autograd) runs padded micro-batches through SDPA, as the
    student's does: megatron's unfused path would materialise the whole [b, heads, s, s] fp32 scores."""
    from megatron_opsd.models import attention
    from megatron_opsd.models.provider import build_model

    full = {n: p.detach().clone() for n, p in build_model(tiny(), runtime)[0].state_dict().items()
            if not n.endswith("_extra_state")}
    grad_modes = []
    real_sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: grad_modes.append(torch.is_grad_enabled()) or real_sdpa(*a, **kw))
    _step(runtime, full, [collate_pairs(pairs_10x(64)[:3], 0)], "opsd")
    layers = tiny().num_hidden_layers
    assert grad_modes.count(False) == layers and grad_modes.count(True) == layers  # teacher, student
