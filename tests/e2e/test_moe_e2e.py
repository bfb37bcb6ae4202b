"""A mixture-of-experts job end to end: examples/run_opsd.sh on a tiny Qwen3-MoE (shipped tokenizer and
arithmetic data) at EP2, resumed at EP1, exported to HF, the export checked against the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, free_port, torchrun_cmd, worker_env

CONFIG = Path(__file__).parent / "tiny_moe.yaml"


def run_opsd(run: Path, *overrides: str) -> str:
    env = worker_env({"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())})
    proc = subprocess.run(["bash", "examples/run_opsd.sh", "--config", str(CONFIG),
                           "--checkpoint.dir", str(run / "ckpt"), "--logging.dir", str(run / "logs"), *overrides],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return proc.stdout


@pytest.mark.slow  # four launches: ~60 s on an idle 2-core machine, 150 s under load
@pytest.mark.distributed
def test_moe_run_at_ep2_resume_at_ep1_export_to_hf(tmp_path):
    out = run_opsd(tmp_path, "--train.steps", "2")
    assert "started fresh" in out, out[-3000:]
    out = run_opsd(tmp_path, "--train.steps", "3", "--parallel.ep", "1")
    assert "resumed from" in out and "step_0000002" in out, out[-3000:]
    records = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert sorted(train) == [1, 2, 3] and all(r["moe_aux_loss"] > 0 for r in train.values()), train

    # Export the EP1-saved step (weights and config: the shipped tokenizer is no HF one), then compare
    # the export, loaded by transformers, with the checkpoint loaded at EP2 on the same random tokens.
    step, hf = tmp_path / "ckpt" / "step_0000003", tmp_path / "hf"
    proc = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(step),
                           "--out", str(hf), "--no-tokenizer"],
                          cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 4, config
    report = tmp_path / "verify.json"
    proc = subprocess.run(torchrun_cmd("tools/verify_conversion.py", 2, "--hf-dir", hf, "--megatron-dir", step,
                                       "--ep", "2", "--atol", "2e-5", "--json", report),
                          cwd=REPO_ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    result = json.loads(report.read_text())
    assert result["passed"] and result["max_abs_diff"] <= 2e-5, result
