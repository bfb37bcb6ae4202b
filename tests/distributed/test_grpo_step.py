"""The GRPO step: equal to plain fp64 GRPO on the HF model at TP1/TP2/PP2/DP2/CP2 (KL to theta_0: k3, exact forward
and reverse KL); opsd+grpo's limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_torchrun

WORKER = Path(__file__).parent / "workers" / "grpo_step.py"


@pytest.mark.distributed
def test_grpo_step_matches_plain_pytorch_and_opsd_grpo_limits():
    out = run_torchrun(WORKER, 1)
    assert "grpo_step single: all checks passed" in out, out[-5000:]
    for line in ("[grpo kl] TP1", "[dr_grpo] TP1", "grpo_weight=0 vs opsd", "divergence_weight=0 vs grpo",
                 "[grpo forward_kl] TP1", "[grpo reverse_kl] TP1"):
        assert line in out, f"{line!r} did not run:\n{out[-3000:]}"


@pytest.mark.distributed
def test_grpo_step_matches_across_layouts():
    out = run_torchrun(WORKER, 2)
    assert "grpo_step layouts: all checks passed" in out, out[-5000:]
    for layout in ("TP2", "PP2", "DP2", "CP2"):
        assert f"[grpo kl] {layout}" in out and f"[dr_grpo] {layout}" in out, out[-3000:]
        assert f"[grpo forward_kl] {layout}" in out and f"[grpo reverse_kl] {layout}" in out, out[-3000:]
