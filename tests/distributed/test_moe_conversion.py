"""HF <-> megatron conversion of mixtures of experts (Qwen3-MoE, Qwen2-MoE with a gated shared expert and
a dense layer, Mixtral), proven against transformers: workers/moe_conversion.py does the checks.

  1. convert (one process): CLI round trip bit-exact, TP1 logits vs HF, a swapped-expert checkpoint;
  2. layouts (4 processes): logits vs HF at EP2, EP4, EP2 x PP2, TP2 x EP2 (ETP2 and ETP1); re-save at
     TP2 x EP2; the verifier passes the good checkpoints and fails the swapped ones at EP2 x PP2;
  3. export-resaved: the re-saved checkpoints export bit-exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_conversion import run_python
from tests.harness import run_torchrun

WORKER = Path(__file__).parent / "workers" / "moe_conversion.py"
FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")
LAYOUTS = ("tp1_pp1_ep2_etp1", "tp1_pp1_ep4_etp1", "tp1_pp2_ep2_etp1", "tp2_pp1_ep2_etp2", "tp2_pp1_ep2_etp1")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("moe_conversion")
    return work, run_python(WORKER, "convert", work).stdout


@pytest.fixture(scope="module")
def layouts(converted) -> str:
    work, _ = converted
    return run_torchrun(WORKER, 4, "layouts", work)


def test_round_trip_bit_exact_and_tp1_logits(converted):
    _, out = converted
    assert "moe convert: all checks passed" in out, out[-5000:]
    for family in FAMILIES:
        assert f"{family:<9} hf->megatron->hf bit-exact" in out, out[-5000:]


def test_expert_parallel_layouts_match_transformers(layouts):
    assert "moe layouts: all checks passed" in layouts, layouts[-5000:]
    for family in FAMILIES:
        for name in LAYOUTS:
            assert f"{family:<9} {name:<16} max|dlogit| vs HF" in layouts, f"{family} {name} did not run"
        assert f"{family:<9} verifier at tp1_pp2_ep2_etp1: passes, swapped expert caught" in layouts


def test_export_after_expert_parallel_save_is_bit_exact(converted, layouts):
    work, _ = converted
    out = run_python(WORKER, "export-resaved", work).stdout
    assert "moe export-resaved: all checks passed" in out, out[-5000:]
