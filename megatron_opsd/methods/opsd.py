"""OPSD: the student samples; the teacher (the same model, conditioned on the problem and the reference
solution) scores the same tokens; the loss is the per-token divergence over the full vocabulary."""

from __future__ import annotations

import torch

from megatron_opsd.losses import (sampled_token_advantage_loss, vocab_parallel_divergence, vocab_parallel_entropy,
                                  vocab_parallel_token_logprobs, vocab_parallel_topk_divergence)
from megatron_opsd.methods.base import Method, kernel_args, pair_micro_batches
from megatron_opsd.opsd.teacher import AdapterTeacher, EMATeacher, FrozenTeacher, Teacher


class OPSD(Method):
    name = "opsd"
    teacher_sees_solution = True

    def make_teacher(self, cfg, runtime, student_chunks, teacher_weights):
        return self_teacher(cfg, runtime, student_chunks)

    def micro_batches(self, inputs, prompts, rollout):
        pairs = [inputs.contexts.build(p, ids) for (p, _), ids in zip(prompts, rollout.response_ids)]
        return pair_micro_batches(inputs, [p for p in pairs if p is not None], prompts, with_teacher=True), {}

    def token_loss(self, ctx, response_ids, student_logits, teacher_logits, policy=None, stats=None):
        return divergence_losses(ctx, response_ids, student_logits, teacher_logits)

    @torch.no_grad()
    def detailed_metrics(self, ctx, mask, student_logits, teacher_logits, per_token):
        return {**super().detailed_metrics(ctx, mask, student_logits, teacher_logits, per_token),
                **divergence_metrics(ctx, mask, student_logits, teacher_logits, per_token, count_clipped=True)}


def self_teacher(cfg, runtime, student_chunks):
    """``loss.teacher`` of the student's own weights: with LoRA the same chunks with their adapters
    switched (no copy of the base); else the live student, an EMA copy or a frozen initial copy."""
    loss = cfg.loss
    if cfg.lora.enabled:
        return AdapterTeacher(student_chunks, loss.teacher, loss.ema_decay)
    if loss.teacher == "live":
        return Teacher(student_chunks)
    if loss.teacher == "ema":
        return EMATeacher.copy_of(student_chunks, cfg.model, runtime, cfg.model_build, loss.ema_decay)
    return FrozenTeacher.copy_of(student_chunks, cfg.model, runtime, cfg.model_build)


def divergence_losses(ctx, response_ids, student_logits, teacher_logits) -> torch.Tensor:
    """The configured per-token divergence D(teacher || student) (``loss.divergence``, ``top_k``)."""
    cfg = ctx.loss
    common = dict(temperature=ctx.temperature, vocab_size=ctx.vocab_size, tp_group=ctx.runtime.tp_group)
    if cfg.divergence == "sampled_token":
        logp_s = vocab_parallel_token_logprobs(student_logits, response_ids, **common)
        logp_t = vocab_parallel_token_logprobs(teacher_logits, response_ids, **common)
        return sampled_token_advantage_loss(logp_s, logp_t)
    if cfg.top_k is not None:
        return vocab_parallel_topk_divergence(
            student_logits, teacher_logits, k=cfg.top_k, tail=cfg.top_k_tail, divergence=cfg.divergence,
            beta=cfg.beta, clip=cfg.clip, chunk_size=cfg.chunk_size, **common)
    return vocab_parallel_divergence(student_logits, teacher_logits, divergence=cfg.divergence, beta=cfg.beta,
                                     clip=cfg.clip, chunk_size=cfg.chunk_size, **common)


@torch.no_grad()
def divergence_metrics(ctx, mask, student_logits, teacher_logits, per_token, *, count_clipped: bool) -> dict:
    """Masked sums of the teacher's entropy, the unclipped divergence and (``count_clipped``) the tokens
    whose divergence the per-entry cap changed."""
    cfg, common = ctx.loss, kernel_args(ctx)
    if teacher_logits is None:
        return {}
    out = {"entropy_teacher_sum": (vocab_parallel_entropy(teacher_logits, **common) * mask).sum()}
    divergence = cfg.divergence if cfg.divergence != "sampled_token" else "forward_kl"
    raw = vocab_parallel_divergence(student_logits.detach(), teacher_logits, divergence=divergence,
                                    beta=cfg.beta, clip=None, **common)
    out["divergence_sum"] = (raw * mask).sum()
    if count_clipped and cfg.clip is not None and cfg.divergence != "sampled_token" and cfg.top_k is None:
        clipped = (raw - per_token.detach()).abs() > 1e-6 * (1 + raw.abs())
        out["clipped_tokens"] = (clipped.float() * mask).sum()
    return out
