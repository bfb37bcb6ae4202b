"""GRPO on the OPSD step's machinery: rewards, group-normalised advantages, the clipped token loss.

For each problem, ``n = rollout.samples_per_prompt`` responses are sampled and scored by a reward
function ``r(problem, response_text) -> float``. Within a group (the n responses of one problem)

    A_i = (r_i - mean(r)) / (std(r) + eps)        GRPO (std: the population std of the group)
    A_i =  r_i - mean(r)                          Dr.GRPO (no std division)

and every token of response i carries A_i. With ``pi`` the policy's log-probability of the sampled
token (temperature 1, full vocabulary: what ``Rollout.model_logprobs`` holds), ``old`` the rollout's
own value of it, ``ratio = exp(pi - old)``:

    loss_t = -min(ratio * A, clip(ratio, 1 - eps_clip, 1 + eps_clip) * A) + kl_coef * k3_t
    k3_t   = exp(ref_t - pi_t) - (ref_t - pi_t) - 1        (ref: log-probability under theta_0)

On the single update of an on-policy step ``ratio`` is 1 up to the rollout engine's rounding; with
``train.updates_per_rollout > 1`` the later updates reuse the same ``old`` and the clip acts.
Normalisation (``step.py``): GRPO takes the mean over every response token of the step (token-level,
as DAPO); Dr.GRPO divides the token sum by ``responses * rollout.max_new_tokens``, a constant, so
that long responses are not down-weighted. A group whose rewards are all equal has A = 0 for every
response: it is counted (``zero_advantage_groups``) and contributes nothing (no NaN: the eps).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch

from megatron_opsd.data.answers import answers_match, extract_answer
from megatron_opsd.data.batch import OPSDMicroBatch, collate_pairs
from megatron_opsd.data.contexts import OPSDPair, trim_at_stop
from megatron_opsd.data.dataset import Problem

RewardFn = Callable[[Problem, str], float]
STD_EPS = 1e-6


class RewardError(RuntimeError):
    """The reward function raised or returned a non-finite value; the problem is named."""


def answer_reward(problem: Problem, response: str) -> float:
    """1.0 when the response's last ``\\boxed{}`` matches the problem's answer, else 0.0 (math-verify
    is consulted when installed, see ``data.answers``)."""
    return float(answers_match(extract_answer(response), problem.answer))


def load_reward_function(spec: str) -> RewardFn:
    """``answer`` (the built-in checker) or ``package.module:function``; ValueError (one line) otherwise."""
    if spec == "answer":
        return answer_reward
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"loss.reward={spec!r}: use 'answer' or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"loss.reward={spec!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"loss.reward={spec!r}: {module_name} has no function {name!r}")
    return fn


def score(reward_fn: RewardFn, problems: Sequence[Problem], texts: Sequence[str]) -> list[float]:
    """``reward_fn(problem, text)`` per response; RewardError naming the problem when one fails."""
    rewards = []
    for problem, text in zip(problems, texts):
        try:
            value = float(reward_fn(problem, text))
        except Exception as exc:  # the user's function: any failure stops the run, named
            raise RewardError(f"the reward function raised on problem {problem.source}: "
                              f"{type(exc).__name__}: {exc}") from None
        if not math.isfinite(value):
            raise RewardError(f"the reward function returned {value} on problem {problem.source}")
        rewards.append(value)
    return rewards


def group_advantages(rewards: Sequence[float], group_size: int, *, scale_by_std: bool = True,
                     ) -> tuple[torch.Tensor, int]:
    """Advantages [N] (fp64) of consecutive groups of ``group_size`` rewards, and the number of groups
    whose rewards are all equal (their advantages are exactly 0)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not form groups of {group_size}")
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    flat = (groups == groups[:, :1]).all(dim=1)
    centred[flat] = 0.0  # exactly 0, not a rounding residue of the mean
    if scale_by_std:
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + STD_EPS)
    return centred.view(-1), int(flat.sum())


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    ref_logp: torch.Tensor | None, *, clip_eps: float, kl_coef: float,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped policy-gradient loss (+ kl_coef * k3 to ``ref_logp``), and per-token
    statistics (no grad): ``ratio_clipped`` (1 where the clip bound is the active term), ``kl``.
    All arguments share one shape; ``logp`` carries the gradient."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    stats = {"ratio_clipped": (clipped < unclipped).detach().float()}
    if ref_logp is not None:
        delta = ref_logp - logp
        k3 = torch.exp(delta) - delta - 1.0
        stats["kl"] = k3.detach()
        if kl_coef:
            loss = loss + kl_coef * k3
    return loss, stats


def policy_micro_batches(responses: Sequence[Sequence[int]], advantages: Sequence[float],
                         old_logprobs: Sequence[Sequence[float]], build: Callable[[int, list[int]], OPSDPair | None],
                         stop_ids, *, micro_batch_size: int, pad_id: int) -> tuple[list[OPSDMicroBatch], int]:
    """Micro-batches of the responses' pairs (``build(row, response)``; None = dropped), each carrying
    its advantage and the rollout's log-probs; and the number of empty responses (they keep their
    reward in their group, but have no token to train on, so no pair). An empty list when nothing is
    left (the caller keeps the schedule in step with a masked micro-batch)."""
    pairs, adv, old, empty = [], [], [], 0
    for row, (response, a, lp) in enumerate(zip(responses, advantages, old_logprobs)):
        if not trim_at_stop(response, stop_ids):
            empty += 1
            continue
        pair = build(row, list(response))
        if pair is not None:
            pairs.append(pair)
            adv.append(a)
            old.append(lp)
    size = micro_batch_size
    return [collate_pairs(pairs[i:i + size], pad_id, advantages=adv[i:i + size], old_logprobs=old[i:i + size])
            for i in range(0, len(pairs), size)], empty
