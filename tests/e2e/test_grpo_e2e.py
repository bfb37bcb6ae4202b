"""GRPO through the trainer: a short run (2 rollouts x 2 updates, KL to theta_0) logs its metrics and
saves; a reward function that raises or returns NaN stops the run (exit 3) naming the problem, before
any checkpoint; n=1 and an unloadable reward function are refused with one line (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_bad_inputs import single_env
from tests.harness import REPO_ROOT

CONFIG = Path(__file__).parent / "tiny.yaml"
GRPO = ["--loss.mode", "grpo", "--rollout.samples_per_prompt", "2", "--logging.tensorboard", "false"]


def train(tmp_path, *overrides, timeout=300):
    cmd = [sys.executable, "-m", "megatron_opsd.train", "--config", str(CONFIG), "--parallel.tp", "1",
           "--checkpoint.dir", str(tmp_path / "ck"), "--logging.dir", str(tmp_path / "logs"), *GRPO, *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=single_env(), capture_output=True, text=True, timeout=timeout)


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
                                         ("nan", r"returned nan on problem \S+:\d+")])
def test_failing_reward_function_stops_the_run_naming_the_problem(tmp_path, reward, what):
    proc = train(tmp_path, "--train.steps", "1", "--loss.reward", f"tests.e2e.grpo_rewards:{reward}")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    import re

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
