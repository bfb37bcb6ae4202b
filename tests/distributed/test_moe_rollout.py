"""Rollout of a mixture of experts at EP2 with data-parallel ranks that finish at different steps and hold
different numbers of batches (or none): no hang (a 1-minute collective timeout and a 5-minute launch
timeout), greedy tokens equal HF generate (workers/moe_rollout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_torchrun

WORKER = Path(__file__).parent / "workers" / "moe_rollout.py"


@pytest.mark.distributed
def test_expert_parallel_rollout_does_not_hang_and_matches_hf():
    out = run_torchrun(WORKER, 2, timeout=300)
    assert "moe_rollout: all checks passed" in out, out[-5000:]
    for rank in (0, 1):
        assert f"[rank {rank}] EP2:" in out and f"[rank {rank}] EP2 with" in out, out[-5000:]
