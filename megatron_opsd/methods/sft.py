"""SFT: cross-entropy on the reference solutions. Nothing is sampled and there is no teacher pass: the
solutions take the rollout's place, on the student's prompt. ``warm_up`` makes the embedded default's
base model with this method."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from megatron_opsd import checkpoint as ckpt
from megatron_opsd.data import ContextBuilder, ProblemSampler
from megatron_opsd.data.contexts import PromptIds
from megatron_opsd.engine import OptimConfig, build_optimizer, build_scheduler, wrap_ddp
from megatron_opsd.losses import vocab_parallel_token_logprobs
from megatron_opsd.methods.base import Method, StepInputs, pair_micro_batches, sample_prompts
from megatron_opsd.opsd.config import LossConfig
from megatron_opsd.rollout.types import Rollout


class SFT(Method):
    """``teacher_fraction``: that fraction of the examples, evenly spread (0.5: every other one), uses the
    teacher's prompt (problem + reference solution) instead of the student's (the warm-up: a tiny model
    must first learn to read a reference solution in its context, the capability OPSD's teacher relies
    on)."""

    name = "sft"
    generates = False

    def __init__(self, loss: LossConfig, *, teacher_fraction: float = 0.0):
        super().__init__(loss)
        self.teacher_fraction = teacher_fraction

    def rollout(self, inputs, prompts, keys):
        return Rollout(response_ids=[solution_ids(inputs.tokenizer, inputs.problems[i]) for _, i in prompts])

    def micro_batches(self, inputs, prompts, rollout):
        prompts = [(self._prompt(ids, inputs.step + n), i) for n, (ids, i) in enumerate(prompts)]
        pairs = [inputs.contexts.build(p, ids) for (p, _), ids in zip(prompts, rollout.response_ids)]
        return pair_micro_batches(inputs, [p for p in pairs if p is not None], prompts, with_teacher=False), {}

    def _prompt(self, ids: PromptIds, parity: int) -> PromptIds:
        """The prompt on both sides (only the student's side is run): the student's, or the teacher's."""
        teacher = math.floor(parity * self.teacher_fraction) > math.floor((parity - 1) * self.teacher_fraction)
        prompt = ids.teacher if teacher else ids.student
        return PromptIds(prompt, prompt)

    def token_loss(self, ctx, response_ids, student_logits, teacher_logits, policy=None, stats=None):
        return -vocab_parallel_token_logprobs(student_logits, response_ids, vocab_size=ctx.vocab_size,
                                              tp_group=ctx.runtime.tp_group)


def solution_ids(tokenizer, problem) -> list[int]:
    """The reference solution as a response: its tokens and the end-of-turn id (SFT's target)."""
    return tokenizer.encode(problem.solution) + [min(tokenizer.stop_ids - {tokenizer.eos_id}, default=tokenizer.eos_id)]


def warm_up(cfg, runtime, chunks, tokenizer, problems, out: Path) -> None:
    """The embedded default's base model: the sft method for ``train.warmup_sft_steps`` steps with its
    own optimizer (``train.warmup_lr``, gradient clip 1) and prompt order, over-long solutions cut
    (``truncate_response``), a fraction of the examples on the teacher's prompt
    (``train.warmup_teacher_fraction``); saves the weights to ``out``."""
    from megatron_opsd.opsd.step import StepContext, train_step

    steps = cfg.train.warmup_sft_steps
    ddp = wrap_ddp(chunks, runtime)
    optim = OptimConfig(lr=cfg.train.warmup_lr, min_lr=cfg.train.warmup_lr / 10, clip_grad=1.0,
                        warmup_steps=max(steps // 10, 1))
    optimizer = build_optimizer(ddp, runtime, optim)
    scheduler = build_scheduler(optimizer, optim, steps)
    sampler = ProblemSampler(len(problems), cfg.train.prompts_per_step, cfg.seed + 1,
                             rank=runtime.dp_rank, world_size=runtime.dp)
    contexts = ContextBuilder(dataclasses.replace(cfg.data, overlong="truncate_response"), tokenizer, problems)
    method = SFT(LossConfig(mode="sft"), teacher_fraction=cfg.train.warmup_teacher_fraction)
    ctx = StepContext(runtime=runtime, loss=method.loss, temperature=1.0, vocab_size=cfg.model.vocab_size,
                      teacher=None, detailed_metrics=False, method=method)
    start = time.perf_counter()
    for step in range(steps):
        inputs = StepInputs(contexts, problems, tokenizer, runtime, cfg.train.micro_batch_size, step=step + 1)
        prompts, keys = sample_prompts(sampler, contexts, step, 1)
        batches, _ = method.micro_batches(inputs, prompts, method.rollout(inputs, prompts, keys))
        ctx.step = step + 1
        metrics = train_step(ctx, ddp, optimizer, batches, pad_id=tokenizer.pad_id, clip_grad=1.0, scheduler=scheduler)
        if runtime.rank == 0 and (step % 20 == 0 or step == steps - 1):
            print(f"[sft warm-up {step + 1}/{steps}] loss={metrics['loss']:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    ckpt.save_model(ddp, cfg.model, out)
    if runtime.rank == 0:
        print(f"[sft warm-up] base model cached at {out}", flush=True)
