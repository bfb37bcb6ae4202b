"""The embedded default data: synthetic multi-step arithmetic problems and a tokenizer trained on them.

``python -m megatron_opsd.data.synthetic --out DIR`` writes ``train.jsonl``, ``eval.jsonl`` (problems
disjoint from train) and ``tokenizer.model`` (sentencepiece unigram with byte fallback, digits split,
the chat markers ``<|im_start|> <|im_end|> <think> </think>`` and ``\\n`` as single pieces, and a
``<pad>`` piece). Generation is deterministic in ``--seed``; ``megatron_opsd/assets/arith`` holds the
output of the default command, so the default run needs no download.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from megatron_opsd.data.templates import STUDENT_TEMPLATE, TEACHER_TEMPLATE, fill
from megatron_opsd.data.tokenizer import IM_END, IM_START, THINK_CLOSE, THINK_OPEN

NAMES = ("Alice", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas")
ITEMS = ("apple", "marble", "pencil", "sticker", "cookie", "stamp", "shell", "card")
PHRASINGS = ("Compute {}.", "What is {}?", "Evaluate {}.", "Calculate the value of {}.")


def _expression(rng: random.Random) -> tuple[str, list[str], int]:
    """A chain of 2-3 operations on small integers, parenthesised where precedence requires."""
    value = rng.randint(2, 30)
    expr, low_precedence, steps = str(value), False, []
    for _ in range(rng.randint(2, 3)):
        divisors = [d for d in range(2, 10) if value % d == 0]
        op = rng.choice("+-*/")
        if op == "/" and not divisors:
            op = "*"
        if op == "-" and value < 2:
            op = "+"
        if op == "+":
            n = rng.randint(1, 50)
            new = value + n
        elif op == "-":
            n = rng.randint(1, value - 1)
            new = value - n
        elif op == "*":
            n = rng.randint(2, 9)
            new = value * n
        else:
            n = rng.choice(divisors)
            new = value // n
        if op in "*/" and low_precedence:
            expr = f"({expr})"
        expr, low_precedence = f"{expr} {op} {n}", op in "+-"
        steps.append(f"{value} {op} {n} = {new}")
        value = new
    problem = rng.choice(PHRASINGS).format(expr)
    return problem, [f"Step {i}: {s}." for i, s in enumerate(steps, start=1)], value


def _word_problem(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, bags, each = rng.randint(3, 40), rng.randint(2, 6), rng.randint(2, 12)
        bought = bags * each
        given = rng.randint(1, a + bought)
        problem = (f"{name} has {a} {item}s. {name} buys {bags} bags with {each} {item}s each and "
                   f"gives away {given}. How many {item}s does {name} have now?")
        have = a + bought
        steps = [f"The bags hold {bags} * {each} = {bought} {item}s.",
                 f"After buying, {name} has {a} + {bought} = {have} {item}s.",
                 f"After giving away {given}, {name} has {have} - {given} = {have - given} {item}s."]
        return problem, steps, have - given
    if kind == 1:
        price, count = rng.randint(2, 15), rng.randint(2, 9)
        cost = price * count
        paid = next(b for b in (20, 50, 100, 200) if b >= cost)
        problem = (f"A shop sells {item}s for {price} dollars each. {name} buys {count} {item}s and "
                   f"pays with {paid} dollars. How much change does {name} get, in dollars?")
        steps = [f"The {item}s cost {count} * {price} = {cost} dollars.",
                 f"The change is {paid} - {cost} = {paid - cost} dollars."]
        return problem, steps, paid - cost
    if kind == 2:
        per_day, days, extra = rng.randint(5, 40), rng.randint(2, 7), rng.randint(1, 30)
        problem = (f"{name} reads {per_day} pages a day for {days} days, then reads {extra} more pages. "
                   f"How many pages did {name} read in total?")
        steps = [f"In {days} days {name} reads {days} * {per_day} = {days * per_day} pages.",
                 f"Adding {extra} more gives {days * per_day} + {extra} = {days * per_day + extra} pages."]
        return problem, steps, days * per_day + extra
    friends, share = rng.randint(2, 8), rng.randint(3, 15)
    eaten = rng.randint(1, share)
    total = friends * share
    problem = (f"{friends} friends share {total} {item}s equally. Then each friend gives away {eaten} "
               f"of their {item}s. How many {item}s does each friend have left?")
    steps = [f"Each friend gets {total} / {friends} = {share} {item}s.",
             f"After giving away {eaten}, each has {share} - {eaten} = {share - eaten} {item}s."]
    return problem, steps, share - eaten


def generate(num: int, rng: random.Random, exclude: set[str]) -> list[dict[str, str]]:
    """``num`` distinct problems (none in ``exclude``) with worked solutions ending in ``\\boxed{}``."""
    rows: list[dict[str, str]] = []
    seen = set(exclude)
    while len(rows) < num:
        problem, steps, answer = (_expression if rng.random() < 0.6 else _word_problem)(rng)
        if problem in seen:
            continue
        seen.add(problem)
        solution = "\n".join([*steps, f"The answer is \\boxed{{{answer}}}."])
        rows.append({"problem": problem, "solution": solution, "answer": str(answer)})
    return rows


def make_splits(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = generate(num_train, rng, exclude=set())
    return train, generate(num_eval, rng, exclude={row["problem"] for row in train})


def train_tokenizer(rows: list[dict[str, str]], vocab_size: int) -> bytes:
    """A sentencepiece model (bytes) trained on the problems, solutions and rendered prompts."""
    import sentencepiece as spm

    texts = [row[key] for row in rows for key in ("problem", "solution")]
    texts += [fill(STUDENT_TEMPLATE, problem=r["problem"]) for r in rows[:100]]
    texts += [fill(TEACHER_TEMPLATE, problem=r["problem"], solution=r["solution"]) for r in rows[:100]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, max_sentence_length=16384,
        user_defined_symbols=[IM_START, IM_END, THINK_OPEN, THINK_CLOSE, "\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>", num_threads=1, minloglevel=2)
    return model.getvalue()


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=448,
                        help="pieces (with digits split this corpus supports at most ~460)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, held_out = make_splits(args.num_train, args.num_eval, args.seed)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(held_out, args.out / "eval.jsonl")
    (args.out / "tokenizer.model").write_bytes(train_tokenizer(train, args.vocab_size))
    print(f"wrote {len(train)} train and {len(held_out)} eval problems and tokenizer.model "
          f"(vocab {args.vocab_size}) to {args.out}")


if __name__ == "__main__":
    main()
