"""The OPSD step on a mixture of experts: the student's load-balancing loss (the teacher part adds none)
and layout invariance at EP2, EP4, EP2 x PP2, DP4 against the single-process run, and EP2 with data-parallel
ranks holding different numbers of micro-batches (workers/moe_opsd_step.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness import run_torchrun

WORKER = Path(__file__).parent / "workers" / "moe_opsd_step.py"


@pytest.mark.distributed
def test_moe_opsd_step_aux_loss_and_expert_parallel_layouts(tmp_path):
    ref = tmp_path / "reference.json"
    out = run_torchrun(WORKER, 1, ref)
    assert "moe_opsd_step reference: done" in out, out[-5000:]
    assert "the teacher part adds nothing" in out and "router_aux_loss_coef=0: same loss" in out, out[-5000:]
    out = run_torchrun(WORKER, 4, ref)
    assert "moe_opsd_step: all checks passed" in out, out[-5000:]
    for layout in ("EP2", "EP4", "EP2xPP2", "DP4", "EP2 frozen teacher", "EP2 uneven"):
        assert f"{layout:<19} loss=" in out, f"{layout!r} did not run:\n{out[-5000:]}"


@pytest.mark.distributed
def test_moe_opsd_sft_opd_steps_match_plain_pytorch_on_the_hf_model():
    out = run_torchrun(Path(__file__).parent / "workers" / "moe_opsd_hf_reference.py", 1)
    assert "moe_opsd_hf_reference: all checks passed" in out, out[-5000:]
    for family in ("qwen3_moe", "qwen2_moe", "mixtral", "qwen3_moe sft", "qwen3_moe opd"):
        assert re.search(rf"{family} +loss=", out), out[-5000:]
