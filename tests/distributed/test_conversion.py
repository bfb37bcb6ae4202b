"""HF <-> megatron conversion, proven against transformers (the independent reference).

Five launches share one set of tiny HF models (tests/hf_fixtures.py: Llama with llama3 rope scaling and
a sharded safetensors index, Qwen2 with qkv bias, Qwen3 with qk-norm / head_dim != hidden/heads / tied
embeddings, Mistral; plus a bf16 Qwen2):
  1. conversion_single.py convert: CLI conversions both ways, TP1 logits vs HF, bit-exact round trips,
     dtypes, training-checkpoint export, verifier vs deliberately broken mappings;
  2. conversion_layouts.py (4 processes): logits vs HF at TP/PP in {1,2}x{1,2}, TP4, PP2xVPP2;
     re-save at each layout; each layout loads the previous layout's checkpoint (equal logits);
  3. conversion_single.py export-resaved: the checkpoints re-saved at every layout export bit-exact;
  4. tools/verify_conversion.py under torchrun at TP2 x PP2: passes (exit 0);
  5. tools/verify_conversion.py on the k<->v-swapped checkpoint: fails (exit 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, run_torchrun, worker_env

WORKERS = Path(__file__).parent / "workers"
TOOLS = REPO_ROOT / "tools"
LAYOUT_NAMES = ["tp4_pp1", "tp2_pp2", "tp1_pp1", "tp1_pp2", "tp2_pp1", "tp2_pp2_vpp2"]

pytestmark = pytest.mark.distributed


def run_python(script: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO_ROOT, env=worker_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-20000:]}")
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    import torch

    from tests.hf_fixtures import FAMILIES, save_hf_model

    work = tmp_path_factory.mktemp("conversion")
    for family in FAMILIES:
        # llama: many small files + index, so the reader's index path is exercised
        save_hf_model(family, work / "hf" / family, max_shard_size="100KB" if family == "llama" else None)
    save_hf_model("qwen2", work / "hf" / "qwen2_bf16", dtype=torch.bfloat16)
    assert (work / "hf" / "llama" / "model.safetensors.index.json").is_file()
    return work


@pytest.fixture(scope="module")
def converted(workdir) -> tuple[Path, str]:
    return workdir, run_python(WORKERS / "conversion_single.py", "convert", workdir).stdout


@pytest.fixture(scope="module")
def resaved(converted) -> tuple[Path, str]:
    work, _ = converted
    return work, run_torchrun(WORKERS / "conversion_layouts.py", 4, work)


def test_convert_round_trip_logits_and_verifier(converted):
    _, out = converted
    assert "conversion single: all checks passed" in out, out[-5000:]
    for family in ("llama", "qwen2", "qwen3", "mistral"):
        assert f"{family:<8} hf->megatron->hf bit-exact" in out, f"{family} round trip did not run:\n{out}"
    for line in ("auto keeps bf16", "training checkpoint", "verifier good qwen2", "verifier on a training checkpoint",
                 "verifies against bf16-rounded HF weights", "--dtype bf16 warns", "fp32 norms moved",
                 "carries the run's tokenizer",
                 "verifier broken k<->v (import-only; round trip differs): caught",
                 "verifier broken k<->v (symmetric; round trip bit-exact): caught",
                 "longer than the sliding window are refused"):
        assert line in out, f"check {line!r} did not run:\n{out[-5000:]}"


def test_layouts_logits_and_cross_layout_loading(resaved):
    _, out = resaved
    assert "conversion layouts: all checks passed" in out, out[-5000:]
    for family in ("llama", "qwen2", "qwen3", "mistral"):
        for name in LAYOUT_NAMES:
            assert f"{family:<8} {name:<12} max|dlogit| vs HF" in out, f"{family} {name} did not run"
        for written, loaded in zip(LAYOUT_NAMES, LAYOUT_NAMES[1:]):
            assert f"{family:<8} written {written} -> loaded {loaded}: logits equal" in out


def test_export_after_resharded_save_is_bit_exact(resaved):
    work, _ = resaved
    out = run_python(WORKERS / "conversion_single.py", "export-resaved", work).stdout
    assert f"export-resaved: {4 * len(LAYOUT_NAMES)} checkpoints bit-exact" in out, out[-5000:]


def test_verify_tool_passes_at_tp2_pp2(converted, tmp_path):
    work, _ = converted
    report = tmp_path / "verify.json"
    out = run_torchrun(TOOLS / "verify_conversion.py", 4, "--hf-dir", work / "hf" / "qwen3",
                       "--megatron-dir", work / "meg" / "qwen3", "--tp", "2", "--pp", "2", "--atol", "2e-5",
                       "--json", report)
    assert "verify TP=2 PP=2" in out and "PASS" in out, out[-5000:]
    metrics = json.loads(report.read_text())
    assert metrics["passed"] and metrics["max_abs_diff"] <= 2e-5 and metrics["argmax_agreement"] == 1.0


def test_verify_tool_exits_nonzero_on_swapped_kv(converted):
    work, _ = converted
    proc = run_python(TOOLS / "verify_conversion.py", "--hf-dir", work / "hf" / "qwen2", "--megatron-dir",
                      work / "meg" / "broken_import-only", check=False)
    assert proc.returncode == 1, proc.stdout[-5000:]
    assert "FAIL" in proc.stdout, proc.stdout[-5000:]
