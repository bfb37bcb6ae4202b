"""Bad inputs to the tools (gguf_to_hf, both conversions, verify, generate): each is refused with exit
code 2 and ONE line that names the file (and line) or the option, and no input is modified.

Fast: the tools' ``main`` functions run in this process through ``cli.run`` (the same wrapper the
``tools/*.py`` scripts call: exit code and the stderr line are what a user gets); a few cases run the
scripts themselves as subprocesses, without PYTHONWARNINGS, so the first line a user sees is checked
too. Every input lives under one module directory that is hashed before and after each case.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, worker_env

TOOLS = REPO_ROOT / "tools"


def tree_hash(root: Path) -> str:
    """A hash of every file's relative path and bytes (and of every directory's name) under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Inputs shared by every case: a tiny HF model with a fitting tokenizer, its conversion, one
    without tokenizer, two wrong tokenizers, broken configs, bad prompt files and a non-Llama GGUF."""
    import gguf

    from megatron_opsd.data.tokenizer import load_tokenizer
    from tests.fixtures_tokenizers import build_qwen3_style_tokenizer
    from tests.hf_fixtures import save_hf_model

    root = tmp_path_factory.mktemp("bad_inputs")
    vocab = load_tokenizer(build_qwen3_style_tokenizer(root / "tok")).vocab_size
    save_hf_model("qwen2", root / "hf", vocab_size=vocab)          # the model fits its tokenizer
    save_hf_model("qwen2", root / "hf_notok", vocab_size=vocab, tokenizer=False)
    for hf, meg in (("hf", "meg"), ("hf_notok", "meg_notok")):
        proc = subprocess.run([sys.executable, str(TOOLS / "convert_hf_to_megatron.py"), "--hf-dir", str(root / hf),
                               "--out", str(root / meg)], cwd=REPO_ROOT, env=worker_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.rmtree(root / "tok")
    build_qwen3_style_tokenizer(root / "tok_small", vocab_size=300)  # another size
    swapped = root / "tok_swapped"                                   # same size, two ids swapped
    shutil.copytree(root / "hf", swapped, ignore=shutil.ignore_patterns("*.safetensors", "config.json",
                                                                      "generation_config.json"))
    spec = json.loads((swapped / "tokenizer.json").read_text())
    a, b = "a", "b"
    spec["model"]["vocab"][a], spec["model"]["vocab"][b] = spec["model"]["vocab"][b], spec["model"]["vocab"][a]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))

    for name, text in {"broken": "{bad json", "array": "[1, 2]", "gpt2": '{"model_type": "gpt2"}'}.items():
        (root / f"config_{name}").mkdir()
        (root / f"config_{name}" / "config.json").write_text(text)
    (root / "config_latin1").mkdir()
    (root / "config_latin1" / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')
    (root / "no_config").mkdir()
    (root / "empty").mkdir()

    good = json.dumps({"prompt": "What is 2+3?"})
    prompts = {
        "bad_json_line3": f"{good}\n\n{{\"prompt\": oops}}\n",
        # U+2028 inside a JSON string: str.splitlines() would split the line and misnumber the rest
        "separator": json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n{broken\n",
        "not_object": "[1, 2, 3]\n",
        "ids_out_of_vocab": json.dumps({"prompt_ids": [3, 100000]}) + "\n",
        "ids_not_ints": json.dumps({"prompt_ids": ["3", 4]}) + "\n",
        "no_prompt": json.dumps({"text": "hi"}) + "\n",
        "good": good + "\n",
    }
    (root / "prompts").mkdir()
    for name, text in prompts.items():
        (root / "prompts" / f"{name}.jsonl").write_text(text, encoding="utf-8")
    (root / "prompts" / "latin1.jsonl").write_bytes(good.encode() + b'\n{"prompt": "caf\xe9"}\n')

    writer = gguf.GGUFWriter(str(root / "gpt2.gguf"), "gpt2")  # a valid GGUF of an unsupported family
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return root


@dataclass(frozen=True)
class Case:
    tool: str            # gguf_to_hf | hf_to_megatron | megatron_to_hf | verify | generate
    args: tuple          # "{R}" is the inputs directory, "{T}" this case's own temporary directory
    expected: str        # in the one line, after "error: "


CASES = {
    "gguf_missing": Case("gguf_to_hf", ("--gguf", "{R}/none.gguf", "--out", "{T}/out"), "--gguf {R}/none.gguf: no such file"),
    "gguf_not_gguf": Case("gguf_to_hf", ("--gguf", "{R}/hf/config.json", "--out", "{T}/out"), "not a readable GGUF file"),
    "gguf_unsupported_arch": Case("gguf_to_hf", ("--gguf", "{R}/gpt2.gguf", "--out", "{T}/out"),
                                  "architecture 'gpt2' is not supported"),
    "gguf_out_is_input_dir": Case("gguf_to_hf", ("--gguf", "{R}/gpt2.gguf", "--out", "{R}/hf"),
                                  "output {R}/hf exists and is not empty"),
    "gguf_max_shard_size": Case("gguf_to_hf", ("--gguf", "{R}/gpt2.gguf", "--out", "{T}/out", "--max-shard-size", "lots"),
                                "--max-shard-size 'lots'"),
    "hf_config_broken_json": Case("hf_to_megatron", ("--hf-dir", "{R}/config_broken", "--out", "{T}/out"),
                                  "{R}/config_broken/config.json: not valid JSON"),
    "hf_config_not_object": Case("hf_to_megatron", ("--hf-dir", "{R}/config_array", "--out", "{T}/out"),
                                 "{R}/config_array/config.json: expected a JSON object"),
    "hf_config_not_utf8": Case("hf_to_megatron", ("--hf-dir", "{R}/config_latin1", "--out", "{T}/out"),
                               "{R}/config_latin1/config.json: not valid JSON"),
    "hf_config_missing": Case("hf_to_megatron", ("--hf-dir", "{R}/no_config", "--out", "{T}/out"),
                              "{R}/no_config/config.json does not exist"),
    "hf_unsupported_family": Case("hf_to_megatron", ("--hf-dir", "{R}/config_gpt2", "--out", "{T}/out"),
                                  "{R}/config_gpt2/config.json: model_type='gpt2' is not supported"),
    "hf_out_is_input_dir": Case("hf_to_megatron", ("--hf-dir", "{R}/hf", "--out", "{R}/hf"),
                                "output {R}/hf exists and is not empty"),
    "export_max_shard_size": Case("megatron_to_hf", ("--megatron-dir", "{R}/meg", "--out", "{T}/out",
                                                     "--max-shard-size", "lots"), "--max-shard-size 'lots'"),
    "export_not_a_checkpoint": Case("megatron_to_hf", ("--megatron-dir", "{R}/hf", "--out", "{T}/out"),
                                    "--megatron-dir: {R}/hf is an HF model directory: convert it first"),
    "export_no_tokenizer": Case("megatron_to_hf", ("--megatron-dir", "{R}/meg_notok", "--out", "{T}/out"),
                                "{R}/meg_notok holds no tokenizer files"),
    "export_tokenizer_dir_empty": Case("megatron_to_hf", ("--megatron-dir", "{R}/meg_notok", "--out", "{T}/out",
                                                          "--tokenizer-dir", "{R}/empty"),
                                       "--tokenizer-dir {R}/empty holds no tokenizer"),
    "export_out_is_input_dir": Case("megatron_to_hf", ("--megatron-dir", "{R}/meg", "--out", "{R}/meg"),
                                    "output {R}/meg exists and is not empty"),
    "verify_seq_len": Case("verify", ("--hf-dir", "{R}/hf", "--megatron-dir", "{R}/meg", "--seq-len", "100000"),
                           "--seq-len=100000 exceeds max_position_embeddings=128"),
    "generate_prompts_missing": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/none.jsonl", "--out", "{T}/o.jsonl"),
                                     "--prompts {R}/none.jsonl: no such file"),
    "generate_bad_json_line3": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/bad_json_line3.jsonl",
                                                 "--out", "{T}/o.jsonl"),
                                    "{R}/prompts/bad_json_line3.jsonl:3: not valid JSON"),
    "generate_unicode_separator": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/separator.jsonl",
                                                    "--out", "{T}/o.jsonl"), "{R}/prompts/separator.jsonl:2: not valid JSON"),
    "generate_not_utf8": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/latin1.jsonl",
                                           "--out", "{T}/o.jsonl"), "{R}/prompts/latin1.jsonl:2: not UTF-8"),
    "generate_not_object": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/not_object.jsonl",
                                             "--out", "{T}/o.jsonl"), "{R}/prompts/not_object.jsonl:1: expected a JSON object"),
    "generate_ids_out_of_vocab": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/ids_out_of_vocab.jsonl",
                                                   "--out", "{T}/o.jsonl"),
                                      "{R}/prompts/ids_out_of_vocab.jsonl:1: 'prompt_ids' holds [100000]"),
    "generate_ids_not_ints": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/ids_not_ints.jsonl",
                                               "--out", "{T}/o.jsonl"),
                                  "{R}/prompts/ids_not_ints.jsonl:1: 'prompt_ids' must be a non-empty list of integers"),
    "generate_no_prompt_field": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/no_prompt.jsonl",
                                                  "--out", "{T}/o.jsonl"),
                                     "{R}/prompts/no_prompt.jsonl:1: each line needs 'prompt'"),
    "generate_out_is_prompts": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/good.jsonl",
                                                 "--out", "{R}/prompts/good.jsonl"),
                                    "--out {R}/prompts/good.jsonl would write into the input"),
    "generate_out_inside_load": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/good.jsonl",
                                                  "--out", "{R}/meg/samples.jsonl"),
                                     "--out {R}/meg/samples.jsonl would write into the input {R}/meg"),
    "generate_tokenizer_other_size": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/good.jsonl",
                                                       "--out", "{T}/o.jsonl", "--tokenizer", "{R}/tok_small"),
                                          "tokenizer {R}/tok_small is not the model's tokenizer recorded in "
                                          "{R}/meg/conversion.json (vocab_size"),
    "generate_tokenizer_other_vocab": Case("generate", ("--load", "{R}/meg", "--prompts", "{R}/prompts/good.jsonl",
                                                        "--out", "{T}/o.jsonl", "--tokenizer", "{R}/tok_swapped"),
                                           "tokenizer {R}/tok_swapped is not the model's tokenizer recorded in "
                                           "{R}/meg/conversion.json (vocab_sha256"),
}


def main_of(tool: str):
    from megatron_opsd.conversion import cli
    from megatron_opsd.rollout import cli as rollout_cli

    return {"gguf_to_hf": cli.gguf_to_hf_main, "hf_to_megatron": cli.hf_to_megatron_main,
            "megatron_to_hf": cli.megatron_to_hf_main, "verify": cli.verify_main, "generate": rollout_cli.main}[tool]


def fill(text: str, root: Path, tmp: Path) -> str:
    return text.replace("{R}", str(root)).replace("{T}", str(tmp))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_tool_input_is_one_line_exit_2_and_changes_nothing(name, inputs, tmp_path, capsys, monkeypatch):
    from megatron_opsd.conversion.cli import run

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    case = CASES[name]
    argv = [fill(a, inputs, tmp_path) for a in case.args]
    before = tree_hash(inputs)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: main_of(case.tool)(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0] == lines[0].strip(), err
    assert lines[0].startswith("error: ") and fill(case.expected, inputs, tmp_path) in lines[0], lines[0]
    assert tree_hash(inputs) == before, f"{name} modified an input"
    assert not list(tmp_path.iterdir()), f"{name} left output behind: {list(tmp_path.iterdir())}"
    print(f"| {name} | {exit_info.value.code} | {lines[0]} |")


def run_script(*args, tmp: Path) -> subprocess.CompletedProcess:
    env = worker_env()
    env.pop("PYTHONWARNINGS")  # as a user runs it: the first line must be ours
    return subprocess.run([sys.executable, *map(str, args)], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=300)


def test_scripts_print_one_line_first(inputs, tmp_path):
    """The tools/*.py scripts themselves, as a user runs them (no PYTHONWARNINGS): exit 2 and the
    error is the first and only stderr line; plus the trainer refusing a tokenizer that is not the
    converted model's (it would index wrong embeddings mid-run)."""
    before = tree_hash(inputs)
    runs = {
        "verify broken HF config": (run_script(TOOLS / "verify_conversion.py", "--hf-dir", inputs / "config_broken",
                                               "--megatron-dir", inputs / "meg", tmp=tmp_path),
                                    f"{inputs}/config_broken/config.json: not valid JSON"),
        "export --max-shard-size lots": (run_script(TOOLS / "convert_megatron_to_hf.py", "--megatron-dir", inputs / "meg",
                                                    "--out", tmp_path / "out", "--max-shard-size", "lots", tmp=tmp_path),
                                         "--max-shard-size 'lots'"),
        "generate --out = --prompts": (run_script(TOOLS / "generate.py", "--load", inputs / "meg", "--prompts",
                                                  inputs / "prompts" / "good.jsonl", "--out",
                                                  inputs / "prompts" / "good.jsonl", tmp=tmp_path),
                                       "would write into the input"),
        "train tokenizer not the model's": (
            run_script("-m", "megatron_opsd.train", "--config", REPO_ROOT / "tests" / "e2e" / "tiny.yaml",
                       "--parallel.tp", "1", "--train.load", inputs / "meg", "--data.tokenizer_path",
                       inputs / "tok_swapped", "--checkpoint.dir", tmp_path / "ckpt", "--logging.dir",
                       tmp_path / "logs", tmp=REPO_ROOT),
            f"tokenizer {inputs}/tok_swapped is not the model's tokenizer"),
    }
    for what, (proc, expected) in runs.items():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and lines and expected in lines[0], (what, proc.stdout[-2000:], proc.stderr[-3000:])
        assert len(lines) == 1, (what, proc.stderr)
        print(f"| script: {what} | {proc.returncode} | {lines[0]} |")
    assert tree_hash(inputs) == before
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())
