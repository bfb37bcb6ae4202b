"""OPD (on-policy distillation): OPSD's loss with a separate teacher, the checkpoint
``loss.opd_teacher_load`` (same architecture and tokenizer), frozen, scoring the student's response
in the student's own context (no reference solution)."""

from __future__ import annotations

from megatron_opsd import checkpoint as ckpt
from megatron_opsd.data.contexts import PromptIds
from megatron_opsd.methods.opsd import OPSD
from megatron_opsd.models.provider import build_model
from megatron_opsd.opsd.teacher import FrozenTeacher


class OPD(OPSD):
    name = "opd"
    teacher_sees_solution = False

    def micro_batches(self, inputs, prompts, rollout):
        return super().micro_batches(inputs, [(PromptIds(p.student, p.student), i) for p, i in prompts], rollout)

    def make_teacher(self, cfg, runtime, student_chunks, teacher_weights):
        chunks = build_model(ckpt.read_model_json(teacher_weights), runtime, cfg.model_build)
        ckpt.load_weights(chunks, teacher_weights, "loss.opd_teacher_load", runtime=runtime)
        return FrozenTeacher(chunks)
