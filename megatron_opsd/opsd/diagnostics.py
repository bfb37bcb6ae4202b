"""Two per-step diagnostics of privileged-information distillation.

Teacher advantage: the mean log-probability (temperature 1) of the reference solution's tokens under
the teacher in its context (problem + reference solution) minus under the student in its context
(problem only). It says whether the model can exploit the privileged solution at all: near zero, the
teacher knows nothing the student does not and OPSD has nothing to distill (the paper finds this for
small models). Measured on this step's problems with their reference solutions as the responses, in
one extra forward-only pass of the step's schedule (no rollout, no backward).

Leakage rate: the fraction of the student's sampled responses that mention the reference solution
(the word "reference", "the solution says", or the teacher template's markers around the solution),
a known failure of privileged-information distillation: the student learns to talk about a solution
it never sees.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_opsd.data.batch import OPSDMicroBatch
from megatron_opsd.data.contexts import OPSDPair, PromptIds, build_pair
from megatron_opsd.opsd.step import StepContext, run_schedule

LEAK_PHRASES = ("reference", "the solution says")


def leak_markers(teacher_template: str) -> tuple[str, ...]:
    """The phrases whose mention counts as leakage: ``LEAK_PHRASES`` and the teacher template's text on
    the lines just before and after ``{solution}`` (the paper's "=== Reference Solution Begin/End ===")."""
    before, placeholder, after = teacher_template.partition("{solution}")
    lines = [before.rstrip("\n").rsplit("\n", 1)[-1], after.lstrip("\n").split("\n", 1)[0]] if placeholder else []
    found = [re.sub(r"\{(problem|solution)\}", "", line).strip() for line in lines]  # the lines' literal text
    return tuple(dict.fromkeys([*LEAK_PHRASES, *(m for m in found if len(m) >= 3)]))


def leaks(text: str, markers: Sequence[str]) -> bool:
    """Whether ``text`` mentions any marker (case-insensitive)."""
    lowered = text.lower()
    return any(marker.lower() in lowered for marker in markers)


def leakage_rate(texts: Sequence[str], markers: Sequence[str], *, group=None, device=None) -> float:
    """Fraction of ``texts`` (over the data-parallel ``group`` when given) that leak."""
    counts = torch.tensor([sum(leaks(t, markers) for t in texts), len(texts)], dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(counts, group=group)
    return counts[0].item() / max(counts[1].item(), 1.0)


def teacher_advantage(ctx: StepContext, ddp_chunks: list[torch.nn.Module], prompts: Sequence[PromptIds],
                      solutions: Sequence[list[int]], *, stop_ids, max_seq_len: int,
                      micro_batches: Callable[[list[OPSDPair]], list[OPSDMicroBatch]], pad_id: int) -> dict:
    """``teacher_logprob_ref``, ``student_logprob_ref`` (per-token means over every reference token of
    the step, all data-parallel ranks) and ``teacher_advantage`` = their difference.

    ``solutions``: each prompt's reference solution as response ids (through its end-of-turn id);
    ``micro_batches`` collates pairs the way the step does (an empty list must give one masked batch,
    so every rank runs the schedule). Pairs that do not fit ``max_seq_len`` are left out.
    """
    pairs = [build_pair(p.student, p.teacher, ids, stop_ids=stop_ids, max_seq_len=max_seq_len, overlong="drop")
             for p, ids in zip(prompts, solutions)]
    measure = dataclasses.replace(ctx, logprob_metrics=True, detailed_metrics=False)
    metrics = run_schedule(measure, ddp_chunks, micro_batches([p for p in pairs if p is not None]),
                           pad_id=pad_id, forward_only=True)
    if "teacher_logprob" not in metrics:  # no teacher, or no reference token on any rank
        return {}
    return {"teacher_logprob_ref": metrics["teacher_logprob"], "student_logprob_ref": metrics["student_logprob"],
            "teacher_advantage": metrics["teacher_logprob"] - metrics["student_logprob"]}
