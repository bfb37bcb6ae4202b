"""Problems with reference solutions: loading (JSONL, JSON, Parquet), held-out split and a seeded,
resumable, data-parallel-sharded sampler.

Every bad row is reported as ``FILE:LINE`` (JSON/JSONL: the line where the record starts; Parquet: the
1-based row) with the field at fault; ``on_bad_row="skip"`` drops such rows and counts them instead.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_opsd.data.answers import extract_boxed
from megatron_opsd.data.config import DataConfig

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class Problem:
    """One training or evaluation problem."""

    problem: str
    """The problem statement."""
    solution: str
    """The reference (privileged) solution shown to the teacher."""
    answer: str | None
    """The final answer for evaluation; None when neither a column nor a ``\\boxed{}`` gives one."""
    source: str
    """Where the row came from, ``FILE:LINE`` (Parquet: ``FILE:ROW``)."""


@dataclass
class LoadResult:
    """Problems read from one file, and what was skipped."""

    problems: list[Problem]
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    """The first few skip reasons (each naming file, line and field)."""


class BadRowError(ValueError):
    """A row of a problem file is malformed; the message names the file, the line and the field."""


def _json_records(path: Path) -> list[tuple[int, Any]]:
    """``(line, record)`` pairs of a JSON file holding a list of objects."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadRowError(f"{path}:{line}: not UTF-8 text") from None
    decoder = json.JSONDecoder()
    counted = [0, 1]  # [position, line]: newlines are counted incrementally: records come in file order

    def line_at(pos: int) -> int:
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def skip_space(pos: int) -> int:
        return _SPACE.match(text, pos).end()

    def fail(pos: int, what: str) -> BadRowError:
        return BadRowError(f"{path}:{line_at(pos)}: {what} (a .json file must hold a list of objects)")

    pos = skip_space(0)
    if not text.startswith("[", pos):
        raise fail(pos, "expected '['")
    pos = skip_space(pos + 1)
    records: list[tuple[int, Any]] = []
    while not text.startswith("]", pos):
        if records:
            if not text.startswith(",", pos):
                raise fail(pos, "expected ',' or ']' between records")
            pos = skip_space(pos + 1)
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise BadRowError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} "
                              f"(column {exc.colno})") from None
        records.append((line_at(pos), record))
        pos = skip_space(end)
    return records


def _rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs; ``where`` is ``FILE:LINE`` (or ``FILE:ROW``). JSONL lines that fail
    to parse come back as a ``BadRowError`` record, so that ``skip`` can count them."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out: list[tuple[str, Any]] = []
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    out.append((f"{path}:{line_no}", json.loads(raw.decode("utf-8"))))
                except UnicodeDecodeError as exc:
                    out.append((f"{path}:{line_no}", BadRowError(
                        f"{path}:{line_no}: not UTF-8 text (byte {exc.start + 1} of the line)")))
                except json.JSONDecodeError as exc:
                    out.append((f"{path}:{line_no}",
                                BadRowError(f"{path}:{line_no}: malformed JSON line: {exc.msg} "
                                            f"(column {exc.colno})")))
        return out
    if suffix == ".json":
        return [(f"{path}:{line}", record) for line, record in _json_records(path)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow's ArrowInvalid/OSError for a damaged or foreign file
            raise BadRowError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        return [(f"{path}:{row}", record) for row, record in enumerate(rows, start=1)]
    raise ValueError(f"{path}: unknown problem file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _text_field(record: dict, key: str, where: str, *, required: bool) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise BadRowError(f"{where}: field {key!r} is missing (row has {sorted(record)})")
        return None
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not required:
        value = str(value)  # a numeric final answer
    if not isinstance(value, str):
        raise BadRowError(f"{where}: field {key!r} must be a string, "
                          f"got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise BadRowError(f"{where}: field {key!r} is empty")
    return value


def _problem(record: Any, where: str, problem_key: str, solution_key: str, answer_key: str) -> Problem:
    if isinstance(record, BadRowError):
        raise record
    if not isinstance(record, dict):
        raise BadRowError(f"{where}: expected an object with {problem_key!r} and {solution_key!r}, "
                          f"got {type(record).__name__}")
    problem = _text_field(record, problem_key, where, required=True)
    solution = _text_field(record, solution_key, where, required=True)
    answer = _text_field(record, answer_key, where, required=False)
    if answer is None:
        answer = extract_boxed(solution)
    return Problem(problem=problem, solution=solution, answer=answer, source=where)


def load_problems(path: str | Path, *, problem_key: str = "problem", solution_key: str = "solution",
                  answer_key: str = "answer", on_bad_row: Literal["error", "skip"] = "error") -> LoadResult:
    """Read a .jsonl, .json or .parquet file of problems.

    Raises ``BadRowError`` (a ``ValueError``) naming file, line and field for a bad row unless
    ``on_bad_row="skip"``, which drops such rows and counts them in the result.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problem file {path} does not exist")
    result = LoadResult(problems=[])
    for where, record in _rows(path):
        try:
            result.problems.append(_problem(record, where, problem_key, solution_key, answer_key))
        except BadRowError as exc:
            if on_bad_row == "error":
                raise
            result.num_skipped += 1
            if len(result.skipped) < 5:
                result.skipped.append(str(exc))
    if result.num_skipped:
        logger.warning("%s: skipped %d bad rows, e.g. %s", path, result.num_skipped, result.skipped[0])
    if not result.problems:
        raise ValueError(f"{path}: no usable problems (skipped {result.num_skipped} bad rows)")
    return result


def split_held_out(problems: list[Problem], fraction: float,
                   seed: int) -> tuple[list[Problem], list[Problem]]:
    """Deterministic ``(train, held_out)`` split; held_out takes ``round(fraction * n)`` (at least 1)."""
    if fraction <= 0:
        return list(problems), []
    order = list(range(len(problems)))
    random.Random(f"held-out:{seed}").shuffle(order)
    num_held = max(1, round(fraction * len(problems)))
    if num_held >= len(problems):
        raise ValueError(f"eval_fraction={fraction} of {len(problems)} problems leaves none to train on")
    held = set(order[:num_held])
    return ([p for i, p in enumerate(problems) if i not in held],
            [p for i, p in enumerate(problems) if i in held])


class ProblemSampler:
    """Seeded per-epoch shuffles of problem indices, served a global batch at a time.

    All data-parallel ranks hold the same cursor; rank ``r`` of ``world_size`` takes the ``r``-th
    contiguous slice of each global batch, so ranks see disjoint problems and the global batch does not
    depend on ``world_size``. A batch that reaches the end of an epoch continues into the next epoch's
    shuffle. ``state_dict`` is the global cursor: resuming with another ``world_size`` is allowed.
    """

    def __init__(self, num_problems: int, global_batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        if num_problems < 1:
            raise ValueError(f"num_problems={num_problems}: the dataset is empty")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size}: must be a positive multiple of the "
                             f"data-parallel world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
        self.num_problems, self.global_batch_size, self.seed = num_problems, global_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_problems))
        random.Random(f"epoch:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_global_batch(self) -> list[int]:
        """The next ``global_batch_size`` problem indices (all ranks), advancing the cursor."""
        batch: list[int] = []
        while len(batch) < self.global_batch_size:
            if self.offset == self.num_problems:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(self.global_batch_size - len(batch), self.num_problems - self.offset)
            batch.extend(self._order[self.offset:self.offset + take])
            self.offset += take
        return batch

    def next_batch(self) -> list[int]:
        """This rank's share (``global_batch_size // world_size`` indices) of the next global batch."""
        per_rank = self.global_batch_size // self.world_size
        return self.next_global_batch()[self.rank * per_rank:(self.rank + 1) * per_rank]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "num_problems": self.num_problems}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_problems"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler checkpoint has {key}={state[key]} but this run has "
                                 f"{key}={getattr(self, key)}: resume with the same data and seed")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order(self.epoch)


def load_splits(cfg: DataConfig) -> tuple[list[Problem], list[Problem]]:
    """``(train, eval)`` problems for a ``DataConfig``: ``eval_path`` or an ``eval_fraction`` split."""
    kwargs = dict(problem_key=cfg.problem_key, solution_key=cfg.solution_key,
                  answer_key=cfg.answer_key, on_bad_row=cfg.on_bad_row)
    train = load_problems(cfg.train_path, **kwargs).problems
    if cfg.eval_path is not None:
        return train, load_problems(cfg.eval_path, **kwargs).problems
    return split_held_out(train, cfg.eval_fraction, cfg.seed)
