"""The data section of a run config: where problems and the tokenizer come from, how prompts read,
and the length budget of a student/teacher pair.

The defaults point at the synthetic arithmetic set shipped in ``megatron_opsd/assets/arith`` so that a
run needs no download; a real run sets ``train_path``, ``eval_path`` and ``tokenizer_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_opsd.config_io import doc
from megatron_opsd.data.templates import (
    NO_SOLUTION_TEACHER_TEMPLATE,
    STUDENT_TEMPLATE,
    TEACHER_TEMPLATE,
    placeholders,
)

ARITH_DIR = Path(__file__).resolve().parents[1] / "assets" / "arith"

TeacherVariant = Literal["solution", "no_solution", "wrong_solution"]


@dataclass
class DataConfig:
    """Problems, tokenizer, prompt templates and the context-length budget."""

    train_path: str = doc(
        "Training problems: a .jsonl, .json (a list of objects) or .parquet file.",
        default=str(ARITH_DIR / "train.jsonl"))
    eval_path: str | None = doc(
        "Held-out problems (same formats); None splits eval_fraction off the training file.",
        default=str(ARITH_DIR / "eval.jsonl"))
    eval_fraction: float = doc(
        "Fraction of the training file held out for evaluation when eval_path is None (0: no eval).",
        default=0.0)
    problem_key: str = doc("Column holding the problem statement.", default="problem")
    solution_key: str = doc("Column holding the reference solution.", default="solution")
    answer_key: str = doc(
        "Column holding the final answer (optional per row; when absent the last \\boxed{} of the "
        "solution is used).", default="answer")
    on_bad_row: Literal["error", "skip"] = doc(
        "A malformed row (bad JSON, missing/empty field, wrong type): 'error' stops with the file, line "
        "and field; 'skip' drops it and reports the count.", default="error")
    seed: int = doc(
        "Seed of the per-epoch shuffle, the held-out split and the wrong_solution pairing.", default=1234)
    tokenizer_path: str = doc(
        "An HF tokenizer directory (tokenizer.json/tokenizer_config.json) or a sentencepiece .model.",
        default=str(ARITH_DIR / "tokenizer.model"))
    max_prompt_len: int = doc(
        "Longest rendered prompt (either side, tokens); problems whose student or teacher prompt is "
        "longer are dropped and counted, never truncated.", default=1024)
    max_seq_len: int = doc(
        "Longest context (prompt + response, either side, tokens); see `overlong`.", default=2048)
    overlong: Literal["drop", "truncate_response"] = doc(
        "A pair over max_seq_len: drop it, or cut the response's tail to fit. Either is counted; the "
        "teacher prompt is never cut.", default="truncate_response")
    student_template: str = doc(
        "Student user turn; {problem} is substituted, other braces are literal.",
        default=STUDENT_TEMPLATE)
    teacher_template: str | None = doc(
        "Teacher user turn with {problem} and {solution}; None: the paper's text (for teacher_variant "
        "no_solution: the student's text, without {solution}).", default=None)
    teacher_variant: TeacherVariant = doc(
        "What the teacher is shown: the problem's own solution (the paper), no solution, or a "
        "wrong_solution (another problem's, chosen deterministically from seed).", default="solution")
    student_thinking: bool = doc(
        "Render the student prompt with thinking mode on (the paper: off).", default=False)
    teacher_thinking: bool = doc(
        "Render the teacher prompt with thinking mode on (the paper: on).", default=True)

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row={self.on_bad_row!r}: use 'error' or 'skip'")
        if self.overlong not in ("drop", "truncate_response"):
            raise ValueError(f"overlong={self.overlong!r}: use 'drop' or 'truncate_response'")
        if self.teacher_variant not in ("solution", "no_solution", "wrong_solution"):
            raise ValueError(f"teacher_variant={self.teacher_variant!r}: use 'solution', "
                             "'no_solution' or 'wrong_solution'")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction}: use a fraction in [0, 1)")
        if self.eval_path is not None and self.eval_fraction > 0:
            raise ValueError(f"eval_fraction={self.eval_fraction} with eval_path={self.eval_path!r}: "
                             "set one of them (eval_path: null to split the training file)")
        keys = {"problem_key": self.problem_key, "solution_key": self.solution_key,
                "answer_key": self.answer_key}
        for name, value in keys.items():
            if not value:
                raise ValueError(f"{name}={value!r}: name the column, e.g. {name.removesuffix('_key')!r}")
        if len(set(keys.values())) != len(keys):
            raise ValueError(f"column names {keys} must differ from each other")
        if self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len={self.max_prompt_len}: must be at least 1")
        if self.max_seq_len <= self.max_prompt_len:
            raise ValueError(f"max_seq_len={self.max_seq_len} <= max_prompt_len={self.max_prompt_len}: "
                             "leave room for the response (e.g. max_prompt_len + max_new_tokens)")
        if placeholders(self.student_template) != {"problem"}:
            raise ValueError(f"student_template={self.student_template!r}: must contain {{problem}} and "
                             "no other placeholder (the student never sees the solution)")
        wanted = {"problem"} if self.teacher_variant == "no_solution" else {"problem", "solution"}
        if placeholders(self.resolved_teacher_template) != wanted:
            raise ValueError(f"teacher_template={self.teacher_template!r}: with teacher_variant="
                             f"{self.teacher_variant!r} it must contain exactly the placeholders "
                             f"{sorted('{' + w + '}' for w in wanted)}")

    @property
    def resolved_teacher_template(self) -> str:
        """The teacher template in effect (``teacher_template`` or the default for the variant)."""
        if self.teacher_template is not None:
            return self.teacher_template
        return NO_SOLUTION_TEACHER_TEMPLATE if self.teacher_variant == "no_solution" else TEACHER_TEMPLATE
