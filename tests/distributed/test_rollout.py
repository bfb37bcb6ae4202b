"""Rollout engine under TP / PP / VPP / DP in one 4-process launch (see workers/rollout_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_torchrun

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.distributed
def test_rollout_layouts_match_tp1_and_hf():
    out = run_torchrun(WORKERS / "rollout_worker.py", 4)
    assert "rollout: all checks passed" in out, out[-5000:]
    for line in ("sampler TP2", "sampler TP4", "TP2xPP2 ", "kv==nocache", "vs trainer", "shared-prefill==independent",
                 "TP2 ", "TP2+SPxPP2", "TP4 ", "PP2 ",
                 "PP2xVPP2", "TP1 (DP4)", "TP2xCP2"):
        assert line in out, f"check {line!r} did not run:\n{out[-5000:]}"
