"""Config loading, overrides and the errors users see for bad values."""

from __future__ import annotations

import pytest

from megatron_opsd.config import JobConfig, load_config
from megatron_opsd.config_io import ConfigError, parse_overrides
from megatron_opsd.models.description import ModelConfig
from megatron_opsd.parallel import ParallelConfig


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  tp: 2\nmodel:\n  num_attention_heads: 4\n  hidden_size: 64\n")
    cfg = load_config(str(path), ["--parallel.pp", "2", "--optim.lr=3e-4", "--model.tie_word_embeddings",
                                  "true"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.model.tie_word_embeddings is True


def test_override_parsing_types():
    assert parse_overrides(["--a.b", "2", "--a.c=true", "--d", "null", "--e", "x"]) == {
        "a": {"b": 2, "c": True}, "d": None, "e": "x"}
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["tp=2"])


@pytest.mark.parametrize("overrides, pattern", [
    (["--parallel.tp", "3"], r"num_attention_heads=4 is not divisible by parallel.tp=3"),
    (["--parallel.pp", "3"], r"num_hidden_layers=2 is not divisible by parallel.pp \* vpp = 3"),
    (["--parallel.pp", "2", "--parallel.vpp", "2"], r"num_hidden_layers=2 is not divisible .* = 4"),
    (["--parallel.vpp", "2"], r"parallel.vpp=2 needs parallel.pp >= 2"),
    (["--parallel.tp", "0"], r"parallel.tp=0 must be >= 1"),
    (["--parallel.tp", "two"], r"parallel.tp: expected an integer, got 'two'"),
    (["--parallel.tpp", "2"], r"parallel.tpp: unknown config key; valid keys here are \[.*'tp'"),
    (["--optim.lr", "-1"], r"optim.lr=-1.0 must be positive"),
    (["--model.num_attention_heads", "3", "--model.hidden_size", "64"],
     r"hidden_size=64 is not divisible by num_attention_heads=3: set head_dim"),
])
def test_bad_config_names_field_value_and_fix(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_world_size_not_divisible():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.tp \* parallel.pp = 2 \* 2"):
        ParallelConfig(tp=2, pp=2).check_world_size(6)
    ParallelConfig(tp=2, pp=2).check_world_size(8)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("fields, pattern", [
    (dict(model_type="llama", attention_bias=True), r"attention_bias=True is not supported for llama"),
    (dict(mlp_bias=True), r"mlp_bias=True is not supported"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}),
     r"high_freq_factor=2.0 is not supported: megatron-core's llama3 scaling fixes it at 4.0"),
    (dict(num_attention_heads=4, num_key_value_heads=3), r"not a multiple of num_key_value_heads=3"),
])
def test_unsupported_models_are_refused(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**fields)


def test_sliding_window_shorter_than_sequences_is_refused():
    with pytest.raises(ConfigError, match=r"exceeds sliding_window=1024"):
        load_config(None, ["--model.model_type", "mistral", "--model.sliding_window", "1024",
                           "--data.max_seq_len", "2048"])
    # Qwen's window is inactive unless use_sliding_window.
    load_config(None, ["--model.model_type", "qwen2", "--model.sliding_window", "1024"])


def test_hf_config_roundtrip_keeps_both_rope_fields():
    cfg = ModelConfig(model_type="llama", rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf = cfg.to_hf_dict()
    assert hf["rope_theta"] == 500000.0 and hf["rope_scaling"]["rope_type"] == "llama3"  # transformers 4.x
    assert hf["rope_parameters"]["rope_theta"] == 500000.0  # transformers 5.x
    assert hf["rope_parameters"]["factor"] == 8.0
    assert ModelConfig.from_hf_dict(hf) == cfg
    # transformers 5.x style input (rope only in rope_parameters)
    v5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    assert ModelConfig.from_hf_dict(v5) == cfg


def test_default_job_config_is_valid():
    cfg = JobConfig()
    assert cfg.parallel.tp == 1 and cfg.model.head_dim == cfg.model.hidden_size // cfg.model.num_attention_heads


def test_example_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_config(str(path))
        assert cfg.loss.mode == "opsd" and cfg.optim.clip_grad == pytest.approx(0.1), path
        if "embedded" not in path.name:  # the tiny-vocabulary demo turns clipping off (see its comment)
            assert cfg.loss.clip in (0.05, 0.06), path


@pytest.mark.parametrize("overrides, pattern", [
    # the advice lists only sizes that satisfy every constraint (heads, KV heads, MLP width)
    (["--model.num_attention_heads", "8", "--model.num_key_value_heads", "8", "--model.intermediate_size", "132",
      "--parallel.tp", "8"], r"intermediate_size=132 is not divisible by parallel.tp=8: choose parallel.tp among "
                             r"\[1, 2, 4\]$"),
    (["--model.num_attention_heads", "12", "--model.hidden_size", "96", "--model.num_key_value_heads", "4",
      "--model.intermediate_size", "100", "--parallel.tp", "9"],
     r"num_attention_heads=12 is not divisible by parallel.tp=9: choose parallel.tp among \[1, 2, 4\]$"),
    (["--rollout.top_p", "0"], r"rollout.top_p=0.0 must lie in \(0, 1\]"),
    (["--rollout.top_k", "-2"], r"rollout.top_k=-2 must be >= 0"),
    (["--rollout.temperature", "inf"], r"rollout.temperature=inf must be a positive finite number"),
    (["--data.max_seq_len", "4096", "--model.max_position_embeddings", "2048"],
     r"data.max_seq_len=4096 exceeds the model's max_position_embeddings=2048"),
    (["--checkpoint.resume", "maybe"], r"checkpoint.resume"),
    (["--train.warmup_teacher_fraction", "1.5"], r"train.warmup_teacher_fraction=1.5 must lie in \[0, 1\]"),
])
def test_layout_sampling_and_length_errors_name_the_field(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_every_advised_tp_is_accepted():
    base = ["--model.num_attention_heads", "12", "--model.hidden_size", "96", "--model.num_key_value_heads", "4",
            "--model.intermediate_size", "100"]
    for tp in (1, 2, 4):
        assert load_config(None, base + ["--parallel.tp", str(tp)]).parallel.tp == tp


def test_checkpoint_resume_accepts_true_false_required():
    assert load_config(None, ["--checkpoint.resume", "required"]).checkpoint.resume == "required"
    assert load_config(None, ["--checkpoint.resume", "false"]).checkpoint.resume is False


@pytest.mark.parametrize("text, pattern", [
    ("train:\n  steps: 2\n   micro: [\n", r"run.yaml:3:\d+: invalid YAML"),
    (b"train:\n  steps: \xff\n", r"run.yaml: not UTF-8 text"),
])
def test_broken_yaml_is_one_line_naming_file_and_line(tmp_path, text, pattern):
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(str(path))
    assert "\n" not in str(info.value)


def test_token_budget_is_refused_for_grpo():
    """GRPO's micro-batches are built per sample count: a token budget would be silently ignored."""
    from megatron_opsd.config import load_config
    from megatron_opsd.config_io import ConfigError

    with pytest.raises(ConfigError, match="token-budget batching does not apply to loss.mode=grpo"):
        load_config(None, ["--loss.mode", "grpo", "--rollout.samples_per_prompt", "4",
                           "--train.max_tokens_per_micro_batch", "512"])
