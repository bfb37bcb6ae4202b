"""Vocab-parallel losses at TP = 2 and 4 (and two TP=2 groups side by side) against the unsharded fp64
reference: one torchrun launch per process count runs every case (see workers/losses_worker.py).
TP = 1 is covered by tests/unit/test_losses.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_torchrun

WORKER = Path(__file__).parent / "workers" / "losses_worker.py"


@pytest.mark.parametrize("nprocs", [2, 4])
def test_vocab_parallel_losses_match_unsharded_reference(nprocs):
    output = run_torchrun(WORKER, nprocs, timeout=600)
    assert f"checks passed on {nprocs} ranks" in output
