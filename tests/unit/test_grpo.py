"""GRPO pieces: rewards, group advantages, the clipped token loss, config refusals."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from megatron_opsd.config import load_config
from megatron_opsd.data.batch import collate_pairs
from megatron_opsd.data.contexts import build_pair
from megatron_opsd.data.dataset import Problem
from megatron_opsd.methods.grpo import (RewardError, answer_reward, group_advantages, grpo_token_loss,
                                     load_reward_function, policy_micro_batches, score)

P = Problem(problem="1+1?", solution="2", answer="2", source="train.jsonl:7")


def test_answer_reward_and_empty_response():
    assert answer_reward(P, "so \\boxed{2}") == 1.0
    assert answer_reward(P, "\\boxed{3}") == 0.0
    assert answer_reward(P, "") == 0.0  # an empty response scores, it does not fail
    assert score(answer_reward, [P, P], ["", "\\boxed{2.0}"]) == [0.0, 1.0]


def test_reward_function_by_dotted_path_and_failures(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.length = lambda problem, text: float(len(text))
    module.boom = lambda problem, text: 1 / 0
    module.nan = lambda problem, text: math.nan
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    assert score(load_reward_function("my_rewards:length"), [P], ["abc"]) == [3.0]
    with pytest.raises(RewardError, match=r"raised on problem train.jsonl:7: ZeroDivisionError"):
        score(load_reward_function("my_rewards:boom"), [P], ["x"])
    with pytest.raises(RewardError, match=r"returned nan on problem train.jsonl:7"):
        score(load_reward_function("my_rewards:nan"), [P], ["x"])
    for bad in ("my_rewards", "my_rewards:missing", "no_such_module_xyz:f"):
        with pytest.raises(ValueError, match="loss.reward"):
            load_reward_function(bad)


def test_group_advantages_grpo_and_dr_grpo():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    adv, flat = group_advantages(rewards, 4)
    assert flat == 1
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(adv[4:], torch.zeros(4, dtype=torch.float64))  # all equal: exactly 0, no NaN
    dr, _ = group_advantages(rewards, 4, scale_by_std=False)
    assert dr[:4].tolist() == [0.5, -0.5, -0.5, 0.5] and dr[4:].abs().sum() == 0
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_clipped_loss_against_a_direct_formula():
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(50, generator=gen, dtype=torch.float64) - 2).requires_grad_()
    old = logp.detach() + 0.5 * torch.randn(50, generator=gen, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(50, generator=gen, dtype=torch.float64)
    adv = torch.randn(50, generator=gen, dtype=torch.float64)
    loss, stats = grpo_token_loss(logp, old, adv, ref, clip_eps=0.2, kl_coef=0.1)
    expected = []
    for lp, o, r, a in zip(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist()):
        ratio = math.exp(lp - o)
        pg = -min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
        expected.append(pg + 0.1 * (math.exp(r - lp) - (r - lp) - 1))
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    assert 0 < stats["ratio_clipped"].sum() < 50
    assert (stats["kl"] >= 0).all()
    # ratio 1 (on-policy): the gradient is -A per token, nothing clipped
    logp2 = logp.detach().clone().requires_grad_()
    loss2, stats2 = grpo_token_loss(logp2, logp2.detach(), adv, None, clip_eps=0.2, kl_coef=0.0)
    loss2.sum().backward()
    torch.testing.assert_close(logp2.grad, -adv)
    assert stats2["ratio_clipped"].sum() == 0 and "kl" not in stats2


def test_collate_carries_advantages_and_old_logprobs():
    pairs = [build_pair([1, 2], [1, 2], [5, 6, 7], stop_ids=set(), max_seq_len=64, overlong="drop"),
             build_pair([1], [1], [8], stop_ids=set(), max_seq_len=64, overlong="drop")]
    batch = collate_pairs(pairs, 0, advantages=[0.5, -1.0], old_logprobs=[[-1.0, -2.0, -3.0, -9.0], [-4.0]])
    assert batch.advantages.tolist() == [[0.5, 0.5, 0.5], [-1.0, 0.0, 0.0]]
    assert batch.old_logprobs.tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]]
    assert batch.to("cpu").advantages is not None and collate_pairs(pairs, 0).to("cpu").advantages is None


def test_config_refusals():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        load_config(None, ["--loss.mode", "grpo"])
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        load_config(None, ["--loss.mode", "opsd+grpo"])
    load_config(None, ["--loss.mode", "grpo", "--rollout.samples_per_prompt", "2"])
    with pytest.raises(ValueError, match="updates_per_rollout"):
        load_config(None, ["--train.updates_per_rollout", "2"])
    with pytest.raises(ValueError, match="kl_coef"):
        load_config(None, ["--loss.mode", "opsd+grpo", "--rollout.samples_per_prompt", "2", "--loss.kl_coef", "0.1"])


def test_empty_responses_keep_their_reward_but_get_no_pair():
    stop = 2
    responses = [[5, 6, stop], [], [stop], [7, 8]]  # an empty one, and one that is only... a stop token
    rewards = score(answer_reward, [P] * 4, ["", "", "", "\\boxed{2}"])
    adv, _ = group_advantages(rewards, 4)
    assert torch.isfinite(adv).all() and adv[1] < 0  # the empty response is in its group

    def build(row, response):
        return build_pair([1, 9], [1, 9], response, stop_ids={stop}, max_seq_len=64, overlong="drop")

    old = [[-1.0, -2.0, -3.0], [], [-0.5], [-4.0, -5.0]]
    batches, empty = policy_micro_batches(responses, adv.tolist(), old, build, {stop}, micro_batch_size=2, pad_id=0)
    assert empty == 1 and [b.loss_mask.shape[0] for b in batches] == [2, 1]
    assert batches[0].response_ids.tolist() == [[5, 6, stop], [stop, 0, 0]]
    assert batches[0].advantages[1, 0] == float(adv[2]) and batches[1].old_logprobs.tolist() == [[-4.0, -5.0]]
    assert policy_micro_batches([[]], [0.0], [[]], build, {stop}, micro_batch_size=2, pad_id=0) == ([], 1)


def test_kl_estimator_refusals():
    grpo = ["--loss.mode", "grpo", "--rollout.samples_per_prompt", "2"]
    for estimator in ("forward_kl", "reverse_kl"):
        assert load_config(None, [*grpo, "--loss.kl_coef", "0.1", "--loss.kl_estimator", estimator]).loss.kl_estimator \
            == estimator
        with pytest.raises(ValueError, match="kl_estimator.*kl_coef > 0"):  # no reference pass to compare with
            load_config(None, [*grpo, "--loss.kl_estimator", estimator])
        with pytest.raises(ValueError, match="kl_estimator"):
            load_config(None, ["--loss.kl_estimator", estimator])  # opsd
    with pytest.raises(ValueError, match="kl_estimator"):
        load_config(None, [*grpo, "--loss.kl_coef", "0.1", "--loss.kl_estimator", "k2"])
