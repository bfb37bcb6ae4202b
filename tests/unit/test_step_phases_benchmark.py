"""benchmarks/step_phases.py: its arguments and the phase sampler (the full run is a benchmark)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # the script imports vs_trl beside it
_spec = importlib.util.spec_from_file_location("step_phases", _BENCH / "step_phases.py")
step_phases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_phases)


def test_arguments_default_to_vs_trls_best_precision_and_refuse_one_step(capsys):
    args = step_phases.parse_args([])
    assert (args.dtype, args.recompute, args.steps) == ("bf16", "full", 3)
    with pytest.raises(SystemExit) as exc:
        step_phases.parse_args(["--steps", "1"])
    assert exc.value.code == 2 and "--steps=1" in capsys.readouterr().err


def test_memory_allocated_inside_a_phase_is_filed_under_it():
    """A 64 MiB buffer touched inside a wrapped call raises that phase's peak, not the phase after it."""
    sampler = step_phases.PhaseSampler()
    sampler.counting = True

    def allocate():
        block = bytearray(64 << 20)  # zero-filled: resident
        time.sleep(0.1)
        return len(block)

    time.sleep(0.05)
    sampler.wrap(allocate, "rollout", "between")()
    time.sleep(0.05)
    sampler.counting = False
    assert sampler.phase == "between"
    assert sampler.peaks["rollout"] - sampler.peaks["between"] > 0.04  # GiB
