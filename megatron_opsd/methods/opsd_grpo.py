"""OPSD+GRPO: OPSD's divergence plus lambda times the GRPO loss, on the same student rollouts."""

from __future__ import annotations

import torch

from megatron_opsd.data.contexts import PromptIds
from megatron_opsd.methods.grpo import GRPO
from megatron_opsd.methods.opsd import divergence_losses, divergence_metrics, self_teacher


class OPSDGRPO(GRPO):
    """divergence_weight * the OPSD divergence + grpo_weight * the GRPO loss; the OPSD teacher and
    contexts, unchanged (no KL to theta_0: config refuses loss.kl_coef here)."""

    name = "opsd+grpo"
    teacher_sees_solution = True

    def make_teacher(self, cfg, runtime, student_chunks, teacher_weights):
        return self_teacher(cfg, runtime, student_chunks)

    def contexts_of(self, ids: PromptIds) -> PromptIds:
        return ids

    def token_loss(self, ctx, response_ids, student_logits, teacher_logits, policy=None, stats=None):
        loss = self.policy_loss(ctx, response_ids, student_logits, None, policy, stats)
        divergence = divergence_losses(ctx, response_ids, student_logits, teacher_logits)
        return ctx.loss.divergence_weight * divergence + ctx.loss.grpo_weight * loss

    @torch.no_grad()
    def detailed_metrics(self, ctx, mask, student_logits, teacher_logits, per_token):
        return {**super().detailed_metrics(ctx, mask, student_logits, teacher_logits, per_token),
                **divergence_metrics(ctx, mask, student_logits, teacher_logits, per_token, count_clipped=False)}
