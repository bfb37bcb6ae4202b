"""Alignment of student and teacher contexts, as properties over random inputs and both tokenizer kinds.

The expected response of a sample is derived from how the test built it (its non-stop tokens, then the
stop id if one was sampled), and the expected prompt ids from the tokenizer; the code under test only
produces the batches that are checked against them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_opsd.data.batch import collate_pairs, gather_response_positions
from megatron_opsd.data.config import DataConfig
from megatron_opsd.data.contexts import ContextBuilder, build_pair
from megatron_opsd.data.dataset import Problem

PROPERTY = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Printable text with newlines and non-ASCII (byte-level BPE and sentencepiece byte fallback encode all).
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), include_characters="\n"),
               min_size=1, max_size=40).filter(str.strip)


@st.composite
def samples(draw, tokenizer, num_max=4):
    """Problems and, per problem, a sampled response and the response that must be scored."""
    non_stop = st.integers(0, tokenizer.vocab_size - 1).filter(lambda t: t not in tokenizer.stop_ids)
    problems, responses, expected = [], [], []
    for i in range(draw(st.integers(1, num_max))):
        problems.append(Problem(problem=draw(TEXT), solution=draw(TEXT), answer=None, source=f"gen:{i}"))
        body = draw(st.lists(non_stop, min_size=1, max_size=12))
        if draw(st.booleans()):  # stopped early: the stop id is scored, the padding after it is not
            stop = draw(st.sampled_from(sorted(tokenizer.stop_ids)))
            responses.append(body + [stop] + [tokenizer.pad_id] * draw(st.integers(0, 5)))
            expected.append(body + [stop])
        else:  # hit the generation limit: every token is scored
            responses.append(body)
            expected.append(body)
    return problems, responses, expected


def _build(tokenizer, problems, responses, **cfg_kwargs):
    cfg = DataConfig(max_prompt_len=4096, max_seq_len=8192, **cfg_kwargs)
    builder = ContextBuilder(cfg, tokenizer, problems)
    prompts = [builder.prompt_ids(i) for i in range(len(problems))]
    pairs = [builder.build(p, r) for p, r in zip(prompts, responses)]
    return prompts, pairs, builder.stats


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
@PROPERTY
@given(data=st.data(), multiple=st.sampled_from([1, 3, 8]))
def test_positions_predict_exactly_the_response(kind, data, multiple, request):
    tokenizer = request.getfixturevalue("sp_tokenizer" if kind == "sentencepiece" else "hf_tokenizer")
    problems, responses, expected = data.draw(samples(tokenizer))
    prompts, pairs, stats = _build(tokenizer, problems, responses)
    assert stats.num_pairs == len(problems) and stats.num_truncated == 0
    mb = collate_pairs(pairs, tokenizer.pad_id, pad_to_multiple_of=multiple)

    for b, (prompt, want) in enumerate(zip(prompts, expected)):
        n = len(want)
        assert mb.response_ids[b, :n].tolist() == want
        assert mb.loss_mask[b].tolist() == [1.0] * n + [0.0] * (mb.loss_mask.shape[1] - n)
        for side, index, prompt_ids in ((mb.student, mb.student_index, prompt.student),
                                        (mb.teacher, mb.teacher_index, prompt.teacher)):
            length = len(prompt_ids) + n
            assert side.lengths[b] == length and side.tokens.shape[1] % multiple == 0
            # The prompt is intact and the same response ids follow it on both sides.
            assert side.tokens[b, :len(prompt_ids)].tolist() == prompt_ids
            assert side.tokens[b, len(prompt_ids):length].tolist() == want
            assert (side.tokens[b, length:] == tokenizer.pad_id).all()
            # Logits at index[b, r] score the token at index[b, r] + 1, which is response token r;
            # the scored positions are exactly the response's.
            predicted = side.tokens[b, index[b, :n] + 1].tolist()
            assert predicted == want
            assert (index[b, :n] + 1).tolist() == list(range(len(prompt_ids), length))
            assert (index[b] < length).all()  # padded entries still point at real positions


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
@PROPERTY
@given(data=st.data())
def test_padding_never_shifts_a_pair(kind, data, request):
    """A pair collated alone equals the same pair among neighbours, at its valid positions."""
    tokenizer = request.getfixturevalue("sp_tokenizer" if kind == "sentencepiece" else "hf_tokenizer")
    problems, responses, _ = data.draw(samples(tokenizer, num_max=5))
    _, pairs, _ = _build(tokenizer, problems, responses)
    together = collate_pairs(pairs, tokenizer.pad_id)
    for b, pair in enumerate(pairs):
        alone = collate_pairs([pair], tokenizer.pad_id)
        n = len(pair.response_ids)
        for side in ("student", "teacher"):
            one, many = getattr(alone, side), getattr(together, side)
            length = int(one.lengths[0])
            assert torch.equal(one.tokens[0, :length], many.tokens[b, :length])
            assert torch.equal(one.position_ids[0, :length], many.position_ids[b, :length])
            assert torch.equal(one.attention_mask[0, :, :length, :length],
                               many.attention_mask[b, :, :length, :length])
            index = f"{side}_index"
            assert torch.equal(getattr(alone, index)[0, :n], getattr(together, index)[b, :n])
        assert torch.equal(alone.response_ids[0, :n], together.response_ids[b, :n])


@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), multiple=st.sampled_from([1, 4]))
@settings(max_examples=30, deadline=None)
def test_attention_mask_is_causal_plus_key_padding(lengths, multiple):
    pairs = [build_pair([7] * (n - 1 or 1), [8] * n, [5], stop_ids={0}, max_seq_len=64, overlong="drop")
             for n in lengths]
    mb = collate_pairs(pairs, pad_id=0, pad_to_multiple_of=multiple)
    for side in (mb.student, mb.teacher):
        num, width = side.tokens.shape
        assert side.attention_mask.shape == (num, 1, width, width) and side.attention_mask.dtype == torch.bool
        for b in range(num):
            valid = int(side.lengths[b])
            assert side.position_ids[b].tolist() == list(range(width))
            for q in range(width):
                # megatron-core: True = not attended. Key k is hidden if in the future or padding.
                want = [k > q or k >= valid for k in range(width)]
                assert side.attention_mask[b, 0, q].tolist() == want
                assert not all(want)  # no query row is fully masked (softmax stays finite)


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
@PROPERTY
@given(data=st.data())
def test_truncation_cuts_only_the_response_tail(kind, data, request):
    tokenizer = request.getfixturevalue("sp_tokenizer" if kind == "sentencepiece" else "hf_tokenizer")
    problems, responses, expected = data.draw(samples(tokenizer, num_max=1))
    prompts, _, _ = _build(tokenizer, problems, responses)
    longest_prompt = max(len(prompts[0].student), len(prompts[0].teacher))
    room = data.draw(st.integers(-2, len(expected[0]) + 2))
    pair = build_pair(prompts[0].student, prompts[0].teacher, responses[0], stop_ids=tokenizer.stop_ids,
                      max_seq_len=longest_prompt + room, overlong="truncate_response")
    if room < 1:
        assert pair is None
        return
    want = expected[0][:room]
    assert pair.response_ids == want and pair.truncated == (len(expected[0]) > room)
    assert pair.teacher_ids[:len(prompts[0].teacher)] == prompts[0].teacher
    assert pair.student_ids[:len(prompts[0].student)] == prompts[0].student
    assert max(len(pair.student_ids), len(pair.teacher_ids)) <= longest_prompt + room


# --- A fake model: the divergence is computed on the right (teacher, student) position pairs. ---

VOCAB = 16


def _scale(kind: str, token: torch.Tensor) -> torch.Tensor:
    """Logit given to the next token: depends on the context kind and on the token id."""
    return (1.0 if kind == "student" else 2.0) + 0.5 * (token % 5).double()


def fake_model_logits(tokens_bl: torch.Tensor, kind: str) -> torch.Tensor:
    """[L, B, V] logits (megatron layout): position i puts ``_scale`` on the token at i + 1, 0 elsewhere;
    the last position, which has no next token, gives zeros."""
    num, width = tokens_bl.shape
    logits = torch.zeros(width, num, VOCAB, dtype=torch.float64)
    nxt = tokens_bl[:, 1:].T  # [L-1, B]
    logits[:-1].scatter_(2, nxt[..., None], _scale(kind, nxt)[..., None])
    return logits


def expected_forward_kl(token: int) -> float:
    """KL(p_T || p_S) when both put logit a on ``token`` and 0 on the V-1 others (closed form)."""
    a_t, a_s = 2.0 + 0.5 * (token % 5), 1.0 + 0.5 * (token % 5)
    z_t, z_s = math.exp(a_t) + VOCAB - 1, math.exp(a_s) + VOCAB - 1
    hit = math.exp(a_t) / z_t * math.log((math.exp(a_t) / z_t) / (math.exp(a_s) / z_s))
    miss = (VOCAB - 1) / z_t * math.log((1 / z_t) / (1 / z_s))
    return hit + miss


def per_token_kl(mb, student_index, teacher_index) -> torch.Tensor:
    student = gather_response_positions(fake_model_logits(mb.student.tokens, "student"), student_index)
    teacher = gather_response_positions(fake_model_logits(mb.teacher.tokens, "teacher"), teacher_index)
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def test_fake_model_divergence_uses_the_right_pairs():
    # Prompts of different lengths per side and per sample; consecutive response tokens differ mod 5,
    # so reading a neighbouring position changes the value.
    responses = [[3, 4, 10, 1, 2, 15], [6, 7, 13], [9, 0]]
    pairs = [build_pair([11] * (2 + i), [12] * (7 + 2 * i), resp, stop_ids={15}, max_seq_len=64,
                        overlong="drop") for i, resp in enumerate(responses)]
    mb = collate_pairs(pairs, pad_id=14)
    kl = per_token_kl(mb, mb.student_index, mb.teacher_index)
    for b, resp in enumerate(responses):
        want = torch.tensor([expected_forward_kl(t) for t in resp], dtype=torch.float64)
        torch.testing.assert_close(kl[b, :len(resp)], want, rtol=1e-12, atol=1e-12)

    width = mb.loss_mask.shape[1]
    shifted_s = (mb.student_index + 1).clamp(max=mb.student.tokens.shape[1] - 1)
    shifted_t = (mb.teacher_index + 1).clamp(max=mb.teacher.tokens.shape[1] - 1)
    bugs = {
        "teacher one position late": (mb.student_index, shifted_t),
        "both sides one position late": (shifted_s, shifted_t),
        "both one early (prompt_len - 2)": (mb.student_index - 1, mb.teacher_index - 1),
        "teacher read at the student's offsets": (mb.student_index, mb.student_index),
    }
    good = kl * mb.loss_mask
    for name, (s_index, t_index) in bugs.items():
        bad = per_token_kl(mb, s_index, t_index) * mb.loss_mask
        assert not torch.allclose(bad, good), f"{name}: an off-by-one map went unnoticed"
    assert width == max(map(len, responses))


def test_gather_layouts_agree_and_carry_gradients():
    torch.manual_seed(0)
    hidden_lbd = torch.randn(7, 3, 5, requires_grad=True)
    index = torch.tensor([[0, 1, 6], [2, 2, 3], [5, 4, 0]])
    out = gather_response_positions(hidden_lbd, index)
    assert out.shape == (3, 3, 5)
    for b in range(3):
        for r in range(3):
            assert torch.equal(out[b, r], hidden_lbd[index[b, r], b])
    assert torch.equal(gather_response_positions(hidden_lbd.transpose(0, 1), index, layout="bld"), out)
    out.sum().backward()
    # Position 2 of row 1 is gathered twice; unselected positions get no gradient.
    assert hidden_lbd.grad[2, 1].eq(2).all() and hidden_lbd.grad[1, 1].eq(0).all()
    with pytest.raises(ValueError, match="does not match"):
        gather_response_positions(hidden_lbd, index[:2])


def test_one_pair_packed_is_the_padded_micro_batch_and_moves():
    """Packing itself: tests/unit/test_packing.py."""
    pair = build_pair([1, 2], [1, 2, 3], [4], stop_ids={0}, max_seq_len=8, overlong="drop")
    packed = collate_pairs([pair], pad_id=0, pack=True)
    mb = collate_pairs([pair], pad_id=0)
    for side_p, side in ((packed.student, mb.student), (packed.teacher, mb.teacher)):
        assert not side_p.packed and all(torch.equal(getattr(side_p, f), getattr(side, f)) for f in
                                         ("tokens", "position_ids", "attention_mask", "lengths", "pack_lengths"))
    assert torch.equal(packed.student_index, mb.student_index) and torch.equal(packed.loss_mask, mb.loss_mask)
    moved = mb.to("cpu")
    assert moved is not mb and torch.equal(moved.teacher.attention_mask, mb.teacher.attention_mask)
    assert torch.equal(moved.student_index, mb.student_index) and mb.num_response_tokens == 1
