"""The user-turn texts of the two roles, and the teacher ablations.

The defaults are the paper's v3 code (``data_collator.py`` of github.com/siyan-zhao/OPSD, the math
branch), character for character. A template is plain text in which ``{problem}`` and ``{solution}``
are substituted in one pass; every other brace is literal, so ``\\boxed{}`` is written as is and a
problem that itself contains ``{solution}`` is left alone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Protocol

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

STUDENT_TEMPLATE = "Problem: {problem}\n\n" + BOXED_INSTRUCTION

# The paper's code joins "...End ===\n", a transition that starts and ends with newlines, and "\n":
# hence two blank lines before the instruction and one after it.
TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning "
    "behind each step \u2014 do not copy or paraphrase it. Now, using your own words and independent "
    "reasoning, derive the same final answer to the problem above. Think step by step, explore "
    "different approaches, and don't be afraid to backtrack or reconsider if something doesn't work "
    "out:\n"
)
TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
    + TRANSITION + "\n" + BOXED_INSTRUCTION
)

# The no-solution ablation: the teacher sees what the student sees (it differs only in thinking mode).
NO_SOLUTION_TEACHER_TEMPLATE = STUDENT_TEMPLATE

_PLACEHOLDER = re.compile(r"\{(problem|solution)\}")


class HasSolution(Protocol):
    solution: str


def placeholders(template: str) -> set[str]:
    """The placeholder names (``problem``, ``solution``) that ``template`` uses."""
    return set(_PLACEHOLDER.findall(template))


def fill(template: str, *, problem: str, solution: str | None = None) -> str:
    """Substitute ``{problem}`` / ``{solution}`` in one pass (values are never re-scanned)."""
    values = {"problem": problem, "solution": solution}

    def substitute(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        if value is None:
            raise ValueError(f"template {template!r} uses {{solution}} but no solution was given")
        return value

    return _PLACEHOLDER.sub(substitute, template)


def wrong_solution_index(index: int, problems: Sequence[HasSolution], seed: int) -> int:
    """Index of the problem whose solution serves as problem ``index``'s wrong reference.

    A seeded hash picks a start among the other problems; candidates whose solution text equals this
    problem's own are skipped, so the wrong reference is never the problem's own solution.
    """
    num_problems = len(problems)
    own = problems[index].solution
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    offset = 1 + int.from_bytes(digest[:8], "little") % max(num_problems - 1, 1)
    for step in range(num_problems):
        candidate = (index + offset + step) % num_problems
        if candidate != index and problems[candidate].solution != own:
            return candidate
    raise ValueError(f"teacher_variant='wrong_solution' needs at least two problems with different "
                     f"solutions; the dataset has {num_problems} and none differs from problem {index}'s")
