"""Student and teacher contexts around the same sampled response.

For a prompt of ``P`` tokens followed by response tokens ``y_0 .. y_{R-1}``, next-token prediction puts
the logits that score ``y_r`` at position ``P - 1 + r``. A pair records ``start = P - 1`` for each side;
the two prompts differ in length, so the two starts differ. The response ids are appended as ids (the
student's sampled ids, never decoded and re-tokenized), so both sequences end in the same tokens.

Budget: each side's sequence must fit ``max_seq_len``. Prompts are never cut (cutting the teacher's
from the left would remove the problem statement); a pair whose longer prompt leaves no room is
dropped, and a response that does not fit is dropped or has its tail cut, per ``overlong``. Every
drop and cut is counted in ``PairStats``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from megatron_opsd.data.config import DataConfig
from megatron_opsd.data.dataset import Problem
from megatron_opsd.data.templates import fill, wrong_solution_index
from megatron_opsd.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptIds:
    """The rendered, tokenized prompts of one problem."""

    student: list[int]
    teacher: list[int]


@dataclass(frozen=True)
class OPSDPair:
    """One response in its two contexts."""

    student_ids: list[int]
    """Student prompt + response."""
    teacher_ids: list[int]
    """Teacher prompt + the same response ids."""
    response_ids: list[int]
    """The scored response: through the first stop id (included), possibly cut to fit."""
    student_start: int
    """Position in ``student_ids`` whose logits predict ``response_ids[0]`` (student prompt length - 1)."""
    teacher_start: int
    """Position in ``teacher_ids`` whose logits predict ``response_ids[0]``."""
    truncated: bool = False
    """Whether the response's tail was cut to fit ``max_seq_len``."""

    def __post_init__(self) -> None:
        num = len(self.response_ids)
        assert num > 0 and self.student_start >= 0 and self.teacher_start >= 0
        assert self.student_ids[self.student_start + 1:] == self.response_ids
        assert self.teacher_ids[self.teacher_start + 1:] == self.response_ids


@dataclass
class PairStats:
    """Running counts of what happened to prompts and pairs (for the training log)."""

    num_pairs: int = 0
    """Pairs built (truncated ones included)."""
    num_truncated: int = 0
    """Pairs whose response tail was cut (overlong='truncate_response')."""
    num_dropped_overlong: int = 0
    """Pairs dropped because the response did not fit (overlong='drop')."""
    num_dropped_long_prompt: int = 0
    """Problems or pairs dropped because a prompt alone exceeds its budget (never truncated)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def trim_at_stop(response_ids: Sequence[int], stop_ids: Collection[int]) -> list[int]:
    """The response through its first stop id (kept: the end of turn is scored); what follows (padding
    after an early stop) is dropped. A response without a stop id is returned whole."""
    ids = [int(t) for t in response_ids]
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1]
    return ids


def build_pair(student_prompt_ids: Sequence[int], teacher_prompt_ids: Sequence[int],
               response_ids: Sequence[int], *, stop_ids: Collection[int], max_seq_len: int,
               overlong: Literal["drop", "truncate_response"], stats: PairStats | None = None,
               ) -> OPSDPair | None:
    """Student and teacher sequences around the sampled ``response_ids``; None when dropped.

    ``response_ids`` are the student's sampled ids, possibly padded after a stop (see ``trim_at_stop``).
    """
    stats = stats if stats is not None else PairStats()
    if not student_prompt_ids or not teacher_prompt_ids:
        raise ValueError("build_pair: both prompts must have at least one token")
    response = trim_at_stop(response_ids, stop_ids)
    if not response:
        raise ValueError("build_pair: the response is empty (sample at least one token)")
    room = max_seq_len - max(len(student_prompt_ids), len(teacher_prompt_ids))
    if room < 1:
        stats.num_dropped_long_prompt += 1
        return None
    truncated = False
    if len(response) > room:
        if overlong == "drop":
            stats.num_dropped_overlong += 1
            return None
        response, truncated = response[:room], True
        stats.num_truncated += 1
    stats.num_pairs += 1
    return OPSDPair(
        student_ids=[*student_prompt_ids, *response], teacher_ids=[*teacher_prompt_ids, *response],
        response_ids=response, student_start=len(student_prompt_ids) - 1,
        teacher_start=len(teacher_prompt_ids) - 1, truncated=truncated)


class ContextBuilder:
    """Prompts and pairs for the problems of one dataset, as a ``DataConfig`` says."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, problems: Sequence[Problem]) -> None:
        if cfg.teacher_variant == "wrong_solution" and len(problems) < 2:
            raise ValueError("teacher_variant='wrong_solution' needs at least two problems")
        self.cfg, self.tokenizer, self.problems = cfg, tokenizer, problems
        self.stats = PairStats()

    def user_texts(self, index: int) -> tuple[str, str]:
        """The (student, teacher) user-turn texts of problem ``index``."""
        problem = self.problems[index]
        student = fill(self.cfg.student_template, problem=problem.problem)
        solution = problem.solution
        if self.cfg.teacher_variant == "wrong_solution":
            solution = self.problems[wrong_solution_index(index, self.problems, self.cfg.seed)].solution
        teacher = fill(self.cfg.resolved_teacher_template, problem=problem.problem,
                       solution=None if self.cfg.teacher_variant == "no_solution" else solution)
        return student, teacher

    def prompt_ids(self, index: int) -> PromptIds | None:
        """Rendered prompt ids of problem ``index``; None (counted) if one exceeds ``max_prompt_len``."""
        student_text, teacher_text = self.user_texts(index)
        prompts = PromptIds(
            student=self.tokenizer.render_prompt(student_text, enable_thinking=self.cfg.student_thinking),
            teacher=self.tokenizer.render_prompt(teacher_text, enable_thinking=self.cfg.teacher_thinking))
        if max(len(prompts.student), len(prompts.teacher)) > self.cfg.max_prompt_len:
            self.stats.num_dropped_long_prompt += 1
            return None
        return prompts

    def build(self, prompts: PromptIds, response_ids: Sequence[int]) -> OPSDPair | None:
        """The pair for a sampled response; None (counted) when dropped."""
        return build_pair(prompts.student, prompts.teacher, response_ids,
                          stop_ids=self.tokenizer.stop_ids, max_seq_len=self.cfg.max_seq_len,
                          overlong=self.cfg.overlong, stats=self.stats)
