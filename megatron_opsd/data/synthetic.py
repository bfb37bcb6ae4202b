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


def _arith_problem(rng: random.Random) -> tuple[str, list[str], int]:
    return (_expression if rng.random() < 0.6 else _word_problem)(rng)


def generate(num: int, rng: random.Random, exclude: set[str], family: str = "arith") -> list[dict[str, str]]:
    """``num`` distinct problems of ``family`` (none in ``exclude``) with worked solutions ending in
    ``\\boxed{}`` (arith: one step per line; gsm: the steps as one paragraph; digits: one step that boxes
    its own result)."""
    draw, separator, conclude = FAMILIES[family]
    rows: list[dict[str, str]] = []
    seen = set(exclude)
    while len(rows) < num:
        problem, steps, answer = draw(rng)
        if problem in seen:
            continue
        seen.add(problem)
        solution = separator.join([*steps, f"The answer is \\boxed{{{answer}}}."] if conclude else steps)
        rows.append({"problem": problem, "solution": solution, "answer": str(answer)})
    return rows


def make_splits(num_train: int, num_eval: int, seed: int, family: str = "arith") -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = generate(num_train, rng, exclude=set(), family=family)
    return train, generate(num_eval, rng, exclude={row["problem"] for row in train}, family=family)


# ---- the GSM-style family: grade-school word problems of 2-4 steps (``--family gsm``) --------------
# Real-tokenizer data (no tokenizer is trained for it): ``examples/data/gsm_synth`` holds the output of
# ``python -m megatron_opsd.data.synthetic --family gsm --out examples/data/gsm_synth``.

GSM_THINGS = ("notebook", "toy car", "puzzle", "board game", "lamp", "backpack")
GSM_FOODS = ("cookies", "muffins", "cupcakes", "bagels")
GSM_PLANTS = ("tomato", "pepper", "bean", "strawberry")


def _gsm_shopping(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    n1, p1, n2, p2 = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 5), rng.randint(3, 12)
    a, b = n1 * p1, n2 * p2
    bill = next(v for v in (20, 50, 100, 200) if v > a + b)
    problem = (f"{name} buys {n1} pens that cost {p1} dollars each and {n2} books that cost {p2} dollars "
               f"each. {name} pays with a {bill}-dollar bill. How much change does {name} get, in dollars?")
    steps = [f"The pens cost {n1} * {p1} = {a} dollars.", f"The books cost {n2} * {p2} = {b} dollars.",
             f"Together they cost {a} + {b} = {a + b} dollars.",
             f"The change is {bill} - {a + b} = {bill - a - b} dollars."]
    return problem, steps, bill - a - b


def _gsm_savings(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    per_week, weeks = rng.randint(3, 20), rng.randint(2, 8)
    saved = per_week * weeks
    spent = rng.randint(1, saved - 1)
    thing = rng.choice(GSM_THINGS)
    problem = (f"{name} saves {per_week} dollars every week for {weeks} weeks. Then {name} spends {spent} "
               f"dollars on a {thing}. How many dollars does {name} have left?")
    steps = [f"{name} saves {per_week} * {weeks} = {saved} dollars.",
             f"After buying the {thing}, {name} has {saved} - {spent} = {saved - spent} dollars left."]
    return problem, steps, saved - spent


def _gsm_bakery(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    boxes, per_box = rng.randint(2, 6), rng.randint(2, 8)
    trays, per_tray = rng.randint(2, 6), rng.randint(6, 12)
    total = trays * per_tray
    if total <= boxes * per_box:
        trays += boxes * per_box // per_tray
        total = trays * per_tray
    sold = total - boxes * per_box
    food = rng.choice(GSM_FOODS)
    problem = (f"{name} bakes {trays} trays of {food} with {per_tray} {food} on each tray. {name} sells "
               f"{sold} {food} and packs the rest equally into {boxes} boxes. How many {food} are in each box?")
    steps = [f"{name} bakes {trays} * {per_tray} = {total} {food}.",
             f"After selling {sold}, {total} - {sold} = {total - sold} {food} are left.",
             f"Each box gets {total - sold} / {boxes} = {per_box} {food}."]
    return problem, steps, per_box


def _gsm_trip(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    v1, h1, v2, h2 = rng.randint(20, 60), rng.randint(2, 4), rng.randint(20, 60), rng.randint(1, 3)
    d1, d2 = v1 * h1, v2 * h2
    problem = (f"{name} drives at {v1} miles per hour for {h1} hours, then at {v2} miles per hour for {h2} "
               f"hours. How many miles does {name} drive in total?")
    steps = [f"The first part is {v1} * {h1} = {d1} miles.", f"The second part is {v2} * {h2} = {d2} miles.",
             f"In total {name} drives {d1} + {d2} = {d1 + d2} miles."]
    return problem, steps, d1 + d2


def _gsm_teams(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    size, teams = rng.randint(3, 6), rng.randint(3, 12)
    classes, per_class = rng.randint(2, 5), rng.randint(15, 30)
    total = classes * per_class
    while total <= size * teams:
        teams -= 1
    absent = total - size * teams
    problem = (f"A school has {classes} classes with {per_class} students in each class. Today {absent} "
               f"students are absent. Coach {name} splits the students who are present into teams of {size}. "
               f"How many teams are there?")
    steps = [f"The school has {classes} * {per_class} = {total} students.",
             f"Present today: {total} - {absent} = {total - absent} students.",
             f"The number of teams is {total - absent} / {size} = {teams}."]
    return problem, steps, teams


def _gsm_garden(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    rows, per_row, each = rng.randint(2, 6), rng.randint(3, 9), rng.randint(2, 6)
    plants = rows * per_row
    grown = plants * each
    given = rng.randint(1, grown - 1)
    plant = rng.choice(GSM_PLANTS)
    problem = (f"{name} plants {rows} rows of {plant} plants with {per_row} plants in each row. Each plant "
               f"grows {each} {plant}s. {name} gives {given} {plant}s to friends. How many {plant}s does "
               f"{name} keep?")
    steps = [f"There are {rows} * {per_row} = {plants} plants.",
             f"They grow {plants} * {each} = {grown} {plant}s.",
             f"{name} keeps {grown} - {given} = {grown - given} {plant}s."]
    return problem, steps, grown - given


def _gsm_marbles(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    """The easiest kind (two small additions/subtractions), so that a small model gets some right."""
    a, b = rng.randint(3, 20), rng.randint(2, 15)
    lost = rng.randint(1, a + b - 1)
    item = rng.choice(ITEMS)
    friend = rng.choice([n for n in NAMES if n != name])
    problem = (f"{name} has {a} {item}s. {friend} gives {name} {b} more {item}s. Then {name} loses {lost} "
               f"{item}s. How many {item}s does {name} have now?")
    steps = [f"After the gift, {name} has {a} + {b} = {a + b} {item}s.",
             f"After losing {lost}, {name} has {a + b} - {lost} = {a + b - lost} {item}s."]
    return problem, steps, a + b - lost


GSM_KINDS = (_gsm_shopping, _gsm_savings, _gsm_bakery, _gsm_trip, _gsm_teams, _gsm_garden, _gsm_marbles)


def _gsm_problem(rng: random.Random) -> tuple[str, list[str], int]:
    return rng.choice(GSM_KINDS)(rng, rng.choice(NAMES))


# ---- the one-digit family: a + b or a - b on one-digit numbers, one step (``--family digits``) -------
# The embedded default's data (``megatron_opsd/assets/digits``, the arith tokenizer): small enough that
# the tiny model learns it in minutes. Each fact comes in several phrasings, so held-out problems are
# new strings whose facts (``3 + 4``) the training set holds in other wordings.

DIGIT_PHRASINGS = {
    "+": (*PHRASINGS, "Add {a} and {b}.", "What is the sum of {a} and {b}?"),
    "-": (*PHRASINGS, "Subtract {b} from {a}.", "What is {a} minus {b}?"),
}


def _digits_problem(rng: random.Random) -> tuple[str, list[str], int]:
    op, a, b = rng.choice("+-"), rng.randint(0, 9), rng.randint(0, 9)
    if op == "-" and a < b:
        a, b = b, a
    value = a + b if op == "+" else a - b
    phrasing = rng.choice(DIGIT_PHRASINGS[op])
    return phrasing.format(f"{a} {op} {b}", a=a, b=b), [f"{a} {op} {b} = \\boxed{{{value}}}."], value


NUM_DIGIT_PROBLEMS = 100 * len(DIGIT_PHRASINGS["+"]) + 55 * len(DIGIT_PHRASINGS["-"])  # a - b needs a >= b

# (draw, step separator, whether "The answer is \\boxed{}." closes the solution). digits: the step boxes its
# own result, so the answer is written once (with a restated answer OPSD's teacher, copying the
# reference, taught the student to box an answer other than its own equation's).
FAMILIES = {"arith": (_arith_problem, "\n", True), "gsm": (_gsm_problem, " ", True),
            "digits": (_digits_problem, "\n", False)}


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
    parser.add_argument("--num-train", type=int, default=None,
                        help="default: 2000 (arith), 1000 (gsm), 700 (digits)")
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=448,
                        help="pieces (with digits split this corpus supports at most ~460)")
    parser.add_argument("--family", choices=tuple(FAMILIES), default="arith",
                        help="arith: data and tokenizer; gsm: grade-school word problems for real tokenizers; "
                             "digits: one-digit a + b / a - b, the embedded default's data (it uses the arith "
                             "tokenizer). gsm and digits write train/eval only")
    args = parser.parse_args(argv)
    if args.family == "digits" and (args.num_train or 700) + args.num_eval > NUM_DIGIT_PROBLEMS:
        parser.error(f"--family digits has {NUM_DIGIT_PROBLEMS} distinct problems: --num-train + --num-eval "
                     "must not exceed it")
    args.out.mkdir(parents=True, exist_ok=True)
    num_train = args.num_train or {"arith": 2000, "gsm": 1000, "digits": 700}[args.family]
    train, held_out = make_splits(num_train, args.num_eval, args.seed, family=args.family)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(held_out, args.out / "eval.jsonl")
    if args.family != "arith":
        print(f"wrote {len(train)} train and {len(held_out)} eval {args.family} problems to {args.out}")
        return
    (args.out / "tokenizer.model").write_bytes(train_tokenizer(train, args.vocab_size))
    print(f"wrote {len(train)} train and {len(held_out)} eval problems and tokenizer.model "
          f"(vocab {args.vocab_size}) to {args.out}")


if __name__ == "__main__":
    main()
