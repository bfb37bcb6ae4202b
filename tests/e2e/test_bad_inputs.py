"""Bad inputs and faults of a training run: each gives exit 2 (3: non-finite weights) and ONE first line
on stderr naming the file/row/field/option, and modifies nothing it was given.

One single-process training run (module fixture) makes a real checkpoint root (step_0000001,
step_0000002, ``latest``); every case works on its own copy of what it damages. The cases run through
``megatron_opsd.train.main`` -- the trainer's own validation, the path ``examples/run_opsd.sh``
takes before torchrun starts -- all in ONE subprocess (tests/e2e/bad_inputs_runner.py), so the suite
costs one interpreter start, not forty.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, worker_env

CONFIG = Path(__file__).parent / "tiny.yaml"
RUNNER = Path(__file__).parent / "bad_inputs_runner.py"


def train_cmd(ckpt: Path, logs: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megatron_opsd.train", "--config", str(CONFIG), "--parallel.tp", "1",
            "--checkpoint.dir", str(ckpt), "--logging.dir", str(logs), *overrides]


def tree_hash(*roots: Path) -> str:
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in root.rglob("*")):
            digest.update(str(path.relative_to(root)).encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A finished 2-step run (keep_last 2, next to a stale step_*.tmp of a crashed save), evaluated on 3
    shipped problems, one without any answer and one whose prompt is over data.max_prompt_len."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    stale = run / "checkpoints" / "step_0000009.tmp"
    stale.mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"half")
    shipped = (REPO_ROOT / "megatron_opsd" / "assets" / "arith" / "eval.jsonl").read_text().splitlines()[:3]
    extra = [{"problem": "What is 2 + 2?", "solution": "It is four."},
             {"problem": "Add these: " + " + ".join(["1"] * 400), "solution": "\\boxed{400}"}]
    eval_path = root / "eval.jsonl"
    eval_path.write_text("\n".join(shipped + [json.dumps(r) for r in extra]) + "\n")
    proc = subprocess.run(train_cmd(run / "checkpoints", run / "logs", "--train.steps", "2",
                                    "--checkpoint.keep_last", "2", "--data.eval_path", str(eval_path),
                                    "--train.eval_problems", "0"),
                          cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "run": run, "ckpt": run / "checkpoints", "stdout": proc.stdout, "stderr": proc.stderr,
            "eval_path": eval_path}


def test_run_outputs_pruning_eval_records_and_config(base):
    ckpt, logs = base["ckpt"], base["run"] / "logs"
    assert f"started fresh: no checkpoint under {ckpt}" in base["stdout"]
    # keep_last=2 keeps two complete checkpoints: the stale .tmp is not counted as one
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000001", "step_0000002", "step_0000009.tmp"]
    # each evaluation's responses, answers and verdicts; accuracy agrees with them
    metrics = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2]
    for record in evals:
        rows = [json.loads(x) for x in (logs / f"eval_step_{record['step']}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [0, 1, 2, 3] and record["problems"] == 4
        assert set(rows[0]) >= {"id", "source", "response", "answer", "reference", "correct"}
        assert [r["reference"] for r in rows] == ["133", "46", "300", None] and rows[3]["correct"] is False
        assert rows[0]["source"] == f"{base['eval_path']}:1"
        assert record["accuracy"] == sum(r["correct"] for r in rows) / 4
        assert record["dropped_long_prompt"] == 1  # problem 4: its prompt exceeds max_prompt_len=512
    assert base["stdout"].count("evaluation: 1 of 5 problems dropped: their prompt exceeds "
                                "data.max_prompt_len=512") == 2
    assert (f"warning: 1 of 5 evaluation problems in {base['eval_path']} have no answer "
            f"(e.g. {base['eval_path']}:4); they count as wrong") in base["stderr"]
    import yaml

    saved = yaml.safe_load((logs / "config.yaml").read_text())
    assert saved["train"]["steps"] == 2 and saved["checkpoint"]["dir"] == str(ckpt)


def _cases(base: dict, work: Path) -> list[dict]:
    """(name, argv, env, expected exit, the text the first stderr line must contain)."""
    ckpt = base["ckpt"]
    d = work / "inputs"
    d.mkdir()

    def write(name: str, data: bytes | str) -> Path:
        path = d / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def copy_ckpt(name: str) -> Path:
        target = d / name
        shutil.copytree(ckpt, target, ignore=shutil.ignore_patterns("*.tmp"))
        return target

    good = '{"problem": "1+1?", "solution": "so \\\\boxed{2}"}\n'
    converted = d / "converted"
    shutil.copytree(ckpt / "step_0000002", converted)
    hf = d / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")
    empty = d / "empty"
    empty.mkdir()
    a_file = write("a_file.txt", "not a directory")
    run_root = d / "myrun"
    shutil.copytree(ckpt, run_root / "checkpoints", ignore=shutil.ignore_patterns("*.tmp"))

    # PEFT adapter directories for lora.init_from: one for a wider base, one using DoRA
    import yaml

    from megatron_opsd.models.description import ModelConfig
    from megatron_opsd.models.lora import LoRAConfig, peft_shapes, write_peft_adapter

    import torch

    tiny_model = ModelConfig(**yaml.safe_load(CONFIG.read_text())["model"])
    wider = ModelConfig(**{**yaml.safe_load(CONFIG.read_text())["model"], "hidden_size": 96})
    lora4 = LoRAConfig(rank=4, alpha=8.0)
    write_peft_adapter(d / "adapter_other_base", {k: torch.zeros(v) for k, v in peft_shapes(wider, lora4).items()},
                       lora4, wider)
    write_peft_adapter(d / "adapter_dora", {k: torch.zeros(v) for k, v in peft_shapes(tiny_model, lora4).items()},
                       lora4, tiny_model)
    dora_config = json.loads((d / "adapter_dora" / "adapter_config.json").read_text())
    (d / "adapter_dora" / "adapter_config.json").write_text(json.dumps({**dora_config, "use_dora": True}))

    latest_binary = copy_ckpt("latest_binary")
    (latest_binary / "latest").write_bytes(b"\xff\xfe\x00garbage")
    latest_dangling = copy_ckpt("latest_dangling")
    (latest_dangling / "latest").write_text("step_0000007")
    latest_junk = copy_ckpt("latest_junk")
    (latest_junk / "latest").write_text("../../etc")
    no_latest = copy_ckpt("no_latest")
    (no_latest / "latest").unlink()
    distcp_deleted = copy_ckpt("distcp_deleted")
    (distcp_deleted / "step_0000002" / "__0_1.distcp").unlink()
    distcp_truncated = copy_ckpt("distcp_truncated")
    victim = distcp_truncated / "step_0000002" / "__0_0.distcp"
    victim.write_bytes(victim.read_bytes()[:1000])
    metadata_deleted = copy_ckpt("metadata_deleted")
    (metadata_deleted / "step_0000002" / ".metadata").unlink()
    json_broken = copy_ckpt("json_broken")
    (json_broken / "step_0000002" / "model.json").write_text('{"model_type": "llama", "hidden_size": ')
    json_binary = copy_ckpt("json_binary")
    (json_binary / "step_0000002" / "model.json").write_bytes(b"\x80\x81\x82")
    json_bad_value = copy_ckpt("json_bad_value")
    (json_bad_value / "step_0000002" / "model.json").write_text('{"model_type": "gpt2"}')
    all_broken = copy_ckpt("all_broken")
    for step in ("step_0000001", "step_0000002"):
        (all_broken / step / "__0_0.distcp").unlink()

    out = work / "out"  # every case's outputs go under here; nothing may be created
    c, lg = str(out / "ckpt"), str(out / "logs")
    std = ["--checkpoint.dir", c, "--logging.dir", lg]

    def case(name, args, expect, *, rc=2, env=None, plain=False):
        argv = (["--config", str(CONFIG), "--parallel.tp", "1"] if not plain else []) + (
            std if "--checkpoint.dir" not in args and "--load" not in args else ["--logging.dir", lg]) + list(args)
        return {"name": name, "argv": argv, "env": env or {}, "rc": rc, "expect": expect}

    return [
        # ---- data
        case("data_jsonl_not_utf8", ["--data.train_path", str(write("t.jsonl", good.encode() + b'{"problem": "\xff"}\n'))],
             f"{d / 't.jsonl'}:2: not UTF-8 text"),
        case("data_json_not_utf8", ["--data.train_path", str(write("t.json", b'[\n{"problem": "\xfe"}]'))],
             f"{d / 't.json'}:2: not UTF-8 text"),
        case("data_bad_json_line", ["--data.train_path", str(write("b.jsonl", good + '{"problem": \n'))],
             f"{d / 'b.jsonl'}:2: malformed JSON line"),
        case("data_missing_field", ["--data.train_path", str(write("m.jsonl", good + '{"problem": "x"}\n'))],
             f"{d / 'm.jsonl'}:2: field 'solution' is missing"),
        case("data_missing_file", ["--data.train_path", str(d / "nope.jsonl")], "nope.jsonl does not exist"),
        case("data_unknown_suffix", ["--data.train_path", str(write("t.csv", "problem,solution\n"))],
             "unknown problem file type '.csv'"),
        case("data_broken_parquet", ["--data.train_path", str(write("t.parquet", b"PAR1 not really"))],
             f"{d / 't.parquet'}: not a readable Parquet file"),
        case("eval_without_answers", ["--data.eval_path", str(write("e.jsonl", '{"problem": "p", "solution": "s"}\n' * 3))],
             f"{d / 'e.jsonl'}: none of the 3 evaluation problems has an answer"),
        # ---- config
        case("yaml_broken", ["--config", str(write("broken.yaml", "train:\n  steps: 2\n   micro: [\n"))],
             f"{d / 'broken.yaml'}:3:", plain=True),
        case("yaml_not_utf8", ["--config", str(write("bin.yaml", b"train:\n  steps: \xff\n"))],
             f"{d / 'bin.yaml'}: not UTF-8 text", plain=True),
        case("yaml_top_level_list", ["--config", str(write("list.yaml", "- 1\n- 2\n"))],
             "the top level must be a mapping", plain=True),
        case("config_missing", ["--config", str(d / "nope.yaml")], "config file", plain=True),
        case("unknown_key", ["--train.stepz", "3"], "train.stepz: unknown config key"),
        case("wrong_type", ["--train.steps", "two"], "train.steps: expected an integer, got 'two'"),
        case("override_unparsable", ["--optim.lr", "[1"], "--optim.lr: cannot read the value '[1'"),
        case("rollout_top_p", ["--rollout.top_p", "1.5"], "rollout.top_p=1.5 must lie in (0, 1]"),
        case("rollout_top_k", ["--rollout.top_k", "-1"], "rollout.top_k=-1 must be >= 0"),
        case("tp_heads", ["--parallel.tp", "3"],
             "num_attention_heads=4 is not divisible by parallel.tp=3: choose parallel.tp among [1, 2, 4]"),
        case("tp_ffn", ["--parallel.tp", "8", "--model.num_attention_heads", "8", "--model.num_key_value_heads", "8",
                        "--model.intermediate_size", "132"],
             "intermediate_size=132 is not divisible by parallel.tp=8: choose parallel.tp among [1, 2, 4]"),
        case("max_seq_len_over_positions", ["--data.max_seq_len", "4096"],
             "data.max_seq_len=4096 exceeds the model's max_position_embeddings=1024"),
        case("world_size", ["--parallel.tp", "2"], "world size 3 is not divisible by parallel.tp", env={"WORLD_SIZE": "3"}),
        # (this machine has no Transformer Engine on CUDA, which megatron-core's context parallelism needs)
        case("cp_without_te", ["--parallel.cp", "2"], "parallel.cp=2 needs Transformer Engine attention on CUDA"),
        case("prompts_per_step_vs_dp", ["--train.prompts_per_step", "3"],
             "train.prompts_per_step=3 is not divisible by the data-parallel size 2", env={"WORLD_SIZE": "2"}),
        case("eval_fallback_value", ["--train.eval_answer_fallback", "guess"], "train.eval_answer_fallback: 'guess'"),
        case("load_missing_value", ["--load"], "--load: missing value"),
        # ---- --load (resume) and train.load (weights)
        case("load_converted", ["--load", str(converted)],
             f"--load: {converted} is a converted model (model.json, no `latest`), not a training checkpoint: "
             "use --train.load"),
        case("load_empty", ["--load", str(empty)], f"--load: no checkpoint under {empty} (the directory is empty)"),
        case("load_missing", ["--load", str(d / "nothing")], f"no checkpoint under {d / 'nothing'} (it does not exist)"),
        case("load_run_root", ["--load", str(run_root)],
             f"--load: no checkpoint under {run_root}; did you mean {run_root / 'checkpoints'}?"),
        case("load_step_dir", ["--load", str(ckpt / "step_0000001")],
             f"{ckpt / 'step_0000001'} is one step of a training run: pass its checkpoint directory {ckpt}"),
        case("load_hf_dir", ["--load", str(hf)], f"{hf} is an HF model directory: convert it first with "
             "tools/convert_hf_to_megatron.py, then --train.load the result"),
        case("load_file", ["--load", str(a_file)], f"{a_file} is a file, not a checkpoint directory"),
        case("train_load_hf", ["--train.load", str(hf)], f"train.load: {hf} is an HF model directory"),
        case("train_load_empty", ["--train.load", str(empty)], f"train.load: no checkpoint under {empty}"),
        case("opd_teacher_missing", ["--loss.mode", "opd", "--loss.opd_teacher_load", str(d / "t")],
             f"loss.opd_teacher_load: no checkpoint under {d / 't'}"),
        # ---- LoRA
        case("lora_rank_negative", ["--lora.rank", "-1"], "lora.rank=-1 must be >= 0"),
        case("lora_alpha_zero", ["--lora.rank", "4", "--lora.alpha", "0"], "lora.alpha=0.0 must be > 0"),
        case("lora_unknown_target", ["--lora.rank", "4", "--lora.targets", "[q_proj, qkv]"],
             "lora.targets: unknown projection(s) ['qkv']"),
        case("lora_adapter_other_base", ["--lora.rank", "4", "--lora.alpha", "8", "--lora.init_from",
                                         str(d / "adapter_other_base")], "an adapter for another base model?"),
        case("lora_adapter_dora", ["--lora.rank", "4", "--lora.alpha", "8", "--lora.init_from", str(d / "adapter_dora")],
             "use_dora=True is not supported"),
        case("lora_adapter_not_a_dir", ["--lora.rank", "4", "--lora.init_from", str(empty)],
             "not a PEFT adapter directory"),
        case("teacher_path_without_opd", ["--lora.rank", "4", "--loss.opd_teacher_load", str(converted)],
             f"loss.opd_teacher_load={converted} is set but loss.mode=opsd"),
        # ---- damaged checkpoints: the file is named and the previous complete step offered
        case("latest_not_text", ["--load", str(latest_binary)],
             f"{latest_binary / 'latest'} is not a text pointer (not UTF-8); the newest complete checkpoint is "
             f"{latest_binary / 'step_0000002'}"),
        case("latest_dangling", ["--load", str(latest_dangling)],
             f"{latest_dangling / 'latest'} names {latest_dangling / 'step_0000007'}, which does not exist; "
             f"the previous complete checkpoint is {latest_dangling / 'step_0000002'}"),
        case("latest_junk", ["--load", str(latest_junk)], f"{latest_junk / 'latest'} should name a step directory"),
        case("latest_deleted", ["--load", str(no_latest)], f"{no_latest / 'latest'} is missing"),
        case("distcp_deleted", ["--load", str(distcp_deleted)],
             f"{distcp_deleted / 'step_0000002' / '__0_1.distcp'} is missing: the checkpoint "
             f"{distcp_deleted / 'step_0000002'} is incomplete; the previous complete checkpoint is "
             f"{distcp_deleted / 'step_0000001'}"),
        case("distcp_truncated", ["--load", str(distcp_truncated)],
             f"{distcp_truncated / 'step_0000002' / '__0_0.distcp'} is truncated (1000 of"),
        case("metadata_deleted", ["--load", str(metadata_deleted)],
             f"{metadata_deleted / 'step_0000002' / '.metadata'} is missing"),
        case("model_json_broken", ["--load", str(json_broken)],
             f"{json_broken / 'step_0000002' / 'model.json'} is not valid JSON"),
        case("model_json_binary", ["--load", str(json_binary)],
             f"{json_binary / 'step_0000002' / 'model.json'} is not valid JSON (UnicodeDecodeError"),
        case("model_json_bad_value", ["--load", str(json_bad_value)],
             f"{json_bad_value / 'step_0000002' / 'model.json'} is not a valid model description"),
        case("no_complete_step", ["--load", str(all_broken)], f"no earlier complete checkpoint under {all_broken}"),
        case("resume_other_model_size", ["--load", str(run_root / "checkpoints"), "--model.hidden_size", "128",
                                         "--model.intermediate_size", "256"],
             f"{run_root / 'checkpoints' / 'step_0000002' / 'model.json'} describes another model: hidden_size=64 "
             "(this run: 128)"),
        # ---- outputs
        case("ckpt_dir_is_file", ["--checkpoint.dir", str(a_file)], f"checkpoint.dir={a_file}: {a_file} is a file"),
        case("ckpt_dir_under_file", ["--checkpoint.dir", str(a_file / "ckpt")], f"{a_file} is a file"),
        case("ckpt_dir_not_writable", ["--checkpoint.dir", "/proc/megatron_opsd_ckpt"], "/proc is not writable"),
        case("logging_dir_is_file", ["--checkpoint.dir", c, "--logging.dir", str(a_file)], f"logging.dir={a_file}"),
        case("ckpt_dir_inside_train_load", ["--train.load", str(converted), "--checkpoint.dir", str(converted / "ck")],
             f"checkpoint.dir={converted / 'ck'} is inside the input directory train.load={converted}"),
        case("ckpt_dir_is_converted_model", ["--checkpoint.dir", str(converted)],
             f"checkpoint.dir: {converted} is a converted model"),
        case("ckpt_dir_is_run_root", ["--checkpoint.dir", str(run_root)], f"did you mean {run_root / 'checkpoints'}?"),
        case("fresh_over_checkpoints", ["--checkpoint.dir", str(run_root / "checkpoints"), "--checkpoint.resume", "false"],
             "already holds checkpoints (latest step_0000002) and checkpoint.resume=false"),
        # ---- exit 0: validation alone (no WORLD_SIZE: the layout is not checked), a finished run
        case("validate_only_ok", ["--validate-only", "--parallel.tp", "2"],
             f"config ok: starts fresh (no checkpoint under {c})", rc=0),
        case("finished_run", ["--load", str(run_root / "checkpoints"), "--train.steps", "2"],
             "nothing to do:", rc=0),
    ]


@pytest.fixture(scope="module")
def results(base, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("bad_cases")
    cases = _cases(base, work)
    inputs = [base["run"], work / "inputs"]
    before = tree_hash(*inputs)
    spec = work / "cases.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec), str(work / "results.json")], cwd=REPO_ROOT,
                          env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"cases": {c["name"]: c for c in cases},
            "results": json.loads((work / "results.json").read_text()),
            "unchanged": tree_hash(*inputs) == before, "created": (work / "out").exists()}


CASE_NAMES = [
    "data_jsonl_not_utf8", "data_json_not_utf8", "data_bad_json_line", "data_missing_field", "data_missing_file",
    "data_unknown_suffix", "data_broken_parquet", "eval_without_answers", "yaml_broken", "yaml_not_utf8",
    "yaml_top_level_list", "config_missing", "unknown_key", "wrong_type", "override_unparsable", "rollout_top_p",
    "rollout_top_k", "tp_heads", "tp_ffn", "max_seq_len_over_positions", "world_size", "cp_without_te",
    "prompts_per_step_vs_dp",
    "eval_fallback_value", "load_missing_value", "load_converted", "load_empty", "load_missing", "load_run_root",
    "load_step_dir", "load_hf_dir", "load_file", "train_load_hf", "train_load_empty", "opd_teacher_missing",
    "latest_not_text", "latest_dangling", "latest_junk", "latest_deleted", "distcp_deleted", "distcp_truncated",
    "metadata_deleted", "model_json_broken", "model_json_binary", "model_json_bad_value", "no_complete_step",
    "resume_other_model_size", "ckpt_dir_is_file", "ckpt_dir_under_file", "ckpt_dir_not_writable",
    "logging_dir_is_file", "ckpt_dir_inside_train_load", "ckpt_dir_is_converted_model", "ckpt_dir_is_run_root",
    "fresh_over_checkpoints", "validate_only_ok", "finished_run", "lora_rank_negative", "lora_alpha_zero",
    "lora_unknown_target", "lora_adapter_other_base", "lora_adapter_dora", "lora_adapter_not_a_dir",
    "teacher_path_without_opd",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(results, name):
    case, got = results["cases"][name], results["results"][name]
    assert got["rc"] == case["rc"], got
    stream = got["stderr"] if case["rc"] else got["stdout"]
    lines = stream.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in got["stderr"], got
    prefix = "megatron_opsd.train: error: " if case["rc"] else ""
    assert lines[0].startswith(prefix) and case["expect"] in lines[0], (case["expect"], lines[0])


def test_case_list_is_complete(results):
    assert sorted(results["cases"]) == sorted(CASE_NAMES)


def test_no_input_modified_and_nothing_created(results):
    assert results["unchanged"], "a case modified an input or the base run"
    assert not results["created"], "a refused case created an output directory"


def test_damaged_tensor_data_is_one_line_naming_the_step(base, tmp_path):
    """A .distcp of the right size with overwritten bytes passes the file checks; the load itself fails:
    one line naming the step directory, exit 2, the checkpoint left as it was."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base["ckpt"], ckpt, ignore=shutil.ignore_patterns("*.tmp"))
    victim = ckpt / "step_0000002" / "__0_0.distcp"
    victim.write_bytes(b"\x00" * victim.stat().st_size)
    before = tree_hash(ckpt)
    proc = subprocess.run(train_cmd(ckpt, tmp_path / "logs", "--load", str(ckpt), "--train.steps", "3"),
                          cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"megatron_opsd.train: error: {ckpt / 'step_0000002'}: the checkpoint cannot be read "
                     f"(UnpicklingError: damaged tensor data); the previous complete checkpoint is "
                     f"{ckpt / 'step_0000001'}: write 'step_0000001' into {ckpt / 'latest'} to resume from it"], \
        proc.stderr
    assert tree_hash(ckpt) == before


def test_non_finite_update_stops_with_exit_3_and_no_checkpoint(tmp_path):
    """Step 2's update writes a NaN (test hook; finite loss and gradients): the run stops at once with
    exit 3 naming step 2, keeps step 1's checkpoint, and writes none for step 2."""
    proc = subprocess.run(train_cmd(tmp_path / "ckpt", tmp_path / "logs", "--checkpoint.save_every", "1"),
                          cwd=REPO_ROOT, env=worker_env({"MEGATRON_OPSD_FAULT": "nonfinite_update:2"}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "megatron_opsd.train: stopped: step 2: the optimizer update made weights non-finite"), proc.stderr
    assert "no checkpoint was written for it" in lines[0]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_0000001"]


def test_launcher_validates_once_before_torchrun(base, tmp_path):
    """examples/run_opsd.sh: a bad config is one line and exit 2 (not torchrun's 1, not once per rank);
    a finished run is one line and exit 0, with no workers started."""
    env = worker_env({"NPROC_PER_NODE": "2", "MASTER_PORT": "1"})  # port 1: torchrun would fail to start
    bad = subprocess.run(["bash", "examples/run_opsd.sh", "--config", str(CONFIG), "--parallel.tp", "3",
                          "--checkpoint.dir", str(tmp_path / "c"), "--logging.dir", str(tmp_path / "l")],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == [
        "megatron_opsd.train: error: num_attention_heads=4 is not divisible by parallel.tp=3: choose parallel.tp "
        "among [1, 2, 4]"]
    done = subprocess.run(["bash", "examples/run_opsd.sh", "--config", str(CONFIG), "--load", str(base["ckpt"]),
                           "--train.steps", "2", "--logging.dir", str(tmp_path / "l")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines() == [
        f"nothing to do: {base['ckpt'] / 'step_0000002'} already reached train.steps=2"], done.stdout + done.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "l").exists()


def _kill_and_list_survivors(proc: subprocess.Popen, watch: Path, target_pid: int, helpers: int) -> list:
    """Once ``watch`` exists and the run has at least ``helpers`` child processes, SIGKILL ``target_pid``;
    return the run's processes still alive 5 s later."""
    import signal
    import time

    import psutil

    deadline = time.time() + 240
    while not watch.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert watch.exists(), proc.communicate()[0][-3000:]
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= helpers, family  # checkpoint writers' helpers (or torchrun's workers) exist
    os.kill(target_pid, signal.SIGKILL)
    time.sleep(5)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p.pid != target_pid]
    found = [(p.pid, p.name()) for p in alive]
    for survivor in alive:  # clean up on failure; the orphans would also hold the output pipe open
        survivor.kill()
    proc.kill()
    proc.communicate(timeout=60)
    return found


def test_kill_9_of_the_trainer_leaves_no_orphans(tmp_path):
    """dist_checkpointing's helper processes (its result manager, forked on CPU by cpu_compat, spawned
    with a resource tracker on GPU; forked writers during a save) die with a SIGKILLed trainer instead of
    living on as orphans."""
    proc = subprocess.Popen(train_cmd(tmp_path / "ckpt", tmp_path / "logs", "--train.steps", "1000",
                                      "--checkpoint.save_every", "1"),
                            cwd=REPO_ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert _kill_and_list_survivors(proc, tmp_path / "ckpt" / "latest", proc.pid, helpers=1) == []


@pytest.mark.distributed
def test_kill_9_of_torchrun_leaves_no_orphans(tmp_path):
    """SIGKILL of the torchrun agent: its workers and their helpers die too."""
    from tests.harness import free_port

    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "megatron_opsd.train", "--config", str(CONFIG),
         "--train.steps", "1000", "--checkpoint.save_every", "1", "--checkpoint.dir", str(tmp_path / "ckpt"),
         "--logging.dir", str(tmp_path / "logs")],
        cwd=REPO_ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _kill_and_list_survivors(proc, tmp_path / "ckpt" / "latest", proc.pid, helpers=2) == []
