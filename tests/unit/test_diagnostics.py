"""The per-step diagnostics (opsd/diagnostics.py): leakage counter on crafted responses, and the teacher's
advantage against a direct computation with the HF models in fp64 (single process, TP1)."""

from __future__ import annotations

import pytest
import torch

from megatron_opsd.data.templates import TEACHER_TEMPLATE
from megatron_opsd.opsd.diagnostics import leak_markers, leakage_rate, leaks


def test_leak_markers_of_the_paper_template_and_a_custom_one():
    markers = leak_markers(TEACHER_TEMPLATE)
    assert "=== Reference Solution Begin ===" in markers and "=== Reference Solution End ===" in markers
    custom = leak_markers("Q: {problem}\n<<SOL>> {solution} <</SOL>>\nAnswer it.")
    assert "<<SOL>>" in custom and "<</SOL>>" in custom  # the text around the solution on its line
    assert leak_markers("{problem}") == ("reference", "the solution says")  # no solution: the phrases


def test_leakage_counts_crafted_responses():
    markers = leak_markers(TEACHER_TEMPLATE)
    leaking = ["As the Reference solution shows, 3 + 4 = 7. \\boxed{7}",
               "The solution says the answer is 7.",
               "=== Reference Solution End ===\n\\boxed{7}",
               "THE SOLUTION SAYS 7"]
    clean = ["3 + 4 = 7, so the answer is \\boxed{7}.", "I solve it myself: 7", "", "We refer to step 2."]
    assert [leaks(t, markers) for t in leaking] == [True] * 4
    assert [leaks(t, markers) for t in clean] == [False] * 4
    assert leakage_rate(leaking[:1] + clean, markers) == pytest.approx(1 / 5)
    assert leakage_rate([], markers) == 0.0
    assert leaks("<</SOL>> 7", leak_markers("{problem}\n<<SOL>>{solution}<</SOL>>"))
    assert not leaks("<</SOL>> 7", markers)


@pytest.mark.parametrize("fused", [True, False])
def test_teacher_advantage_equals_hf_fp64(runtime, fused):
    """Student = one random HF Llama, teacher = another (a frozen teacher with other weights): the
    metric equals the per-token mean of log p_T(solution | teacher prompt) - log p_S(solution | student
    prompt), computed with the HF models in fp64 over every reference token, pooled across problems."""
    from megatron_opsd.data.batch import collate_pairs
    from megatron_opsd.engine import wrap_ddp
    from megatron_opsd.opsd import FrozenTeacher, LossConfig, StepContext
    from megatron_opsd.opsd.diagnostics import teacher_advantage
    from megatron_opsd.data.contexts import PromptIds
    from tests.distributed.workers.rollout_common import megatron_from_hf
    from tests.hf_fixtures import build_hf_model

    hf_student, hf_teacher = build_hf_model("llama", seed=0), build_hf_model("llama", seed=1)
    chunks, cfg = megatron_from_hf(hf_student, runtime)
    teacher_chunks, _ = megatron_from_hf(hf_teacher, runtime)
    ddp = wrap_ddp(chunks, runtime)
    vocab, stop = cfg.vocab_size, 2
    gen = torch.Generator().manual_seed(0)
    prompts, solutions = [], []
    for n_s, extra, n_r in ((5, 9, 6), (3, 12, 11), (7, 4, 2)):
        student = torch.randint(3, vocab, (n_s,), generator=gen).tolist()
        prompts.append(PromptIds(student, student + torch.randint(3, vocab, (extra,), generator=gen).tolist()))
        solutions.append(torch.randint(3, vocab, (n_r,), generator=gen).tolist() + [stop])
    prompts.append(PromptIds([5] * 60, [5] * 127))  # the teacher side does not fit max_seq_len=128: left out
    solutions.append([7, stop])
    ctx = StepContext(runtime=runtime, loss=LossConfig(clip=None, fused_projection=fused), temperature=1.7,
                      vocab_size=vocab, teacher=FrozenTeacher(teacher_chunks))

    def micro_batches(pairs):
        return [collate_pairs(pairs[i:i + 2], 0) for i in range(0, len(pairs), 2)]

    got = teacher_advantage(ctx, ddp, prompts, solutions, stop_ids={stop}, max_seq_len=128,
                            micro_batches=micro_batches, pad_id=0)

    def logprobs(model, prompt, response):
        model = model.double()
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        return logp[len(prompt) - 1:-1].gather(1, torch.tensor(response)[:, None])[:, 0]

    s = torch.cat([logprobs(hf_student, p.student, r) for p, r in zip(prompts[:3], solutions[:3])])
    t = torch.cat([logprobs(hf_teacher, p.teacher, r) for p, r in zip(prompts[:3], solutions[:3])])
    assert got["student_logprob_ref"] == pytest.approx(s.mean().item(), abs=1e-5)
    assert got["teacher_logprob_ref"] == pytest.approx(t.mean().item(), abs=1e-5)
    assert got["teacher_advantage"] == pytest.approx((t.mean() - s.mean()).item(), abs=2e-5)
    assert abs(got["teacher_advantage"]) > 1e-3  # two different models: the check is not vacuous
