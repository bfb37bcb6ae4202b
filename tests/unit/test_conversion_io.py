"""Streaming safetensors I/O against the safetensors library, the exported config.json, the logit
comparison, and the converters' refusals (all before any model is built: single process, fast)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_opsd.conversion.safetensors_io import (INDEX_FILE, ShardedWriter, TensorSpec, checkpoint_infos,
                                                     parse_size, read_tensors)
from megatron_opsd.conversion.verify import compare_logits
from megatron_opsd.models.description import ModelConfig
from tests.hf_fixtures import hf_config, save_hf_model


def tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(7, 5, generator=gen), "b.bias": torch.randn(3, generator=gen).bfloat16(),
            "c.scale": torch.randn(2, 2, 2, generator=gen).half(), "d.empty": torch.zeros(0, 4)}


def test_reader_matches_safetensors_library(tmp_path):
    expected = tensors()
    save_file(expected, tmp_path / "model.safetensors")
    got = dict(read_tensors(checkpoint_infos(tmp_path)))
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value)


def test_reader_follows_index_and_rejects_a_stale_one(tmp_path):
    save_hf_model("qwen3", tmp_path, max_shard_size="50KB", tokenizer=False)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    got = dict(read_tensors(checkpoint_infos(tmp_path)))
    assert set(got) == set(index["weight_map"])
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / file, "pt") as f:
            assert torch.equal(got[name], f.get_tensor(name)), name
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = next(f for f in sorted(set(index["weight_map"].values()))
                                     if f != index["weight_map"][name])
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not match"):
        checkpoint_infos(tmp_path)


def test_missing_checkpoint_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint_infos(tmp_path)


@pytest.mark.parametrize("max_bytes,num_files", [(10**9, 1), (20, 3)])  # 20: 140 B alone; 6 B; 16 B + 0 B
def test_writer_output_reads_back_with_safetensors(tmp_path, max_bytes, num_files):
    values = tensors()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in values.items()]
    writer = ShardedWriter(tmp_path, specs, max_bytes)
    for name, value in values.items():
        writer.write(name, value)
    writer.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == num_files
    loaded = {}
    for file in files:
        loaded.update(load_file(file))
        with safe_open(file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert set(loaded) == set(values)
    assert all(torch.equal(loaded[n], values[n]) and loaded[n].dtype == values[n].dtype for n in values)
    if num_files > 1:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
        assert set(index["weight_map"]) == set(values)
        assert all((tmp_path / f).is_file() for f in index["weight_map"].values())
    else:
        assert not (tmp_path / INDEX_FILE).exists()


def test_writer_refuses_unplanned_or_missing_tensors(tmp_path):
    specs = [TensorSpec("x", torch.float32, (2,)), TensorSpec("y", torch.float32, (3,))]
    writer = ShardedWriter(tmp_path, specs, 10**6)
    with pytest.raises(ValueError, match="'y'.*does not match the plan: 'x'"):
        writer.write("y", torch.zeros(3))
    with pytest.raises(ValueError, match=r"torch.float32 \(4,\) does not match"):
        writer.write("x", torch.zeros(4))
    writer.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="never written.*'y'"):
        writer.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200MB") == 2 * 10**8
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("512") == 512 and parse_size(7) == 7


def test_exported_config_has_both_rope_spellings_and_reloads_in_transformers(tmp_path):
    import transformers

    from megatron_opsd.conversion.megatron_to_hf import hf_config_dict

    reference = hf_config("llama")
    cfg = ModelConfig.from_hf_dict(reference.to_dict())
    exported = hf_config_dict(cfg, torch.bfloat16)
    # transformers 4.x reads rope_theta / rope_scaling (it ignores rope_parameters); 5.x reads both
    assert exported["rope_theta"] == 500000.0
    assert exported["rope_scaling"]["rope_type"] == "llama3"
    assert exported["rope_scaling"]["factor"] == 8.0 and exported["rope_scaling"]["high_freq_factor"] == 4.0
    assert exported["rope_parameters"]["rope_theta"] == 500000.0
    assert exported["rope_parameters"]["rope_type"] == "llama3"
    assert exported["torch_dtype"] == "bfloat16" and exported["architectures"] == ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(exported))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_parameters"):
        assert getattr(loaded, key) == getattr(reference, key), key


def test_compare_logits_metrics():
    ref = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    same = compare_logits(ref, ref.clone())
    assert same.max_abs_diff == 0.0 and same.mean_kl == 0.0 and same.argmax_agreement == 1.0
    assert same.num_tokens == 10 and same.passed(1e-6)
    other = ref.clone()
    other[0, 0] = -other[0, 0]  # one token's distribution flipped
    c = compare_logits(ref, other)
    expected_kl = torch.nn.functional.kl_div(other.double().log_softmax(-1), ref.double().log_softmax(-1),
                                             log_target=True, reduction="none").sum(-1).mean().item()
    assert c.mean_kl == pytest.approx(expected_kl, rel=1e-12) and c.mean_kl > 0
    assert c.max_abs_diff == pytest.approx(2 * ref[0, 0].abs().max().item())
    assert c.argmax_agreement == pytest.approx(9 / 10)
    assert not c.passed(1e-4)


# ---- refusals (raised before any model is built) ----------------------------------------------------
def write_hf_config(directory, family, **overrides):
    directory.mkdir(parents=True, exist_ok=True)
    hf_config(family, **overrides).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family,overrides,message", [
    ("llama", {"attention_bias": True}, "attention_bias=True is not supported for llama"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True is not supported"),
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_scaling type 'yarn' is not supported"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "low_freq_factor=2.0 is not supported"),
])
def test_unsupported_configs_are_refused(tmp_path, family, overrides, message):
    from megatron_opsd.conversion.hf_to_megatron import convert_hf_to_megatron

    hf = write_hf_config(tmp_path / "hf", family, **overrides)
    with pytest.raises(ValueError, match=message):
        convert_hf_to_megatron(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout,message", [
    (dict(tp=3), "num_attention_heads=4 is not divisible by parallel.tp=3"),
    (dict(pp=3), "num_hidden_layers=4 is not divisible by parallel.pp"),
    (dict(pp=2, vpp=4), r"num_hidden_layers=4 is not divisible by parallel.pp \* vpp = 8"),
    (dict(tp=8), "num_attention_heads=4 is not divisible by parallel.tp=8"),
])
def test_layouts_are_validated_against_the_model(tmp_path, layout, message):
    from megatron_opsd.conversion.hf_to_megatron import convert_hf_to_megatron

    hf = write_hf_config(tmp_path / "hf", "qwen2")
    with pytest.raises(ValueError, match=message):
        convert_hf_to_megatron(hf, tmp_path / "out", **layout)


def test_sequences_longer_than_a_sliding_window_are_refused(tmp_path):
    from megatron_opsd.conversion.cli import hf_to_megatron_main

    hf = write_hf_config(tmp_path / "hf", "mistral")  # sliding_window=64
    with pytest.raises(ValueError, match="sequence length 65 exceeds sliding_window=64"):
        hf_to_megatron_main(["--hf-dir", str(hf), "--out", str(tmp_path / "out"), "--max-seq-len", "65"])
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_force(tmp_path):
    from megatron_opsd.conversion.cli import hf_to_megatron_main, megatron_to_hf_main

    hf = write_hf_config(tmp_path / "hf", "qwen2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        hf_to_megatron_main(["--hf-dir", str(hf), "--out", str(out)])
    meg = tmp_path / "meg"  # a weightless converted checkpoint: the input must be valid for the out check
    meg.mkdir()
    (meg / "model.json").write_text(json.dumps(ModelConfig().to_hf_dict()))
    from torch.distributed.checkpoint.metadata import Metadata
    (meg / ".metadata").write_bytes(__import__("pickle").dumps(Metadata(state_dict_metadata={}, storage_data={})))
    with pytest.raises(FileExistsError, match="--force"):
        megatron_to_hf_main(["--megatron-dir", str(meg), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "user data"


def test_staging_publishes_or_cleans_up_and_leaves_neighbours_alone(tmp_path):
    from megatron_opsd.conversion.files import staging

    out = tmp_path / "model"
    for neighbour in ("model.tmp", "model.old"):  # a user's directories next to the output
        (tmp_path / neighbour).mkdir()
        (tmp_path / neighbour / "keep.txt").write_text("user data")
    with pytest.raises(RuntimeError):
        with staging(out) as tmp:
            (tmp / "half.bin").write_text("partial")
            raise RuntimeError("interrupted")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.old", "model.tmp"]
    for version in ("first", "second"):  # the second replaces the first (as --force does)
        with staging(out) as tmp:
            (tmp / "weights.bin").write_text(version)
    assert (out / "weights.bin").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.old", "model.tmp"]
    assert all((tmp_path / n / "keep.txt").read_text() == "user data" for n in ("model.old", "model.tmp"))


def test_atomic_save_leaves_neighbours_alone(tmp_path):
    """Checkpoints and convert_hf_to_megatron's output go through atomic_save: a user's <out>.tmp and
    <out>.old survive it (they were deleted before), its own leftover of an interrupted save does not."""
    from megatron_opsd.checkpoint import atomic_save

    out = tmp_path / "model"
    for neighbour in ("model.tmp", "model.old"):
        (tmp_path / neighbour).mkdir()
        (tmp_path / neighbour / "keep.txt").write_text("user data")
    (tmp_path / ".model.tmp-crashed").mkdir()  # what an interrupted save leaves
    for version in ("first", "second"):
        atomic_save(lambda tmp, v=version: (tmp / "weights.bin").write_text(v), out)
    assert (out / "weights.bin").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.old", "model.tmp"]
    assert all((tmp_path / n / "keep.txt").read_text() == "user data" for n in ("model.old", "model.tmp"))


def test_gguf_conversion_parses_the_file_once(tmp_path, monkeypatch):
    """Inside ``gguf_parsed_once`` our header read and transformers' GGUF loader (which the conversion
    calls for the config, twice, the weights and the tokenizer) share one parsed reader, gguf's
    tensor-name table is built once per (arch, layers), and both names are gguf's own again afterwards.
    A tiny GGUF written with the ``gguf`` package's writer."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from megatron_opsd.conversion.gguf_to_hf import gguf_parsed_once, read_gguf_header

    paths = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for path in paths:
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    real_name_map = gguf.get_tensor_name_map
    with gguf_parsed_once(paths[0]):
        assert read_gguf_header(paths[0]) == ("llama", {"F32"})
        for _ in range(2):
            load_gguf_checkpoint(str(paths[0].resolve()), return_tensors=False)
        gguf.GGUFReader(str(paths[1]))  # another file: its own reader
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert parsed == [str(paths[0]), str(paths[1])]
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is real_name_map
