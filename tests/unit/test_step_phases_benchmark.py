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


def test_a_sample_read_while_the_phase_ends_is_not_filed_under_the_next(monkeypatch):
    """The sampler thread reads the RSS, then files it: a rollout's peak read just before the rollout
    returned must not become the next phase's peak (seen under load: the two phases' peaks equal)."""
    sampler = step_phases.PhaseSampler()

    def rss_read_as_the_rollout_returns():
        if sampler.phase == "rollout":
            sampler.phase = "between"  # the main thread leaves the phase during the read
            return 5.0
        return 1.0

    monkeypatch.setattr(step_phases.vs_trl, "_rss_gib", rss_read_as_the_rollout_returns)
    sampler.phase, sampler.counting = "rollout", True
    time.sleep(0.05)
    sampler.counting = False
    time.sleep(0.01)  # the thread's last read
    assert sampler.peaks == {"between": 1.0}
