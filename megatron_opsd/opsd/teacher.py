"""Teacher weights: the live student, a frozen initial copy, an EMA copy, or a separate checkpoint.

A teacher is a list of model chunks with exactly the student's sharding, run under ``no_grad``.
Copies are never wrapped in DDP, never handed to the optimizer and never require grad.
"""

from __future__ import annotations

import contextlib
import dataclasses

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

    def after_load(self) -> None:
        """Called after a checkpoint restored ``state_dict_to_save()``'s chunks."""

    def context(self):
        """Entered around every teacher forward (the adapter teachers switch the adapters there)."""
        return contextlib.nullcontext()


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
    """theta_T <- decay * theta_T + (1 - decay) * theta_S after each optimizer step.

    The average is kept in fp32 (``shadow``): in bf16, a step of (1 - decay) * (theta_S - theta_T)
    with decay 0.999 is below half an ulp of almost every weight and ``lerp_`` would round it away,
    leaving the teacher at its initial weights forever. The fp32 shadow is what checkpoints store;
    the teacher's own (bf16/fp16) weights are its rounding. In fp32 the teacher is its own shadow.
    """

    name = "ema"

    def __init__(self, chunks: list[torch.nn.Module], decay: float,
                 shadow: list[torch.nn.Module] | None = None):
        super().__init__(chunks)
        self.decay = decay
        self.shadow = [unwrap(c) for c in shadow] if shadow is not None else self.chunks
        for chunk in self.shadow:
            for param in chunk.parameters():
                param.requires_grad_(False)

    @classmethod
    def copy_of(cls, student_chunks: list[torch.nn.Module], model: ModelConfig, runtime: ParallelRuntime,
                build: ModelBuildConfig, decay: float = 0.999) -> "EMATeacher":
        teacher = FrozenTeacher.copy_of(student_chunks, model, runtime, build).chunks
        shadow = None
        if build.dtype != "fp32":
            shadow = build_model(model, runtime, dataclasses.replace(build, dtype="fp32", init_weights=False))
            for copy, student in zip(shadow, student_chunks):
                copy.load_state_dict(unwrap(student).state_dict(), strict=True)  # cast to fp32
        return cls(teacher, decay, shadow)

    @torch.no_grad()
    def after_optimizer_step(self, student_chunks: list[torch.nn.Module]) -> None:
        for teacher, shadow, student in zip(self.chunks, self.shadow, student_chunks):
            for t, m, s in zip(teacher.parameters(), shadow.parameters(), unwrap(student).parameters()):
                m.lerp_(s.detach().to(m.dtype), 1.0 - self.decay)
                if t is not m:
                    t.copy_(m)

    def state_dict_to_save(self) -> list[torch.nn.Module] | None:
        return self.shadow

    @torch.no_grad()
    def after_load(self) -> None:
        for teacher, shadow in zip(self.chunks, self.shadow):
            if teacher is not shadow:
                for t, m in zip(teacher.parameters(), shadow.parameters()):
                    t.copy_(m)


class AdapterTeacher(Teacher):
    """LoRA: the student's own chunks with their adapters switched for the teacher forward.

    ``initial``: adapters off, i.e. the frozen base weights theta_0 (the paper's teacher at zero extra
    weight memory); ``live``: adapters on (under no_grad); ``ema``: an exponential moving average of the
    adapters only (fp32, stored in checkpoints as part of the adapters' state).
    """

    MODES = {"initial": "off", "live": "on", "ema": "ema"}

    def __init__(self, chunks: list[torch.nn.Module], teacher: str, decay: float = 0.999):
        from megatron_opsd.models.lora import adapters

        super().__init__(chunks)
        self.name, self.mode, self.decay = teacher, self.MODES[teacher], decay
        self._adapters = [lora for _, _, lora in adapters(self.chunks)]
        if not self._adapters:
            raise ValueError("an adapter teacher needs LoRA adapters on the model (lora.rank > 0)")
        if self.mode == "ema":
            for lora in self._adapters:
                for p in lora.projections:
                    for side in ("A", "B"):
                        # fp32 (bf16 could not take 1e-3 steps); persistent: part of the adapters'
                        # checkpoint state, sharded like the adapter itself
                        lora.register_buffer(f"ema_{p}_{side}", getattr(lora, f"{p}_{side}").detach().float().clone())
                        lora.ema[f"{p}_{side}"] = getattr(lora, f"ema_{p}_{side}")

    def context(self):
        from megatron_opsd.models.lora import adapters_set

        return adapters_set(self.chunks, self.mode)

    @torch.no_grad()
    def after_optimizer_step(self, student_chunks: list[torch.nn.Module]) -> None:
        if self.mode != "ema":
            return
        for lora in self._adapters:
            for key, average in lora.ema.items():
                average.lerp_(getattr(lora, key).detach().float(), 1.0 - self.decay)


def check_teacher_isolated(teacher: Teacher | None, student_chunks: list[torch.nn.Module]) -> None:
    """Start-up assertion: teacher copies have no grad, and are not among the parameters the
    optimizer sees (those of the DDP-wrapped student; megatron's optimizers are built from them)."""
    if teacher is None:  # sft, grpo without KL: no teacher pass
        return
    if isinstance(teacher, AdapterTeacher):
        from megatron_opsd.models.lora import adapters

        adapter_params = {id(p) for _, _, lora in adapters(teacher.chunks) for p in lora.parameters()}
        for chunk in teacher.chunks:
            for name, param in chunk.named_parameters():
                assert not param.requires_grad or id(param) in adapter_params, \
                    f"base parameter {name} would train under LoRA"
        return
    if type(teacher) is Teacher:
        return
    student_params = {id(p) for c in student_chunks for p in c.parameters()}
    for chunk in teacher.chunks + getattr(teacher, "shadow", []):
        for name, param in chunk.named_parameters():
            assert not param.requires_grad and param.grad is None, f"teacher parameter {name} has a grad"
            assert getattr(param, "main_grad", None) is None, f"teacher parameter {name} has a main_grad"
            assert id(param) not in student_params, f"teacher parameter {name} is a student parameter"
