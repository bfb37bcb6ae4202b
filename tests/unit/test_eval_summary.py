"""tools/eval_summary.py: both accuracies (boxed; last-number fallback) from a run's eval_step_N.jsonl,
the per-step curves from metrics.jsonl, before/after examples, and one line for a bad log directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import eval_summary  # noqa: E402


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def record(i: int, response: str, reference: str, tokens: int) -> dict:
    # "answer"/"correct" as a run without the fallback wrote them: the tool must not trust them
    return {"id": i, "source": f"problems.jsonl:{i + 1}", "response": response, "answer": None,
            "reference": reference, "correct": False, "response_tokens": tokens}


BEFORE = [
    record(0, "12 + 3 = 15, so \\boxed{15}.", "15", 10),          # boxed: right, last number: right
    record(1, "She has 40 + 2 = 42 apples left.", "42", 20),      # boxed: wrong (none), last number: right
    record(2, "\\boxed{7}. Wait, it is 8.", "8", 30),             # a box wins over later numbers: both wrong
    record(3, "I think 5 apples.", "6", 40),                      # both wrong
]
AFTER = [
    record(0, "\\boxed{15}", "15", 5),
    record(1, "40 + 2 = 42, so \\boxed{42}", "42", 5),
    record(2, "It is 1,000 or \\boxed{9}", "8", 5),
    record(3, "6 apples", "6", 5),
]


def make_run(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps({"problem": f"question {i}"}) + "\n"
                                                     for i in range(4)))
    for r in BEFORE + AFTER:
        r["source"] = str(tmp_path / r["source"])
    write(logs / "eval_step_0.jsonl", BEFORE)
    write(logs / "eval_step_2.jsonl", AFTER)
    write(logs / "metrics.jsonl", [
        {"kind": "eval", "step": 0, "accuracy": 0.25},
        {"kind": "train", "step": 1, "loss": 0.5, "divergence": 0.9, "clip_fraction": 0.01, "response_length": 7},
        {"kind": "train", "step": 2, "loss": 0.4, "divergence": 0.8, "clip_fraction": 0.02, "response_length": 6},
        {"kind": "train", "step": 2, "loss": 0.3, "divergence": 0.7, "clip_fraction": 0.03, "response_length": 5},
    ])
    return logs


def test_both_accuracies_curves_and_examples(tmp_path, capsys):
    logs = make_run(tmp_path)
    summary = eval_summary.summarize(logs)
    assert summary["evals"][0] == {"problems": 4, "accuracy_boxed": 0.25, "accuracy_last_number": 0.5,
                                   "boxed_share": 0.5, "response_length": 25.0}
    assert summary["evals"][2] == {"problems": 4, "accuracy_boxed": 0.5, "accuracy_last_number": 0.75,
                                   "boxed_share": 0.75, "response_length": 5.0}
    # a resumed run's repeated step: the last record wins
    assert [(c["step"], c["divergence"], c["clip_fraction"]) for c in summary["curves"]] == [(1, 0.9, 0.01),
                                                                                           (2, 0.7, 0.03)]
    assert eval_summary.main([str(logs), "--examples", "1", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 4 | 0.250 | 0.500 | 0.500 | 25.0 |" in out and "| 2 | 4 | 0.500 | 0.750 | 0.750 | 5.0 |" in out
    # the one example: the problem whose last-number verdict changed (id 3), its text read from its source
    assert "**Problem 3** (reference 6): question 3" in out and "I think 5 apples." in out
    assert "**Problem 0**" not in out
    assert json.loads((tmp_path / "s.json").read_text())["evals"]["2"]["accuracy_last_number"] == 0.75


def test_bad_log_dir_is_one_line(tmp_path, capsys):
    assert eval_summary.main([str(tmp_path / "missing")]) == 2
    assert "missing is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert eval_summary.main([str(tmp_path / "empty")]) == 2
    assert "holds no eval_step_N.jsonl" in capsys.readouterr().err
    logs = make_run(tmp_path)
    (logs / "eval_step_5.jsonl").write_text('{"id": 0, "response": "x"}\n')
    assert eval_summary.main([str(logs)]) == 2
    assert "eval_step_5.jsonl:1: needs the fields 'response' and 'reference'" in capsys.readouterr().err


def test_smollm2_script_checks_its_arguments_before_converting(tmp_path):
    """examples/run_opsd_smollm2.sh: a bad option is one line and exit 2 before minutes of conversion,
    and nothing is written (it used to convert first and fail at the OPSD step)."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "smollm2"
    env = {**os.environ, "OUT": str(out), "SMOLLM2_GGUF": str(tmp_path / "absent.gguf"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(repo / "examples" / "run_opsd_smollm2.sh"), "--train.stepz", "3"],
                          env=env, capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 2 and "train.stepz: unknown config key" in proc.stderr, proc
    assert not any(out.iterdir())
