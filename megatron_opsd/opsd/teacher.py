"""Teacher weights: the live student, a frozen initial copy, an EMA copy, or a separate checkpoint.

A teacher is a list of model chunks with exactly the student's sharding, run under ``no_grad``.
Copies are never wrapped in DDP, never handed to the optimizer and never require grad.
"""

from __future__ import annotations

import torch

from megatron_opsd.models.description import ModelConfig
from megatron_opsd.models.provider import ModelBuildConfig, build_model
from megatron_opsd.parallel import ParallelRuntime


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


class Teacher:
    """The live student: zero extra memory; the teacher moves with every optimizer step."""

    name = "live"

    def __init__(self, chunks: list[torch.nn.Module]):
        self.chunks = [unwrap(c) for c in chunks]

    def after_optimizer_step(self, student_chunks: list[torch.nn.Module]) -> None:
        pass

    def state_dict_to_save(self) -> list[torch.nn.Module] | None:
        """Chunks whose weights a training checkpoint must store (None: derivable from the student)."""
        return None


class FrozenTeacher(Teacher):
    """A frozen copy with the student's sharding (``initial``), or a separate checkpoint (``opd``)."""

    name = "initial"

    def __init__(self, chunks: list[torch.nn.Module]):
        super().__init__(chunks)
        for chunk in self.chunks:
            chunk.eval()
            for param in chunk.parameters():
                param.requires_grad_(False)

    @classmethod
    def copy_of(cls, student_chunks: list[torch.nn.Module], model: ModelConfig, runtime: ParallelRuntime,
                build: ModelBuildConfig) -> "FrozenTeacher":
        copies = build_model(model, runtime, build)
        for copy, student in zip(copies, student_chunks):
            copy.load_state_dict(unwrap(student).state_dict(), strict=True)
        return cls(copies)

    def state_dict_to_save(self) -> list[torch.nn.Module] | None:
        return self.chunks


class EMATeacher(FrozenTeacher):
    """theta_T <- decay * theta_T + (1 - decay) * theta_S after each optimizer step."""

    name = "ema"

    def __init__(self, chunks: list[torch.nn.Module], decay: float):
        super().__init__(chunks)
        self.decay = decay

    @torch.no_grad()
    def after_optimizer_step(self, student_chunks: list[torch.nn.Module]) -> None:
        for teacher, student in zip(self.chunks, student_chunks):
            for t, s in zip(teacher.parameters(), unwrap(student).parameters()):
                t.lerp_(s.detach().to(t.dtype), 1.0 - self.decay)


def check_teacher_isolated(teacher: Teacher, student_chunks: list[torch.nn.Module]) -> None:
    """Start-up assertion: teacher copies have no grad, and are not among the parameters the
    optimizer sees (those of the DDP-wrapped student; megatron's optimizers are built from them)."""
    if type(teacher) is Teacher:
        return
    student_params = {id(p) for c in student_chunks for p in c.parameters()}
    for chunk in teacher.chunks:
        for name, param in chunk.named_parameters():
            assert not param.requires_grad and param.grad is None, f"teacher parameter {name} has a grad"
            assert getattr(param, "main_grad", None) is None, f"teacher parameter {name} has a main_grad"
            assert id(param) not in student_params, f"teacher parameter {name} is a student parameter"
