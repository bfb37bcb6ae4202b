"""tools/plot_metrics.py renders a metrics file (resumed runs included) and rejects a bad one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import plot_metrics  # noqa: E402

pytest.importorskip("matplotlib")


def test_renders_png_and_dedups_resumed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "eval", "step": 0, "accuracy": 0.1}] + [
        {"kind": "train", "step": s, "loss": 1.0 / s, "divergence": 0.1, "clip_fraction": 0.0,
         "response_length": 10, "tokens_per_s": 100.0} for s in (1, 2, 2, 3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [r["step"] for r in plot_metrics.load(path) if r["kind"] == "train"] == [1, 2, 3]
    out = tmp_path / "m.png"
    assert plot_metrics.main([str(path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a JSON line"):
        plot_metrics.load(path)
