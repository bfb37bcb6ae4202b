"""GRPO through the trainer (one process; one case at DP2: run under the shared lock): a short run (2 rollouts x 2 updates, KL to theta_0) logs its metrics and
saves; a reward function that raises or returns NaN stops the run (exit 3) naming the problem, before
any checkpoint; n=1 and an unloadable reward function are refused with one line (exit 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, worker_env

CONFIG = Path(__file__).parent / "tiny.yaml"
GRPO = ["--loss.mode", "grpo", "--rollout.samples_per_prompt", "2", "--logging.tensorboard", "false"]


def train(tmp_path, *overrides, timeout=300):
    cmd = [sys.executable, "-m", "megatron_opsd.train", "--config", str(CONFIG), "--parallel.tp", "1",
           "--checkpoint.dir", str(tmp_path / "ck"), "--logging.dir", str(tmp_path / "logs"), *GRPO, *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout)


def test_grpo_run_logs_reward_metrics_and_saves(tmp_path):
    proc = train(tmp_path, "--train.steps", "2", "--train.updates_per_rollout", "2", "--loss.kl_coef", "0.05",
                 "--loss.reward", "tests.e2e.grpo_rewards:length")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        for key in ("reward_mean", "reward_std", "accuracy", "advantage_mean", "advantage_std", "ratio_clip_fraction",
                    "kl", "response_length", "generated_tokens", "zero_advantage_groups", "groups"):
            assert key in row, (key, row)
        assert row["groups"] == 4 and row["generated_tokens"] > 0 and row["reward_std"] > 0
        assert abs(row["advantage_mean"]) < 1e-9
    # the logged metrics are the second update's: the policy has moved from theta_0 and from the rollout
    assert train_rows[0]["kl"] > 0
    assert (tmp_path / "ck" / "step_0000002").is_dir()


@pytest.mark.parametrize("reward,what", [("boom", r"raised on problem \S+:\d+: KeyError"),
                                         pytest.param("nan", r"returned nan on problem \S+:\d+",
                                                      marks=pytest.mark.slow)])
def test_failing_reward_function_stops_the_run_naming_the_problem(tmp_path, reward, what):
    proc = train(tmp_path, "--train.steps", "1", "--loss.reward", f"tests.e2e.grpo_rewards:{reward}")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]

    line = next(x for x in proc.stderr.splitlines() if x.startswith("megatron_opsd.train: stopped"))
    assert re.search(f"step 1: the reward function {what}", line), line
    assert not list((tmp_path / "ck").glob("step_*"))


@pytest.mark.parametrize("overrides,what", [
    (["--rollout.samples_per_prompt", "1"], "needs rollout.samples_per_prompt >= 2"),
    (["--loss.reward", "tests.e2e.grpo_rewards:missing"], "loss.reward='tests.e2e.grpo_rewards:missing'"),
    (["--loss.reward", "no_such_module_xyz:f"], "cannot import"),
])
def test_refused_configs_one_line(tmp_path, overrides, what):
    proc = train(tmp_path, "--validate-only", *overrides, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "Warning" not in x and "warn" not in x]
    assert len(lines) == 1 and what in lines[0], proc.stderr


@pytest.mark.slow
def test_lora_grpo_with_kl_to_the_adapters_off_model(tmp_path):
    """theta_0 for the KL is the base with the adapters switched off (no copy of the weights)."""
    proc = train(tmp_path, "--train.steps", "1", "--train.updates_per_rollout", "2", "--loss.kl_coef", "0.05",
                 "--loss.reward", "tests.e2e.grpo_rewards:length", "--lora.rank", "4", "--lora.alpha", "8",
                 "--optim.lr", "1e-2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = next(json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
               if '"train"' in x)
    assert row["kl"] > 0, row  # the second update: adapters moved away from theta_0


@pytest.mark.distributed
def test_reward_failure_on_one_rank_stops_every_rank(tmp_path):
    from tests.harness import free_port, worker_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m",
           "megatron_opsd.train", "--config", str(CONFIG), "--parallel.tp", "1", "--checkpoint.dir",
           str(tmp_path / "ck"), "--logging.dir", str(tmp_path / "logs"), *GRPO, "--train.steps", "1",
           "--loss.reward", "tests.e2e.grpo_rewards:boom_on_rank_1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "raised on problem" in out and "RuntimeError: grader crashed" in out, out[-3000:]
    assert "failed on another rank" in out, out[-3000:]  # rank 0 stopped as well (no hang)
    assert not list((tmp_path / "ck").glob("step_*"))


def test_sft_mode_trains_on_the_reference_solutions(tmp_path):
    """loss.mode=sft in the loop: cross-entropy on the reference solutions, nothing generated (it used
    to crash at start-up, and would have trained on the model's own samples)."""
    cmd = [sys.executable, "-m", "megatron_opsd.train", "--config", str(CONFIG), "--parallel.tp", "1",
           "--checkpoint.dir", str(tmp_path / "ck"), "--logging.dir", str(tmp_path / "logs"), "--loss.mode", "sft",
           "--train.steps", "1", "--logging.tensorboard", "false", "--data.overlong", "truncate_response"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = next(json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
               if '"train"' in x)
    assert row["generated_tokens"] == 0
    assert row["response_length"] > 12  # solutions, not samples (rollout.max_new_tokens is 12)
    assert row["loss"] > 1.0  # cross-entropy of a random model on 448 ids: ~ln(448)
