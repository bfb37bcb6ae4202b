"""The method interface: every loss.mode has a method; what each puts into its micro-batches."""

from __future__ import annotations

import typing

from megatron_opsd.data import ContextBuilder
from megatron_opsd.data.config import DataConfig
from megatron_opsd.data.dataset import Problem
from megatron_opsd.methods import METHODS, OPD, OPSD, SFT, StepInputs, method_for, sample_prompts
from megatron_opsd.methods.grpo import GRPO
from megatron_opsd.methods.opsd_grpo import OPSDGRPO
from megatron_opsd.methods.sft import solution_ids
from megatron_opsd.opsd import LossConfig
from megatron_opsd.rollout.types import Rollout

PROBLEMS = [Problem(problem=f"{i}+{i}?", solution=f"{i}+{i}={2 * i}", answer=str(2 * i), source=f"t.jsonl:{i}")
            for i in range(1, 5)]


def inputs(tokenizer, runtime, step=1, **kwargs) -> StepInputs:
    contexts = ContextBuilder(DataConfig(), tokenizer, PROBLEMS)
    return StepInputs(contexts, PROBLEMS, tokenizer, runtime, micro_batch_size=2, step=step, **kwargs)


class Sampler:
    def next_batch(self):
        return [0, 1, 2, 3]


def test_every_loss_mode_has_a_method():
    modes = typing.get_args(typing.get_type_hints(LossConfig)["mode"])
    assert sorted(METHODS) == sorted(modes)
    for mode in modes:
        method = method_for(LossConfig(mode=mode, opd_teacher_load="x" if mode == "opd" else None))
        assert type(method) is METHODS[mode] and method.name == mode


def test_sft_trains_on_the_solutions_and_the_warm_up_alternates_prompts(sp_tokenizer, runtime):
    data = inputs(sp_tokenizer, runtime, step=3)
    prompts, keys = sample_prompts(Sampler(), data.contexts, 2, 1)
    rollout = SFT(LossConfig(mode="sft")).rollout(data, prompts, keys)
    assert rollout.response_ids == [solution_ids(sp_tokenizer, p) for p in PROBLEMS]
    assert rollout.response_ids[0][-1] in sp_tokenizer.stop_ids
    # step 3: examples 3..6 of the warm-up, spread evenly: with 0.5 odd ones take the student's prompt
    for fraction, expected in ((0.0, "ssss"), (0.5, "stst"), (0.25, "stss"), (0.75, "ttst"), (1.0, "tttt")):
        batches, metrics = SFT(LossConfig(mode="sft"), teacher_fraction=fraction).micro_batches(
            data, prompts, rollout)
        assert metrics == {} and [b.loss_mask.shape[0] for b in batches] == [2, 2]
        rows = [(b, r) for b in batches for r in range(2)]
        for (batch, r), (ids, _), side, solution in zip(rows, prompts, expected, rollout.response_ids):
            prompt = ids.student if side == "s" else ids.teacher
            tokens = batch.student.tokens[r, :len(prompt)].tolist()
            assert tokens == prompt
            assert batch.response_ids[r][batch.loss_mask[r] > 0].tolist() == solution


def test_teacher_contexts_grpo_and_opd_the_students_opsd_and_opsd_grpo_the_teachers(sp_tokenizer, runtime):
    data = inputs(sp_tokenizer, runtime, samples_per_prompt=2, reward_fn=lambda problem, text: float(len(text)))
    prompts, keys = sample_prompts(Sampler(), data.contexts, 0, 2)
    assert [k.sample_idx for k in keys] == [0, 1] * 4 and [i for _, i in prompts] == [0, 0, 1, 1, 2, 2, 3, 3]
    responses = [[10 + r, 11 + r, 12] for r in range(8)]
    rollout = Rollout(response_ids=responses, model_logprobs=[[-1.0] * 3 for _ in responses])
    loss = dict(advantage="grpo")
    for method, teacher_side in ((GRPO(LossConfig(mode="grpo", **loss)), "student"),
                                 (OPSDGRPO(LossConfig(mode="opsd+grpo", **loss)), "teacher"),
                                 (OPSD(LossConfig()), "teacher"),
                                 (OPD(LossConfig(mode="opd", opd_teacher_load="x")), "student")):
        batches, metrics = method.micro_batches(data, prompts, rollout)
        row = 0
        for batch in batches:
            for r in range(batch.loss_mask.shape[0]):
                ids = prompts[row][0]
                expected = getattr(ids, teacher_side)
                assert batch.teacher.tokens[r, :len(expected)].tolist() == expected, (method.name, row)
                row += 1
        assert row == len(responses)
        if isinstance(method, GRPO):
            assert metrics["groups"] == 4 and batches[0].advantages is not None
            assert batches[0].old_logprobs[0, :3].tolist() == [-1.0] * 3
        else:
            assert metrics == {} and batches[0].advantages is None
