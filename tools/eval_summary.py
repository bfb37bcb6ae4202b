"""Summarise a run's evaluations and training curves as Markdown.

    python tools/eval_summary.py runs/smollm2/logs [--examples 3] [--json summary.json]

Reads ``LOG_DIR/eval_step_N.jsonl`` (one line per held-out problem, written by the trainer) and
``LOG_DIR/metrics.jsonl``. Every evaluation's responses are scored twice, whatever
``train.eval_answer_fallback`` the run used: **boxed** (the answer is the last ``\\boxed{}``; none is
wrong) and **last number** (the last ``\\boxed{}``, else the response's last number). Their difference
tells format learning (boxing the answer) apart from arithmetic. Also: the share of responses with a
box, the mean response length, the per-step divergence (forward KL, unclipped), clip fraction and loss,
and a few responses before and after training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_opsd.data.answers import answers_match, extract_answer, extract_boxed  # noqa: E402

_EVAL_FILE = re.compile(r"^eval_step_(\d+)\.jsonl$")
CURVE_KEYS = ("loss", "divergence", "clip_fraction", "response_length", "grad_norm", "step_s")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}:{number}: not a JSON line ({exc})") from None
    return rows


def score(records: list[dict], path: Path) -> dict:
    """Both accuracies, the boxed share and the mean response length of one evaluation's records."""
    boxed = last_number = has_box = tokens = 0
    for number, r in enumerate(records, start=1):
        if "response" not in r or "reference" not in r:
            raise SystemExit(f"{path}:{number}: needs the fields 'response' and 'reference'")
        text = r["response"]
        boxed += answers_match(extract_answer(text, "none"), r["reference"])
        last_number += answers_match(extract_answer(text, "last_number"), r["reference"])
        has_box += extract_boxed(text) is not None
        tokens += r.get("response_tokens", 0)
    num = max(len(records), 1)
    return {"problems": len(records), "accuracy_boxed": boxed / num, "accuracy_last_number": last_number / num,
            "boxed_share": has_box / num, "response_length": tokens / num}


def summarize(log_dir: Path) -> dict:
    """``{"evals": {step: score}, "curves": [{step, loss, ...}], "records": {step: [...]}}``."""
    if not log_dir.is_dir():
        raise SystemExit(f"eval_summary: {log_dir} is not a directory (pass the run's logging.dir)")
    evals = {int(m.group(1)): p for p in log_dir.iterdir() if (m := _EVAL_FILE.match(p.name))}
    if not evals:
        raise SystemExit(f"eval_summary: {log_dir} holds no eval_step_N.jsonl (did the run evaluate?)")
    records = {step: read_jsonl(path) for step, path in sorted(evals.items())}
    latest: dict[int, dict] = {}
    metrics = log_dir / "metrics.jsonl"
    for r in read_jsonl(metrics) if metrics.is_file() else []:
        if r.get("kind") == "train":  # a resumed run repeats steps: the last record wins
            latest[r["step"]] = {"step": r["step"], **{k: r[k] for k in CURVE_KEYS if k in r}}
    return {"evals": {step: score(rows, evals[step]) for step, rows in records.items()},
            "curves": [latest[s] for s in sorted(latest)], "records": records}


def problem_text(source: str | None) -> str | None:
    """The problem of a record's ``source`` (``file:line``), when that file is readable."""
    if not source or ":" not in source:
        return None
    path, _, line = source.rpartition(":")
    try:
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if number == int(line):
                    return json.loads(text).get("problem")
    except (OSError, ValueError):
        return None
    return None


def pick_examples(before: list[dict], after: list[dict], count: int) -> list[tuple[dict, dict]]:
    """Pairs (before, after) of the same problem: first those whose last-number verdict changed."""
    by_id = {r["id"]: r for r in after}
    pairs = [(b, by_id[b["id"]]) for b in before if b.get("id") in by_id]

    def changed(pair):
        return tuple(answers_match(extract_answer(r["response"], "last_number"), r["reference"]) for r in pair)

    flips = [p for p in pairs if changed(p)[0] != changed(p)[1]]
    rest = [p for p in pairs if p not in flips]
    return (flips + rest)[:count]


def render(summary: dict, examples: int = 0, max_chars: int = 700) -> str:
    evals, curves = summary["evals"], summary["curves"]
    lines = ["| eval step | problems | accuracy (boxed) | accuracy (last-number fallback) | responses with a box "
             "| mean response tokens |", "|---|---|---|---|---|---|"]
    for step, s in evals.items():
        lines.append(f"| {step} | {s['problems']} | {s['accuracy_boxed']:.3f} | {s['accuracy_last_number']:.3f} "
                     f"| {s['boxed_share']:.3f} | {s['response_length']:.1f} |")
    if curves:
        keys = [k for k in CURVE_KEYS if any(k in c for c in curves)]
        lines += ["", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for c in curves:
            lines.append(f"| {c['step']} | " + " | ".join(f"{c[k]:.4g}" if k in c else "" for k in keys) + " |")
    steps = sorted(summary["records"])
    if examples and len(steps) > 1:
        first, last = steps[0], steps[-1]
        for before, after in pick_examples(summary["records"][first], summary["records"][last], examples):
            problem = problem_text(before.get("source")) or before.get("source", "")
            lines += ["", f"**Problem {before['id']}** (reference {before['reference']}): {problem}"]
            for step, r in ((first, before), (last, after)):
                text = r["response"] if len(r["response"]) <= max_chars else r["response"][:max_chars] + " [...]"
                verdict = "right" if answers_match(extract_answer(r["response"], "last_number"), r["reference"]) else "wrong"
                lines += [f"- step {step} (boxed: {extract_boxed(r['response'])}, last-number verdict: {verdict}):",
                          "", "```", text, "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", type=Path, help="the run's logging.dir")
    parser.add_argument("--examples", type=int, default=0, help="before/after responses to show")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.log_dir)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    print(render(summary, args.examples))
    if args.json is not None:
        args.json.write_text(json.dumps({k: summary[k] for k in ("evals", "curves")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
