"""A LoRA run end to end, as a user runs it: an HF base converted, OPSD with adapters and the theta_0
teacher by adapter switch-off at TP2, a crash and a resume, exports (merged and PEFT adapter) checked
against ``peft`` on the HF base, and a base that changed under the run refused."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.test_train_e2e import train, train_losses
from tests.harness import REPO_ROOT, worker_env

peft = pytest.importorskip("peft")


def _tree_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=worker_env(), capture_output=True,
                          text=True, timeout=300)


def _base_and_lora_options(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A tiny HF Llama converted as a user would: (HF dir, megatron base, the LoRA run's options)."""
    from tests.hf_fixtures import save_hf_model

    hf = save_hf_model("llama", tmp_path / "hf", tokenizer=False, vocab_size=448)  # the arithmetic tokenizer's
    converted = _tool("tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "base")
    assert converted.returncode == 0, converted.stderr[-3000:]
    base = tmp_path / "base"
    return hf, base, ["--train.load", str(base), "--lora.rank", "4", "--lora.alpha", "8", "--train.steps", "3",
                      "--optim.lr", "1e-2", "--checkpoint.keep_last", "0"]


def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    proc = _tool("tools/convert_megatron_to_hf.py", "--megatron-dir", ckpt, "--out", out, "--no-tokenizer",
                 "--dtype", "fp32", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.distributed
def test_lora_run_resume_and_export(tmp_path):
    from tests.hf_fixtures import load_hf_model

    hf, base, lora = _base_and_lora_options(tmp_path)
    base_hash = _tree_hash(base)

    out, full = train(tmp_path, 2, *lora, name="full")
    losses = train_losses(full)
    assert sorted(losses) == [1, 2, 3], out[-3000:]
    # the checkpoint holds the adapters (and their optimizer state), not a copy of the base
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(full / "ckpt" / "step_0000003")).read_metadata().state_dict_metadata)
    assert any(k.endswith("linear_qkv_lora.q_proj_A") for k in keys), sorted(keys)[:10]
    assert not any(k.endswith(("linear_qkv.weight", "word_embeddings.weight")) for k in keys), sorted(keys)[:10]

    # killed after step 2, the same command resumes and reproduces step 3
    train(tmp_path, 2, *lora, fault="after_step:2", expect_rc=17, name="crash")
    out, run = train(tmp_path, 2, *lora, name="crash")
    assert "resumed from" in out and "step_0000002" in out, out[-3000:]
    assert train_losses(run)[3] == pytest.approx(losses[3], rel=1e-6, abs=1e-9)
    assert _tree_hash(base) == base_hash, "the base (an input) was modified"

    # exports: merged (W + s B A over the recorded base) and the adapters as a PEFT directory
    _export(full / "ckpt", tmp_path / "merged")
    _export(full / "ckpt", tmp_path / "adapter", "--adapter-only")
    reference = peft.PeftModel.from_pretrained(load_hf_model(hf), tmp_path / "adapter").merge_and_unload()
    merged = load_hf_model(tmp_path / "merged")
    tokens = torch.randint(0, 448, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs, plain = merged(tokens).logits, reference(tokens).logits, load_hf_model(hf)(tokens).logits
    assert (theirs - plain).abs().max() > 1e-4, "training did not move the adapters: the check is void"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(base.resolve())

    # the base changed under the run (re-written): resuming refuses, naming both
    (base / "model.json").write_text(json.dumps(json.loads((base / "model.json").read_text()), indent=4))
    proc = _tool("-m", "megatron_opsd.train", "--config", REPO_ROOT / "tests" / "e2e" / "tiny.yaml",
                 "--parallel.tp", "1", *lora[:-4], "--train.steps", "5", "--checkpoint.dir", full / "ckpt",
                 "--logging.dir", tmp_path / "logs2")
    assert proc.returncode == 2 and "trained on the base" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow  # ~38 s: the same path in one process is tests/unit/test_lora.py::test_init_from_adapter_exports_bit_identical
@pytest.mark.distributed
def test_lora_init_from_an_exported_adapter_round_trips_through_the_trainer_at_tp2(tmp_path):
    """A LoRA run's PEFT adapter export, given back as ``lora.init_from`` to a TP2 run whose one step is too
    small to move any fp32 weight (lr 1e-30), exports again to the same tensors bit for bit (import,
    sharding at TP2, checkpoint and export paths)."""
    from safetensors.torch import load_file

    _, _, lora = _base_and_lora_options(tmp_path)
    lora = [*lora[:6], "--train.steps", "1", "--checkpoint.keep_last", "0"]
    _, first_run = train(tmp_path, 2, *lora, "--optim.lr", "1e-2", name="first")
    first = _export(first_run / "ckpt", tmp_path / "adapter", "--adapter-only")
    _, again = train(tmp_path, 2, *lora, "--lora.init_from", str(first), "--optim.lr", "1e-30", name="again")
    second = _export(again / "ckpt", tmp_path / "adapter2", "--adapter-only")
    a, b = (load_file(d / "adapter_model.safetensors") for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k), "B is still zero: the check is void"
