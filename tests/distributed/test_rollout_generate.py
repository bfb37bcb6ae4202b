"""tools/generate.py on a converted checkpoint (TP2) and on a training checkpoint (PP2), vs HF.

One subprocess writes the checkpoints (HF tiny llama -> tools/convert_hf_to_megatron -> also saved as a
training checkpoint); two 2-process launches of tools/generate.py follow. References: HF greedy
``generate`` on each rendered prompt alone, and HF's forward for the reported model log-probs (1e-5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import REPO_ROOT, run_torchrun, worker_env

WORKERS = Path(__file__).parent / "workers"
TEXT_PROMPTS = ["What is 2+3?", "Name a prime number larger than 10.", "Hi"]
ID_PROMPTS = [[5, 17, 42, 9, 33], [120]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    dirs = root / "hf", root / "converted", root / "training"
    proc = subprocess.run([sys.executable, str(WORKERS / "rollout_checkpoints.py"), *map(str, dirs)], cwd=REPO_ROOT,
                          env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0 and "checkpoints written" in proc.stdout, proc.stdout[-5000:]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "id": f"text{i}"}) + "\n" for i, t in enumerate(TEXT_PROMPTS))
                       + "".join(json.dumps({"prompt_ids": p}) + "\n" for p in ID_PROMPTS))
    return (*dirs, prompts)


def generate(*args: str) -> list[dict]:
    out_file = Path(args[args.index("--out") + 1])
    run_torchrun(REPO_ROOT / "tools" / "generate.py", 2, *args)
    return [json.loads(line) for line in out_file.read_text().splitlines()]


@pytest.mark.distributed
def test_generate_greedy_tp2_converted_checkpoint_equals_hf(checkpoints, tmp_path):
    from megatron_opsd.data.tokenizer import load_tokenizer
    from tests.distributed.workers.rollout_common import hf_greedy
    from tests.hf_fixtures import load_hf_model

    hf_dir, converted, _, prompts = checkpoints
    rows = generate("--load", str(converted), "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
                    "--greedy", "--max-new-tokens", "10", "--tp", "2")
    tokenizer, hf = load_tokenizer(converted), load_hf_model(hf_dir)
    assert [r["index"] for r in rows] == list(range(len(TEXT_PROMPTS) + len(ID_PROMPTS)))
    expected_prompts = [tokenizer.render_prompt(t, enable_thinking=False) for t in TEXT_PROMPTS] + ID_PROMPTS
    for row, prompt in zip(rows, expected_prompts):
        assert row["prompt_ids"] == prompt
        assert row["response_ids"] == hf_greedy(hf, prompt, 10, tuple(sorted(tokenizer.stop_ids)))
        assert row["response"] == tokenizer.decode(row["response_ids"])
        assert row["logprobs"] == [0.0] * len(row["response_ids"])
        assert row["finish_reason"] == ("stop" if row["response_ids"][-1] in tokenizer.stop_ids else "length")
    assert rows[0]["id"] == "text0" and rows[0]["prompt"] == TEXT_PROMPTS[0]


@pytest.mark.distributed
def test_generate_sampled_pp2_training_checkpoint(checkpoints, tmp_path):
    from tests.distributed.workers.rollout_common import hf_token_logprobs
    from tests.hf_fixtures import load_hf_model

    hf_dir, _, training_root, prompts = checkpoints
    rows = generate("--load", str(training_root), "--tokenizer", str(hf_dir), "--prompts", str(prompts),
                    "--out", str(tmp_path / "out.jsonl"), "--temperature", "1.1", "--top-p", "0.95", "--top-k",
                    "20", "--max-new-tokens", "8", "--pp", "2", "--num-samples", "2", "--seed", "3")
    hf = load_hf_model(hf_dir)
    assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(5) for s in range(2)]
    for row in rows:
        ids = row["response_ids"]
        assert 0 < len(ids) <= 8 and len(row["logprobs"]) == len(row["model_logprobs"]) == len(ids)
        torch.testing.assert_close(torch.tensor(row["model_logprobs"], dtype=torch.float64),
                                   hf_token_logprobs(hf, row["prompt_ids"], ids), atol=1e-5, rtol=0)
        assert all(lp <= 1e-6 for lp in row["logprobs"])
    assert any(a["response_ids"] != b["response_ids"] for a, b in zip(rows[::2], rows[1::2]))
