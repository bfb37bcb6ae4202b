"""GRPO on the OPSD step's machinery: rewards, group-normalised advantages, the clipped token loss.

For each problem, ``n = rollout.samples_per_prompt`` responses are sampled and scored by a reward
function ``r(problem, response_text) -> float``. Within a group (the n responses of one problem)

    A_i = (r_i - mean(r)) / (std(r) + eps)        GRPO (std: the population std of the group)
    A_i =  r_i - mean(r)                          Dr.GRPO (no std division)

and every token of response i carries A_i. With ``pi`` the policy's log-probability of the sampled
token (temperature 1, full vocabulary: what ``Rollout.model_logprobs`` holds), ``old`` the rollout's
own value of it, ``ratio = exp(pi - old)``:

    loss_t = -min(ratio * A, clip(ratio, 1 - eps_clip, 1 + eps_clip) * A) + kl_coef * KL_t
    KL_t   = exp(ref_t - pi_t) - (ref_t - pi_t) - 1        k3 (ref: log-probability under theta_0)
           = sum_v p0_v (log p0_v - log pi_v)              forward_kl (exact, over the vocabulary)
           = sum_v pi_v (log pi_v - log p0_v)              reverse_kl

On the single update of an on-policy step ``ratio`` is 1 up to the rollout engine's rounding; with
``train.updates_per_rollout > 1`` the later updates reuse the same ``old`` and the clip acts.
Normalisation (``GRPO.normalizer``): GRPO takes the mean over every response token of the step (token-level,
as DAPO); Dr.GRPO divides the token sum by ``responses * rollout.max_new_tokens``, a constant, so
that long responses are not down-weighted. A group whose rewards are all equal has A = 0 for every
response: it is counted (``zero_advantage_groups``) and contributes nothing (no NaN: the eps).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_opsd.data.answers import answers_match, extract_answer
from megatron_opsd.data.batch import OPSDMicroBatch, collate_pairs
from megatron_opsd.data.contexts import OPSDPair, PromptIds, trim_at_stop
from megatron_opsd.data.dataset import Problem
from megatron_opsd.losses import vocab_parallel_divergence, vocab_parallel_token_logprobs
from megatron_opsd.methods.base import Method, StepInputs, pair_micro_batches
from megatron_opsd.methods.opsd import self_teacher

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


class GRPO(Method):
    """The teacher pass, when ``loss.kl_coef`` > 0, is theta_0 on the student's context."""

    name = "grpo"

    def make_teacher(self, cfg, runtime, student_chunks, teacher_weights):
        return self_teacher(cfg, runtime, student_chunks) if self.loss.kl_coef else None

    def contexts_of(self, ids: PromptIds) -> PromptIds:
        """The prompts of a response's pair: the student's on both sides."""
        return PromptIds(ids.student, ids.student)

    def micro_batches(self, inputs, prompts, rollout):
        """Rewards, group advantages, and micro-batches carrying them with the rollout's own
        log-probabilities. Empty responses get their reward (for the group) but no pair."""
        problems = [inputs.problems[index] for _, index in prompts]
        texts = [inputs.tokenizer.decode(ids) for ids in rollout.response_ids]
        rewards = rewards_on_every_rank(inputs, problems, texts)
        advantages, flat_groups = group_advantages(rewards, inputs.samples_per_prompt,
                                                   scale_by_std=self.loss.advantage == "grpo")

        def build(row: int, response: list[int]):
            return inputs.contexts.build(self.contexts_of(prompts[row][0]), response)

        batches, empty = policy_micro_batches(rollout.response_ids, advantages.tolist(), rollout.model_logprobs,
                                              build, inputs.tokenizer.stop_ids,
                                              micro_batch_size=inputs.micro_batch_size, pad_id=inputs.tokenizer.pad_id)
        if not batches:
            batches = [dataclasses.replace(b, advantages=torch.zeros_like(b.loss_mask),
                                           old_logprobs=torch.zeros_like(b.loss_mask))
                       for b in pair_micro_batches(inputs, [], prompts, with_teacher=False)]
        correct = [answer_reward(p, t) for p, t in zip(problems, texts)]
        adv = advantages.tolist()
        sums = torch.tensor([len(rewards), sum(rewards), sum(r * r for r in rewards), sum(correct),
                             sum(adv), sum(a * a for a in adv), flat_groups,
                             len(rewards) // inputs.samples_per_prompt, empty],
                            dtype=torch.float64, device=inputs.runtime.device)
        dist.all_reduce(sums, group=inputs.runtime.dp_group)
        n, r_sum, r_sq, hits, a_sum, a_sq, flat, groups, empty = sums.tolist()
        n = max(n, 1.0)
        return batches, {"reward_mean": r_sum / n, "reward_std": max(r_sq / n - (r_sum / n) ** 2, 0.0) ** 0.5,
                         "accuracy": hits / n, "advantage_mean": a_sum / n,
                         "advantage_std": max(a_sq / n - (a_sum / n) ** 2, 0.0) ** 0.5,
                         "zero_advantage_groups": int(flat), "groups": int(groups), "empty_responses": int(empty)}

    def token_loss(self, ctx, response_ids, student_logits, teacher_logits, policy=None, stats=None):
        return self.policy_loss(ctx, response_ids, student_logits, teacher_logits, policy, stats)

    def policy_loss(self, ctx, response_ids, student_logits, ref_logits, policy, stats) -> torch.Tensor:
        """The clipped token loss at temperature 1 (the rollout's ``model_logprobs`` are the old
        log-probs), + kl_coef * the KL to ``ref_logits`` (theta_0) when given (``loss.kl_estimator``);
        the weighted sums of the ratio-clip indicator and the KL go to ``stats``."""
        cfg = ctx.loss
        common = dict(vocab_size=ctx.vocab_size, tp_group=ctx.runtime.tp_group, chunk_size=cfg.chunk_size)
        logp = vocab_parallel_token_logprobs(student_logits, response_ids, **common)
        ref = None
        if ref_logits is not None and cfg.kl_estimator == "k3":
            with torch.no_grad():
                ref = vocab_parallel_token_logprobs(ref_logits, response_ids, **common)
        loss, parts = grpo_token_loss(logp, policy.old_logprobs, policy.advantages, ref, clip_eps=cfg.ppo_clip,
                                      kl_coef=cfg.kl_coef)
        if ref_logits is not None and cfg.kl_estimator != "k3":  # exact, over the vocabulary (theta_0 = "teacher")
            kl = vocab_parallel_divergence(student_logits, ref_logits, divergence=cfg.kl_estimator, clip=None,
                                           temperature=1.0, **common)
            parts["kl"] = kl.detach()
            loss = loss + cfg.kl_coef * kl
        if stats is not None:
            for key, value in parts.items():
                stats[f"{key}_sum"] = stats.get(f"{key}_sum", 0.0) + (value * policy.weights).sum()
        return loss

    def normalizer(self, ctx, batch):
        """Dr.GRPO: the responses times the token budget (a constant per response); else its tokens."""
        if self.loss.advantage == "dr_grpo":
            return (batch.loss_mask.sum(dim=1) > 0).sum() * ctx.token_budget
        return super().normalizer(ctx, batch)


def rewards_on_every_rank(inputs: StepInputs, problems, texts) -> list[float]:
    """The reward function on this rank's responses; if it fails on any rank, every rank stops
    (RewardError: the failing rank's message names the problem)."""
    error, rewards = None, []
    try:
        rewards = score(inputs.reward_fn, problems, texts)
    except RewardError as exc:
        error = exc
    flag = torch.tensor([float(error is not None)], device=inputs.runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise RewardError(f"step {inputs.step}: {error}")
    if flag.item():
        raise RewardError(f"step {inputs.step}: the reward function failed on another rank (its message names "
                          "the problem)")
    return rewards
