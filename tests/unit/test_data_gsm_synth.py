"""The shipped GSM-style word problems (examples/data/gsm_synth): reproducible from the recorded command,
disjoint splits, and answers re-derived from the problem text alone."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from megatron_opsd.data import synthetic
from megatron_opsd.data.answers import extract_boxed
from megatron_opsd.data.dataset import load_problems

GSM_DIR = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm_synth"

# regex over the problem text -> the answer from its numbers (written from the problem statements, not
# from the generator's code)
KINDS = {
    "shopping": (r"buys (\d+) pens that cost (\d+) dollars each and (\d+) books that cost (\d+) dollars each\. "
                 r"\w+ pays with a (\d+)-dollar bill\.", lambda n1, p1, n2, p2, bill: bill - n1 * p1 - n2 * p2),
    "savings": (r"saves (\d+) dollars every week for (\d+) weeks\. Then \w+ spends (\d+) dollars",
                lambda per, weeks, spent: per * weeks - spent),
    "bakery": (r"bakes (\d+) trays of \w+ with (\d+) \w+ on each tray\. \w+ sells (\d+) \w+ and packs the rest "
               r"equally into (\d+) boxes\.", lambda trays, per, sold, boxes: Fraction(trays * per - sold, boxes)),
    "trip": (r"drives at (\d+) miles per hour for (\d+) hours, then at (\d+) miles per hour for (\d+) hours\.",
             lambda v1, h1, v2, h2: v1 * h1 + v2 * h2),
    "teams": (r"has (\d+) classes with (\d+) students in each class\. Today (\d+) students are absent\. "
              r"Coach \w+ splits the students who are present into teams of (\d+)\.",
              lambda classes, per, absent, size: Fraction(classes * per - absent, size)),
    "garden": (r"plants (\d+) rows of \w+ plants with (\d+) plants in each row\. Each plant grows (\d+) \w+s\. "
               r"\w+ gives (\d+) \w+s to friends\.", lambda rows, per, each, given: rows * per * each - given),
    "marbles": (r"has (\d+) \w+s\. \w+ gives \w+ (\d+) more \w+s\. Then \w+ loses (\d+) \w+s\.",
                lambda a, b, lost: a + b - lost),
}
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: Fraction(a, b)}


def solve(problem: str) -> tuple[str, Fraction]:
    for kind, (pattern, answer) in KINDS.items():
        match = re.search(pattern, problem)
        if match:
            return kind, Fraction(answer(*map(int, match.groups())))
    raise AssertionError(f"unrecognised problem: {problem}")


def test_generation_is_deterministic_and_splits_are_disjoint():
    train, held_out = synthetic.make_splits(300, 60, seed=3, family="gsm")
    assert (train, held_out) == synthetic.make_splits(300, 60, seed=3, family="gsm")
    assert train != synthetic.make_splits(300, 60, seed=4, family="gsm")[0]
    problems = [row["problem"] for row in train + held_out]
    assert len(set(problems)) == len(problems) == 360


def test_shipped_files_are_the_recorded_command_output(tmp_path):
    synthetic.main(["--family", "gsm", "--out", str(tmp_path)])  # the command in GSM_DIR/README.md
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (GSM_DIR / name).read_bytes(), name
    assert not (tmp_path / "tokenizer.model").exists()  # real-tokenizer data: no tokenizer is trained
    assert "python -m megatron_opsd.data.synthetic --family gsm --out examples/data/gsm_synth" in \
        (GSM_DIR / "README.md").read_text()
    assert [sum(1 for _ in open(GSM_DIR / n)) for n in ("train.jsonl", "eval.jsonl")] == [1000, 200]
    train = {json.loads(line)["problem"] for line in open(GSM_DIR / "train.jsonl")}
    assert not train & {json.loads(line)["problem"] for line in open(GSM_DIR / "eval.jsonl")}


@pytest.mark.parametrize("name", ["train.jsonl", "eval.jsonl"])
def test_every_answer_checks_out(name):
    rows = [json.loads(line) for line in open(GSM_DIR / name)]
    kinds = set()
    for row in rows:
        kind, want = solve(row["problem"])
        kinds.add(kind)
        assert want.denominator == 1 and want > 0, row
        assert row["answer"] == str(want.numerator), row
        assert row["solution"].endswith(f"The answer is \\boxed{{{row['answer']}}}."), row
        assert extract_boxed(row["solution"]) == row["answer"], row
        worked = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", row["solution"])
        assert len(worked) >= 2, row  # multi-step
        for a, op, b, c in worked:
            assert OPS[op](int(a), int(b)) == int(c), row  # every worked step is right
    assert kinds == set(KINDS)
    problems = load_problems(GSM_DIR / name).problems
    assert [p.answer for p in problems] == [row["answer"] for row in rows]
