"""bf16 training end to end: a run killed after step 2 resumes from its bf16 checkpoint exactly."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_train_e2e import train

BF16 = ("--model_build.dtype", "bf16", "--loss.teacher", "ema")


def train_records(run) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == "train"}


@pytest.mark.distributed
def test_bf16_run_killed_after_a_step_resumes_exactly(tmp_path):
    """bf16 params, fp32 main params and Adam state in the (distributed) optimizer, an EMA teacher kept
    in fp32: all are checkpointed, so steps 3 and 4 after the resume are the uninterrupted run's bit
    for bit (a resume that re-derived the fp32 main weights from the bf16 params, or rounded the EMA
    average, would move the loss in its 3rd-4th significant digit)."""
    _, full = train(tmp_path, 2, *BF16, name="full")
    _, run = train(tmp_path, 2, *BF16, fault="after_step:2", expect_rc=17, name="killed")
    assert sorted(train_records(run)) == [1, 2]
    out, run = train(tmp_path, 2, *BF16, name="killed")
    assert "resumed from" in out and "step_0000002" in out, out[-3000:]
    want, got = train_records(full), train_records(run)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "divergence"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    assert want[4]["loss"] != want[3]["loss"]  # the steps train: the comparison is not of constants
