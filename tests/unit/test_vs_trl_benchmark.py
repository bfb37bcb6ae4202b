"""benchmarks/vs_trl.py: its pure parts (arguments, TRL's memory estimate, the tables); needs no TRL."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl.py"
_spec = importlib.util.spec_from_file_location("vs_trl", _PATH)
vs_trl = sys.modules["vs_trl"] = importlib.util.module_from_spec(_spec)  # (dataclasses look it up)
_spec.loader.exec_module(vs_trl)


def _result(step, rollout, peak, **extra):
    return {"step_s": step, "rollout_s": rollout, "train_s": step - rollout, "peak_gib": peak, **extra}


def test_defaults_are_the_issue_sizes_and_quick_shrinks_them():
    args = vs_trl.parse_args([])
    assert (args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, args.ffn) == (151936, 256, 4, 4, 2, 704)
    assert (args.batch, args.prompt, args.teacher_extra, args.response) == (8, 128, 256, 256)
    assert args.long_batch == 4 and args.long_responses == [1024, 2048] and args.precisions == ["fp32", "best"]
    cases = vs_trl.cases(args)
    assert [(c.batch, c.response, c.role) for c in cases] == [
        (8, 256, "main"), (4, 128, "fit"), (4, 256, "fit"), (4, 1024, "long"), (4, 2048, "long")]
    assert cases[-1].tokens == 8192 and cases[-1].name == "B=4, R=2048"
    quick = vs_trl.parse_args(["--quick"])
    assert quick.vocab < 10000 and quick.repeats == 1 and max(quick.long_responses) < 100
    mixed = vs_trl.parse_args(["--quick", "--long-responses", "64", "--repeats", "2"])  # explicit options win
    assert mixed.long_responses == [64] and mixed.repeats == 2 and mixed.vocab == quick.vocab


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats=0 must be >= 1"),
    (["--long-responses", "1024,abc"], "comma-separated token counts"),
    (["--fit-responses", "0"], "token counts must be >= 1"),
    (["--precisions", "fp16"], "choose from fp32, best"),
    (["--trl-budget-gib", "-1"], "--trl-budget-gib=-1.0 must be > 0"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        vs_trl.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_fit_line_recovers_a_line_and_fits_noisy_points_by_least_squares():
    a, b = vs_trl.fit_line([(512, 2.0 + 0.004 * 512), (2048, 2.0 + 0.004 * 2048)])
    assert a == pytest.approx(2.0) and b == pytest.approx(0.004)
    # y = 1 + 2x plus residuals +1, -2, +1: they sum to 0 and are orthogonal to x, so least squares
    # returns the line itself (an interpolation through two of the points would not)
    a, b = vs_trl.fit_line([(0, 2.0), (1, 1.0), (2, 6.0)])
    assert (a, b) == pytest.approx((1.0, 2.0))
    with pytest.raises(ValueError, match="two distinct x"):
        vs_trl.fit_line([(512, 3.0), (512, 3.1)])


def test_trl_estimate_decides_does_not_fit_from_the_formula():
    points = [(1024, 5.0), (2048, 9.0)]  # 1 GiB + 4 GiB per 1,024 tokens
    assert vs_trl.trl_estimate(points, 8192, budget_gib=20.0) == (pytest.approx(33.0), False)
    assert vs_trl.trl_estimate(points, 4096, budget_gib=20.0) == (pytest.approx(17.0), True)
    assert vs_trl.trl_estimate([(1024, 5.0)], 8192, budget_gib=100.0) == (None, False)  # no formula: not run


def test_table_shows_ratios_does_not_fit_and_failures():
    rows = [
        {"case": "B=8, R=256", "role": "main", "precision": "bf16 / bf16", "dtype": "bf16",
         "ours": _result(10.0, 5.0, 2.5), "trl": _result(40.0, 20.0, 10.0), "trl_estimate_gib": None},
        {"case": "B=4, R=2048", "role": "long", "precision": "fp32 / fp32", "dtype": "fp32",
         "ours": _result(95.7, 40.0, 4.84), "trl": None, "trl_estimate_gib": 34.2, "largest_case": "B=4, R=2048"},
        {"case": "B=4, R=128", "role": "fit", "precision": "fp32 / fp32", "dtype": "fp32",
         "ours": {"error": "exit 1"}, "trl": _result(8.0, 4.0, 3.0), "trl_estimate_gib": None},
    ]
    lines = vs_trl.format_table(rows).splitlines()
    assert len(lines) == 5
    assert lines[2] == ("| B=8, R=256 | bf16 / bf16 | 10.0 / 40.0 (0.25) | 5.0 / 20.0 (0.25) | 5.0 / 20.0 (0.25) "
                        "| 2.50 / 10.00 (0.25) |")
    assert "4.84 / does not fit (~34.2 GiB) (~0.14 vs estimate)" in lines[3]
    assert "95.7 / - |" in lines[3]
    assert lines[4].startswith("| B=4, R=128 | fp32 / fp32 | failed / 8.0 |")
    targets = vs_trl.target_lines(rows)
    assert targets == ["B=8, R=256, bf16 / bf16: step 0.25x TRL (target <= 0.25), peak 0.25x (target <= 0.2)",
                       "B=4, R=2048, ours fp32: peak 4.84 GiB (target <= 5), step 95.7 s"]
    fp32_main = {**rows[0], "precision": "fp32 / fp32", "dtype": "fp32", "ours": _result(14.0, 7.0, 2.5),
                 "trl": _result(28.0, 14.0, 9.0)}
    targets = vs_trl.target_lines([fp32_main] + rows)
    assert targets[-1] == ("B=8, R=256, ours bf16 vs TRL's faster and smaller precision: step 0.36x, "
                           "peak 0.28x")  # 10 / min(28, 40), 2.5 / min(9, 10)


def test_memory_table_lists_our_parts_and_skips_failed_runs():
    parts = dict(interpreter_gib=0.4, weights_gib=0.3, grads_gib=0.3, optimizer_gib=0.6, rest_gib=0.9)
    rows = [{"case": "B=8, R=256", "dtype": "fp32", "ours": _result(1.0, 0.5, 2.5, **parts)},
            {"case": "B=4, R=128", "dtype": "fp32", "ours": {"error": "exit 1"}}]
    lines = vs_trl.format_memory(rows).splitlines()
    assert lines[2:] == ["| B=8, R=256 | fp32 | 2.50 | 0.40 | 0.30 | 0.30 | 0.60 | 0.90 |"]


def test_ours_only_drops_trl_and_its_fit_cases():
    args = vs_trl.parse_args(["--ours-only", "--long-responses", "1024"])
    assert [(c.batch, c.response, c.role) for c in vs_trl.cases(args)] == [(8, 256, "main"), (4, 1024, "long")]
    row = {"case": "B=8, R=256", "role": "main", "precision": "bf16 / bf16", "dtype": "bf16",
           "ours": _result(10.0, 5.0, 1.9), "trl": None, "trl_estimate_gib": None, "trl_skipped": "--ours-only"}
    assert vs_trl.format_table([row]).splitlines()[2].endswith("| 1.90 / not run (--ours-only) |")
    assert vs_trl.target_lines([row]) == []
