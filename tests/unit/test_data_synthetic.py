"""The embedded arithmetic data: reproducible, correct answers (re-derived from the problem text), and
answer checking."""

from __future__ import annotations

import ast
import json
import operator
import re
from fractions import Fraction
from pathlib import Path

import pytest

from megatron_opsd.data import synthetic
from megatron_opsd.data.answers import answers_match, extract_boxed
from megatron_opsd.data.config import DataConfig
from megatron_opsd.data.dataset import load_problems, load_splits

ARITH_DIR = Path(__file__).resolve().parents[2] / "megatron_opsd" / "assets" / "arith"
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> Fraction:
    """Exact value of an arithmetic expression with + - * / and parentheses (Python precedence)."""
    def walk(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return Fraction(node.value)
    return walk(ast.parse(expression, mode="eval").body)


WORD_PROBLEMS = [  # regex over the problem text -> the answer from its numbers
    (r"has (\d+) \w+s\. \w+ buys (\d+) bags with (\d+) \w+s each and gives away (\d+)\.",
     lambda a, bags, each, given: a + bags * each - given),
    (r"for (\d+) dollars each\. \w+ buys (\d+) \w+s and pays with (\d+) dollars",
     lambda price, count, paid: paid - price * count),
    (r"reads (\d+) pages a day for (\d+) days, then reads (\d+) more pages",
     lambda per_day, days, extra: per_day * days + extra),
    (r"^(\d+) friends share (\d+) \w+s equally\. Then each friend gives away (\d+)",
     lambda friends, total, eaten: Fraction(total, friends) - eaten),
]


def solve(problem: str) -> tuple[str, Fraction]:
    """(kind, answer) of a generated problem, from its text alone."""
    expression = re.fullmatch(r"(?:Compute|What is|Evaluate|Calculate the value of) ([\d ()+\-*/]+)[.?]",
                              problem)
    if expression:
        return "expression", evaluate(expression.group(1))
    for kind, (pattern, answer) in enumerate(WORD_PROBLEMS):
        match = re.search(pattern, problem)
        if match:
            return f"word{kind}", Fraction(answer(*map(int, match.groups())))
    raise AssertionError(f"unrecognised problem: {problem}")


def test_generation_is_deterministic_and_splits_are_disjoint():
    train, held_out = synthetic.make_splits(300, 50, seed=7)
    assert (train, held_out) == synthetic.make_splits(300, 50, seed=7)
    assert train != synthetic.make_splits(300, 50, seed=8)[0]
    problems = [row["problem"] for row in train + held_out]
    assert len(set(problems)) == len(problems) == 350


def test_shipped_assets_are_the_default_command_output(tmp_path):
    synthetic.main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (ARITH_DIR / name).read_bytes(), name
    assert sum(1 for _ in open(ARITH_DIR / "train.jsonl")) == 2000
    assert sum(1 for _ in open(ARITH_DIR / "eval.jsonl")) == 200
    total = sum(p.stat().st_size for p in ARITH_DIR.iterdir())
    assert total < 1_000_000


@pytest.mark.parametrize("name", ["train.jsonl", "eval.jsonl"])
def test_every_answer_checks_out(name):
    rows = [json.loads(line) for line in open(ARITH_DIR / name)]
    kinds = set()
    for row in rows:
        kind, want = solve(row["problem"])
        kinds.add(kind)
        assert want.denominator == 1 and want >= 0, row
        assert row["answer"] == str(want.numerator), row
        assert extract_boxed(row["solution"]) == row["answer"], row
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", row["solution"]):
            assert evaluate(f"{a} {op} {b}") == int(c), row  # every worked step is right
    assert kinds == {"expression", "word0", "word1", "word2", "word3"}
    # The loader reads the shipped files and takes the answer column.
    problems = load_problems(ARITH_DIR / name).problems
    assert [p.answer for p in problems] == [row["answer"] for row in rows]


DIGITS_DIR = ARITH_DIR.parent / "digits"
DIGIT_PATTERNS = [  # regex over the problem text -> its answer, written here from the wording alone
    (r"(?:Compute|What is|Evaluate|Calculate the value of) (\d) \+ (\d)[.?]", lambda a, b: a + b),
    (r"(?:Compute|What is|Evaluate|Calculate the value of) (\d) - (\d)[.?]", lambda a, b: a - b),
    (r"Add (\d) and (\d)\.", lambda a, b: a + b),
    (r"What is the sum of (\d) and (\d)\?", lambda a, b: a + b),
    (r"Subtract (\d) from (\d)\.", lambda b, a: a - b),
    (r"What is (\d) minus (\d)\?", lambda a, b: a - b),
]


def test_digits_family_is_the_shipped_default_data_and_every_answer_checks_out(tmp_path):
    synthetic.main(["--family", "digits", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "train.jsonl"]  # the arith tokenizer
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DIGITS_DIR / name).read_bytes(), name
    train, held_out = ([json.loads(line) for line in open(DIGITS_DIR / name)] for name in ("train.jsonl", "eval.jsonl"))
    assert (len(train), len(held_out)) == (700, 200)
    assert not {r["problem"] for r in train} & {r["problem"] for r in held_out}
    used = set()
    for row in train + held_out:
        [(index, want)] = [(i, answer(*map(int, m.groups()))) for i, (pattern, answer) in enumerate(DIGIT_PATTERNS)
                           if (m := re.fullmatch(pattern, row["problem"]))]
        used.add(index)
        assert want >= 0 and row["answer"] == str(want) and extract_boxed(row["solution"]) == row["answer"], row
    assert used == set(range(len(DIGIT_PATTERNS)))
    # more problems than the family has distinct ones: refused before anything is written
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["--family", "digits", "--num-train", "800", "--out", str(tmp_path / "no")])
    assert exc.value.code == 2 and not (tmp_path / "no").exists()


def test_default_config_reads_the_shipped_data():
    train, held_out = load_splits(DataConfig())
    assert (len(train), len(held_out)) == (2000, 200)
    assert train[0].source == f"{ARITH_DIR / 'train.jsonl'}:1"


def test_shipped_tokenizer_specials(sp_tokenizer):
    sp = sp_tokenizer._sp
    assert sp_tokenizer.vocab_size == 448 and sp.id_to_piece(3) == "<pad>" and sp.id_to_piece(2) == "</s>"
    for piece in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "\n"):
        assert sp_tokenizer.encode(piece) == [sp.piece_to_id(piece)], piece
    assert sp_tokenizer.supports_thinking


@pytest.mark.parametrize("text, boxed", [
    ("so \\boxed{62}.", "62"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("$\\boxed 7$", "7"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
])
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


@pytest.mark.parametrize("pred, ref, same", [
    ("62", "62", True),
    (" 62 ", "62", True),
    ("62.0", "62", True),
    ("62.", "62", True),
    ("$62$", "62", True),
    ("\\text{62}", "62", True),
    ("1,000", "1000", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "1/2", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("63", "62", False),
    ("6 2", "63", False),
    ("", "62", False),
    (None, "62", False),
    ("x", "62", False),
])
def test_answers_match(pred, ref, same):
    assert answers_match(pred, ref) is same


def test_symbolic_answers_use_math_verify_when_installed():
    pytest.importorskip("math_verify")
    assert answers_match("\\sqrt{4}", "2")
    assert answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    assert not answers_match("\\sqrt{5}", "2")
