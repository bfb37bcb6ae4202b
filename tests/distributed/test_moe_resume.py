"""Resuming a mixture-of-experts training checkpoint (megatron-core's chained dense + expert distributed
optimizer) at the same expert-parallel size and at another, in both directions (workers/moe_resume.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_torchrun

WORKER = Path(__file__).parent / "workers" / "moe_resume.py"


@pytest.mark.distributed
def test_moe_resume_at_the_same_and_at_another_expert_parallel_size(tmp_path):
    out = run_torchrun(WORKER, 2, tmp_path)
    assert "moe_resume: all checks passed" in out, out[-5000:]
    for what, steps in (("EP2 -> EP2", (2, 3)), ("EP2 -> EP2 dp_reshardable", (2, 3)), ("EP2 -> EP1", (2, 3)),
                        ("EP1 -> EP2", (3,))):
        assert f"{what}: optimizer state of" in out, out[-5000:]
        for step in steps:
            assert f"{what:<26} step {step} loss=" in out, f"{what} step {step} did not run:\n{out[-5000:]}"
