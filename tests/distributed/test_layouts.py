"""Foundation: parallel layouts, DP + distributed optimizer and checkpoint resharding vs TP1/PP1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_torchrun

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.distributed
def test_layouts_match_unsharded_reference(tmp_path):
    out = run_torchrun(WORKERS / "layouts.py", 4, tmp_path / "ckpt")
    assert "layouts: all checks passed" in out, out[-5000:]
    for line in ("TP2 ", "TP4", "PP2 (1F1B)", "TP2xPP2", "PP2xVPP2", "distopt adam", "ckpt TP2 -> TP1xPP1",
                 "ckpt TP2 -> TP1xPP2", "tied PP2", "tied TP2xPP2"):
        assert line in out, f"check {line!r} did not run:\n{out[-5000:]}"
