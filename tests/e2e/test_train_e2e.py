"""The OPSD job end to end: torchrun launches of megatron_opsd.train on a seconds-long config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, free_port, worker_env

CONFIG = Path(__file__).parent / "tiny.yaml"


def train(tmp: Path, nprocs: int, *overrides: str, fault: str | None = None, expect_rc: int = 0,
          name: str = "run", entry: tuple[str, ...] = ("-m", "megatron_opsd.train")) -> tuple[str, Path]:
    run = tmp / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nprocs}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *entry,
           "--config", str(CONFIG), "--checkpoint.dir", str(run / "ckpt"), "--logging.dir", str(run / "logs"),
           *overrides]
    env = {"MEGATRON_OPSD_FAULT": fault} if fault else None
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=worker_env(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    if expect_rc == 0:
        assert proc.returncode == 0, proc.stdout[-8000:]
    else:  # torchrun reports a failed child with its own non-zero code
        assert proc.returncode != 0 and "injected fault" in proc.stdout, proc.stdout[-8000:]
    return proc.stdout, run


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.distributed
def test_tp2_run_then_crash_mid_save_and_resume_reproduces_the_curve(tmp_path):
    out, full = train(tmp_path, 2, "--train.eval_teacher_context", "true", name="full")
    losses = train_losses(full)
    assert sorted(losses) == [1, 2, 3, 4], out[-3000:]
    records = [json.loads(x) for x in (full / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 4] and all(0 <= e["accuracy"] <= 1 for e in evals)
    # eval_teacher_context: before training, the same problems decoded from the teacher's prompt too
    [teacher_eval] = [r for r in records if r["kind"] == "eval_teacher_context"]
    assert teacher_eval["step"] == 0 and teacher_eval["problems"] == evals[0]["problems"]
    assert f"before, from the teacher's prompt: {teacher_eval['accuracy']:.3f}" in out, out[-3000:]
    teacher_rows = [json.loads(x) for x in (full / "logs" / "eval_teacher_context_step_0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in teacher_rows] == list(range(evals[0]["problems"]))
    # The closing lines say what the evaluations measured, and where their responses are.
    before, after = (e["accuracy"] for e in evals)
    assert (f"held-out accuracy on {evals[0]['problems']} problems: {before:.3f} before OPSD -> {after:.3f} "
            f"after 4 steps ({after - before:+.3f})") in out, out[-3000:]
    assert f"{full / 'logs' / 'eval_step_4.jsonl'} (after)" in out
    train_rec = next(r for r in records if r["kind"] == "train")
    for key in ("loss", "divergence", "clip_fraction", "entropy_student", "entropy_teacher", "response_tokens",
                "tokens_per_s", "peak_memory_mib", "grad_norm", "response_length", "teacher_advantage",
                "teacher_logprob_ref", "student_logprob_ref", "leakage_rate"):
        assert key in train_rec, key
    assert 0 <= train_rec["leakage_rate"] <= 1 and train_rec["teacher_logprob_ref"] < 0
    assert (full / "logs" / "tensorboard").is_dir()
    assert (full / "ckpt" / "latest").read_text().strip() == "step_0000004"

    # A crash while writing step 2 leaves step 1 as the latest, loadable checkpoint...
    _, run = train(tmp_path, 2, fault="mid_save:step_0000002", expect_rc=17, name="crash")
    assert (run / "ckpt" / "latest").read_text().strip() == "step_0000001"
    [partial] = (run / "ckpt").glob(".step_0000002.tmp-*")  # the interrupted save's own staging directory
    assert partial.is_dir() and not (run / "ckpt" / "step_0000002").exists()
    # ... and resuming from it gives the uninterrupted run's losses for the remaining steps.
    out, run = train(tmp_path, 2, name="crash")
    assert "resumed from" in out and "step_0000001" in out, out[-3000:]
    assert "held-out accuracy on" in out and "after 4 steps of OPSD:" in out, out[-3000:]  # no "before" of its own
    resumed = train_losses(run)
    for step in (2, 3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6, abs=1e-9), (step, resumed, losses)


@pytest.mark.slow  # ~25 s; the default suite resumes through the CLI at TP2 (crash mid-save) and in bf16 (killed
# after a step), and loads PP2 checkpoints across layouts in tests/distributed/test_conversion.py
@pytest.mark.distributed
def test_pp2_run_and_kill_after_step(tmp_path):
    out, run = train(tmp_path, 2, "--parallel.tp", "1", "--parallel.pp", "2", "--train.steps", "3",
                     fault="after_step:2", expect_rc=17)
    assert sorted(train_losses(run)) == [1, 2]
    out, run = train(tmp_path, 2, "--parallel.tp", "1", "--parallel.pp", "2", "--train.steps", "3")
    assert "resumed from" in out and sorted(train_losses(run))[-1] == 3, out[-3000:]


def run_single(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = worker_env()
    return subprocess.run(
        [sys.executable, "-m", "megatron_opsd.train", "--config", str(CONFIG), "--parallel.tp", "1",
         "--checkpoint.dir", str(tmp / "ckpt"), "--logging.dir", str(tmp / "logs"), *overrides],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["bad_row", "missing_file", "bad_config", "vocab_mismatch", "bad_field"])
def test_bad_input_exits_nonzero_with_message_and_writes_nothing(tmp_path, case):
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1?", "solution": "\\\\boxed{2}"}\n{"problem": "2+2?", "solution": \n')
    overrides, pattern = {
        "bad_row": (["--data.train_path", str(data)], f"{data}:2"),
        "missing_file": (["--data.train_path", str(tmp_path / "nope.jsonl")], "nope.jsonl"),
        "bad_config": (["--parallel.tp", "3"], "num_attention_heads=4 is not divisible by parallel.tp=3"),
        "vocab_mismatch": (["--model.vocab_size", "300"], "300"),
        "bad_field": (["--train.stepz", "3"], "train.stepz: unknown config key"),
    }[case]
    proc = run_single(tmp_path, *overrides)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "megatron_opsd.train: error:" in proc.stderr and pattern in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


@pytest.mark.distributed
def test_two_nodes_on_localhost(tmp_path):
    """Two torchrun invocations (one process each) rendezvous on 127.0.0.1 and train at TP=2."""
    port = free_port()
    run = tmp_path / "two_nodes"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               "-m", "megatron_opsd.train", "--config", str(CONFIG), "--train.steps", "2",
               "--checkpoint.dir", str(run / "ckpt"), "--logging.dir", str(run / "logs")]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=worker_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert sorted(train_losses(run)) == [1, 2]


def test_sigterm_saves_before_exit(tmp_path):
    """A single-process run receiving SIGTERM finishes its step, saves and exits 0."""
    import signal
    import time

    env = worker_env()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_opsd.train", "--config", str(CONFIG), "--parallel.tp", "1",
         "--train.steps", "1000", "--checkpoint.save_every", "0", "--checkpoint.dir", str(tmp_path / "ckpt"),
         "--logging.dir", str(tmp_path / "logs")], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by signal" in out
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert int(latest.removeprefix("step_")) >= 1


@pytest.mark.distributed
def test_exported_hf_model_gives_the_checkpoints_greedy_output(tmp_path):
    """Train 2 steps at TP=2, export the training checkpoint to HF, and compare greedy decoding:
    transformers on the export vs our engine on the megatron checkpoint (TP=2)."""
    import torch
    import transformers

    _, run = train(tmp_path, 2, "--train.steps", "2", "--checkpoint.save_every", "0")
    hf_dir = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(run / "ckpt"),
                           "--out", str(hf_dir), "--no-tokenizer"], cwd=REPO_ROOT, env=worker_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    prompts = [[5, 17, 42, 99, 3, 250], [7, 300, 12]]
    max_new = 10
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={port}", "tools/generate.py", "--load", str(run / "ckpt"), "--prompts",
         str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--greedy", "--tp", "2",
         "--max-new-tokens", str(max_new), "--stop-ids"], cwd=REPO_ROOT, env=worker_env(),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = [json.loads(line)["response_ids"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    for prompt, response in zip(prompts, ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == response, (prompt, response, out)


@pytest.mark.slow  # ~27 s; the default suite checks the step with SP and token budgets at every layout
# (tests/distributed/test_opsd_step.py) and decoding with training's SP on (tests/distributed/test_rollout.py)
@pytest.mark.distributed
def test_sequence_parallel_with_token_budget_batching_trains_like_plain_tp2(tmp_path):
    """TP2 with sequence parallelism (rollout and evaluation decode with it off) and packed token-budget
    micro-batches: the first step (same rollouts: same start weights) has plain TP2's loss."""
    common = ("--train.steps", "1", "--logging.tensorboard", "false", "--checkpoint.save_every", "0")
    out, plain = train(tmp_path, 2, *common, name="plain")
    out_sp, sp = train(tmp_path, 2, *common, "--parallel.sequence_parallel", "true",
                       "--train.max_tokens_per_micro_batch", "200", name="sp")
    a, b = train_losses(plain)[1], train_losses(sp)[1]
    assert abs(a - b) <= 1e-5 * abs(a) + 1e-6, (a, b, out_sp[-3000:])


@pytest.mark.distributed
@pytest.mark.slow
def test_context_parallel_trains_like_plain_tp2(tmp_path):
    """TP2 x CP2 (the test-only all-gather attention: this machine has no Transformer Engine) against plain
    TP2, DP2 over the same 4 processes: the same rollouts (CP ranks share CP rank 0's), the same first
    two steps' losses; evaluation decodes without CP."""
    common = ("--train.steps", "2", "--logging.tensorboard", "false", "--checkpoint.save_every", "0")
    out, plain = train(tmp_path, 4, *common, name="plain")
    out_cp, cp = train(tmp_path, 4, *common, "--parallel.cp", "2", name="cp",
                       entry=(str(Path(__file__).parent / "cp_train.py"),))
    a, b = train_losses(plain), train_losses(cp)
    assert sorted(a) == sorted(b) == [1, 2], (a, b, out_cp[-3000:])
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]) + 1e-6, (step, a, b, out_cp[-3000:])
