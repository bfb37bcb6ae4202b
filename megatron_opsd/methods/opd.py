"""OPD (on-policy distillation): OPSD's loss and contexts with a separate teacher, the checkpoint
``loss.opd_teacher_load`` (same architecture and tokenizer), frozen."""

from __future__ import annotations

from megatron_opsd import checkpoint as ckpt
from megatron_opsd.methods.opsd import OPSD
from megatron_opsd.models.provider import build_model
from megatron_opsd.opsd.teacher import FrozenTeacher


class OPD(OPSD):
    name = "opd"

    def make_teacher(self, cfg, runtime, student_chunks, teacher_weights):
        chunks = build_model(ckpt.read_model_json(teacher_weights), runtime, cfg.model_build)
        ckpt.load_weights(chunks, teacher_weights, "loss.opd_teacher_load", runtime=runtime)
        return FrozenTeacher(chunks)
