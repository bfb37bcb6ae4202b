"""bf16 against fp32: the OPSD step at TP1, TP2 and PP2 (same weights, same batch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_torchrun

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.distributed
def test_bf16_opsd_step_matches_fp32():
    out = run_torchrun(WORKERS / "bf16_step.py", 2)
    assert "bf16_step: all checks passed" in out, out[-5000:]
    for layout in ("[TP1]", "[TP2]", "[PP2]"):
        assert f"{layout} loss" in out, f"{layout} did not run:\n{out[-5000:]}"
