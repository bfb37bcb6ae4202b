"""What every training method provides: the trainer and the step call nothing else of a method.

A step of any method (``train.py``'s ``Trainer.train_one_step``; ``opsd/step.py`` inside the schedule):

    prompts -> rollout(inputs, prompts, keys)             the responses: sampled, or the reference solutions
            -> micro_batches(inputs, prompts, rollout)    contexts (and rewards) -> micro-batches, metrics
            -> schedule: per micro-batch on the last stage
                   token_loss(ctx, ids, student_logits, teacher_logits, policy, stats)
                   normalizer(ctx, batch), detailed_metrics(ctx, mask, ...)
            -> optimizer step

``make_teacher`` says which teacher pass the schedule runs (None: the student's context only).
``token_loss`` is called on materialised logits [B, R, V/TP] or, with ``loss.fused_projection``, on
one projected chunk of response tokens at a time ([C, V/TP]): it must be elementwise over tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from megatron_opsd.data.batch import OPSDMicroBatch, collate_pairs, token_budget_groups
from megatron_opsd.data.contexts import ContextBuilder, OPSDPair, PromptIds, build_pair
from megatron_opsd.losses import vocab_parallel_entropy
from megatron_opsd.rollout.types import Rollout, SampleKey

if TYPE_CHECKING:
    from megatron_opsd.opsd.config import LossConfig
    from megatron_opsd.opsd.step import StepContext
    from megatron_opsd.opsd.teacher import Teacher

Prompts = list[tuple[PromptIds, int]]
"""A step's prompts: (rendered prompt ids, problem index), one per response."""


@dataclass
class StepInputs:
    """What a method reads to build a step (the trainer's, or the SFT warm-up's)."""

    contexts: ContextBuilder
    problems: Sequence
    tokenizer: object
    runtime: object
    micro_batch_size: int
    step: int
    """The step being built (the number messages name)."""
    token_budget: int | None = None
    """train.max_tokens_per_micro_batch: pack pairs into micro-batches of at most this many tokens."""
    generate: Callable[[list[list[int]], list[SampleKey]], Rollout] | None = None
    """The student samples one response per prompt (the rollout engine with the run's sampling)."""
    samples_per_prompt: int = 1
    """Responses per problem (a GRPO group; consecutive in ``prompts``)."""
    reward_fn: Callable | None = None
    """GRPO modes: ``loss.reward`` resolved, ``f(problem, response_text) -> float``."""


class PolicyInputs(NamedTuple):
    """Per-token inputs of a policy-gradient loss, each shaped like the response ids."""

    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    weights: torch.Tensor
    """The loss mask (weights of the token statistics)."""


class Method:
    """A training method (``loss.mode``); ``loss`` is the run's ``LossConfig``."""

    name = ""
    generates = True
    """False: the step's responses are not sampled (``generated_tokens`` is 0, no leakage rate)."""
    teacher_sees_solution = False
    """Whether the teacher pass is conditioned on the reference solution (the teacher-advantage
    diagnostic measures what it gains from it)."""

    def __init__(self, loss: LossConfig):
        self.loss = loss

    # ---- before the schedule, on every rank ---------------------------------------------------------
    def make_teacher(self, cfg, runtime, student_chunks, teacher_weights) -> Teacher | None:
        """The teacher pass's weights (``cfg``: the JobConfig; ``teacher_weights``: the resolved
        ``loss.opd_teacher_load``); None: no teacher pass."""
        return None

    def rollout(self, inputs: StepInputs, prompts: Prompts, keys: list[SampleKey]) -> Rollout:
        """The step's responses: by default the student samples one per prompt."""
        return inputs.generate([p.student for p, _ in prompts], keys)

    def micro_batches(self, inputs: StepInputs, prompts: Prompts, rollout: Rollout,
                      ) -> tuple[list[OPSDMicroBatch], dict]:
        """This rank's micro-batches and the method's metrics of the step (the same on every rank)."""
        raise NotImplementedError

    # ---- on the last pipeline stage, per micro-batch or projected chunk ------------------------------
    def token_loss(self, ctx: StepContext, response_ids: torch.Tensor, student_logits: torch.Tensor,
                   teacher_logits: torch.Tensor | None, policy: PolicyInputs | None = None,
                   stats: dict | None = None) -> torch.Tensor:
        """fp32 loss per response token (shape of ``response_ids``), differentiable in the student;
        weighted sums of extra token statistics may be added to ``stats`` (keys ``*_sum``)."""
        raise NotImplementedError

    def normalizer(self, ctx: StepContext, batch: OPSDMicroBatch) -> torch.Tensor:
        """What the micro-batch adds to the step's loss denominator: its response tokens."""
        return batch.loss_mask.sum()

    @torch.no_grad()
    def detailed_metrics(self, ctx: StepContext, mask: torch.Tensor, student_logits: torch.Tensor,
                         teacher_logits: torch.Tensor | None, per_token: torch.Tensor) -> dict:
        """Masked sums of per-token diagnostics (``logging.detailed_metrics``): the student's entropy."""
        entropy = vocab_parallel_entropy(student_logits, **kernel_args(ctx))
        return {"entropy_student_sum": (entropy * mask).sum()}


def kernel_args(ctx: StepContext) -> dict:
    """The divergence kernels' common arguments."""
    return dict(temperature=ctx.temperature, vocab_size=ctx.vocab_size, tp_group=ctx.runtime.tp_group,
                chunk_size=ctx.loss.chunk_size)


def sample_prompts(sampler, contexts: ContextBuilder, step: int, samples_per_prompt: int,
                   ) -> tuple[Prompts, list[SampleKey]]:
    """The step's prompts from the sampler's next problems, each repeated ``samples_per_prompt`` times
    (a group), with their sampling keys; problems whose prompt is too long are left out (counted)."""
    prompts, keys = [], []
    for index in sampler.next_batch():
        ids = contexts.prompt_ids(index)
        if ids is None:
            continue
        for s in range(samples_per_prompt):
            prompts.append((ids, index))
            keys.append(SampleKey(step=step, prompt_id=index, sample_idx=s))
    return prompts, keys


def pair_micro_batches(inputs: StepInputs, pairs: list[OPSDPair], prompts: Prompts, *,
                       with_teacher: bool) -> list[OPSDMicroBatch]:
    """``micro_batch_size`` pairs per micro-batch, or packed by ``token_budget`` (costs count the
    teacher context when there is a teacher pass). No pair left: one fully masked micro-batch keeps
    the schedule in step with the other ranks."""
    pad = inputs.tokenizer.pad_id
    if not pairs:
        ids = prompts[0][0] if prompts else None
        stub = build_pair(ids.student, ids.teacher, [pad], stop_ids=set(), max_seq_len=10**9, overlong="drop")
        batch = collate_pairs([stub], pad)
        batch.loss_mask.zero_()
        return [batch]
    if inputs.token_budget is not None:  # packed (loss and grads are normalised by global tokens)
        costs = [len(p.student_ids) + (len(p.teacher_ids) if with_teacher else 0) for p in pairs]
        return [collate_pairs([pairs[i] for i in group], pad, pack=True)
                for group in token_budget_groups(costs, inputs.token_budget)]
    size = inputs.micro_batch_size
    return [collate_pairs(pairs[i:i + size], pad) for i in range(0, len(pairs), size)]
