"""Checks that need one CUDA GPU (skipped without one). Run them all with tests/gpu/run_gpu_checks.sh.

What they add to the CPU suite (which guards the same code with CUDA mocked): a real NCCL process
group with CPU bookkeeping tensors, CUDA kernels' dtype/shape rules, and the device placement of every
tensor the trainer, the verifier and the rollout make.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.harness import REPO_ROOT, free_port, worker_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = REPO_ROOT / "tests" / "e2e" / "tiny.yaml"


def _run(*cmd: str, timeout: float = 300) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, env=worker_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *args]


def test_train_evaluate_save_resume_on_cuda(tmp_path):
    """Crash 1 (CPU tensors into NCCL collectives: evaluation totals run before step 1, metric sums,
    response lengths, the stop flag), bf16 EMA teacher and a checkpoint saved and resumed on CUDA."""
    common = ["--config", TINY, "--parallel.tp", "1", "--model_build.dtype", "bf16", "--loss.teacher", "ema",
              "--checkpoint.dir", tmp_path / "ckpt", "--logging.dir", tmp_path / "logs", "--logging.tensorboard",
              "false"]
    _run(*_torchrun("-m", "megatron_opsd.train", *common, "--train.steps", "2"))
    _run(*_torchrun("-m", "megatron_opsd.train", *common, "--train.steps", "3", "--checkpoint.resume", "true"))
    records = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = sorted(r["step"] for r in records if r["kind"] == "train")
    assert steps == [1, 2, 3], steps
    assert all(r["loss"] == r["loss"] for r in records if r["kind"] == "train")  # finite


def test_fp16_training_step_on_cuda(tmp_path):
    """Item 6 on real fp16 kernels: the run trains (loss scale applied, overflowing steps skipped)."""
    _run(*_torchrun("-m", "megatron_opsd.train", "--config", TINY, "--parallel.tp", "1", "--model_build.dtype",
                    "fp16", "--train.steps", "3", "--checkpoint.dir", tmp_path / "ckpt", "--logging.tensorboard", "false",
                    "--logging.dir", tmp_path / "logs"))
    records = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3 and all("loss_scale" in r for r in train), train


def test_convert_and_verify_on_cuda(tmp_path):
    """Conversion + verify round trip with the model on CUDA (verify's token ids and HF reference on CPU)."""
    from tests.hf_fixtures import save_hf_model

    hf = save_hf_model("qwen3", tmp_path / "hf")  # q/k norms (TE's extra-state norms on a TE machine)
    _run(sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out", tmp_path / "mg")
    out = _run(*_torchrun("tools/verify_conversion.py", "--hf-dir", hf, "--megatron-dir", tmp_path / "mg"))
    assert "PASS" in out, out[-3000:]
    _run(sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", tmp_path / "mg", "--out",
         tmp_path / "back", "--dtype", "fp32")
    out = _run(*_torchrun("tools/verify_conversion.py", "--hf-dir", tmp_path / "back", "--megatron-dir",
                          tmp_path / "mg"))
    assert "PASS" in out, out[-3000:]


@pytest.mark.parametrize("length", [20, 64, 256])
def test_bf16_forward_at_fused_softmax_lengths(length):
    """Item 3: lengths in (16, 4096] and multiples of 4 are where megatron imports Apex's
    scaled_masked_softmax_cuda when masked_softmax_fusion is on."""
    from megatron_opsd.models.description import ModelConfig
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    runtime = init_parallel(ParallelConfig(), seed=0)
    try:
        cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512)
        model = build_model(cfg, runtime, ModelBuildConfig(dtype="bf16", transformer_engine="off"))[0]
        tokens = torch.randint(0, 128, (4, length), device="cuda")
        positions = torch.arange(length, device="cuda").expand(4, length)
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool, device="cuda"), 1)[None, None]
        with torch.no_grad():
            logits = model(tokens, positions, mask.expand(4, 1, length, length))
        assert torch.isfinite(logits.float()).all()
    finally:
        runtime.destroy()


def test_rollout_attention_operands_run_on_a_fused_kernel():
    """Item 9: with a mask and GQA the prefill must run on a fused SDPA kernel, not the math one."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_opsd.rollout.attention import sdpa_operands

    s, b, heads, groups, d = 512, 2, 16, 4, 64
    q, k, v = (torch.randn(s, b, n, d, device="cuda", dtype=torch.bfloat16) for n in (heads, groups, groups))
    keep = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()[None, None].expand(b, 1, s, s)
    *ops, gqa = sdpa_operands(q, k, v, on_cuda=True)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        fused = F.scaled_dot_product_attention(*ops, attn_mask=keep, enable_gqa=gqa)
    with sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(*ops, attn_mask=keep, enable_gqa=gqa)
    torch.testing.assert_close(fused.float(), reference.float(), atol=2e-2, rtol=2e-2)


def test_packing_on_off_on_cuda():
    """Packed vs padded micro-batches and token-budget vs fixed ones, on CUDA: loss and every gradient
    within 1e-6 (tests/unit/test_packing.py). Local layer spec only: the THD path of Transformer Engine
    attention (PackedSeqParams) is not covered by this check."""
    out = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_packing.py",
               "-k", "equal")
    assert " passed" in out and "failed" not in out and "skipped" not in out, out[-3000:]
