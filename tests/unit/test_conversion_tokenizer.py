"""The tokenizer travels with the model: fingerprints, the default tokenizer of a model directory, the
check of a given one against it, and the helper the checkpoint saver calls."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_opsd.conversion.files import has_tokenizer, model_tokenizer, save_tokenizer_files
from megatron_opsd.data.tokenizer import load_tokenizer
from tests.fixtures_tokenizers import build_qwen3_style_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_qwen3_style_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def swapped_copy(src, dst, a="a", b="b"):
    """The same tokenizer with the ids of ``a`` and ``b`` exchanged: same size, another vocabulary."""
    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return dst


def model_dir_with(tmp_path, tokenizer_dir, fingerprint):
    model = tmp_path / "model"
    model.mkdir()
    save_tokenizer_files(tokenizer_dir, model)
    (model / "conversion.json").write_text(json.dumps({"tokenizer_fingerprint": fingerprint}))
    return model


def test_fingerprint_tells_vocabularies_apart(tokenizer_dir, tmp_path):
    from megatron_opsd.data.config import ARITH_DIR

    first = load_tokenizer(tokenizer_dir).fingerprint()
    assert first == load_tokenizer(tokenizer_dir).fingerprint()  # stable across loads
    other = load_tokenizer(swapped_copy(tokenizer_dir, tmp_path / "swapped")).fingerprint()
    assert other["vocab_size"] == first["vocab_size"] and other["vocab_sha256"] != first["vocab_sha256"]
    toy = load_tokenizer(ARITH_DIR / "tokenizer.model").fingerprint()  # sentencepiece too
    assert toy["vocab_size"] == load_tokenizer(ARITH_DIR / "tokenizer.model").vocab_size


def test_model_tokenizer_defaults_to_the_stored_one_and_refuses_others(tokenizer_dir, tmp_path):
    stored = load_tokenizer(tokenizer_dir)
    model = model_dir_with(tmp_path, tokenizer_dir, stored.fingerprint())
    vocab = stored.vocab_size
    assert model_tokenizer(None, model, vocab).path == str(model)       # the default: the model's own
    assert model_tokenizer(str(tokenizer_dir), model, vocab).fingerprint() == stored.fingerprint()
    swapped = swapped_copy(tokenizer_dir, tmp_path / "swapped")
    with pytest.raises(ValueError, match=r"is not the model's tokenizer recorded in .*conversion.json \(vocab_sha256"):
        model_tokenizer(str(swapped), model, vocab)
    small = build_qwen3_style_tokenizer(tmp_path / "small", vocab_size=300)
    with pytest.raises(ValueError, match=r"vocab_size \d+ vs \d+"):
        model_tokenizer(str(small), model, vocab)
    # tokenizer files replaced inside the model directory: caught against conversion.json too
    shutil.copy(swapped / "tokenizer.json", model / "tokenizer.json")
    with pytest.raises(ValueError, match="vocab_sha256"):
        model_tokenizer(None, model, vocab)


def test_model_without_record_checks_against_its_stored_files(tokenizer_dir, tmp_path):
    """A training step directory carries tokenizer files but no conversion.json."""
    step = tmp_path / "step"
    step.mkdir()
    assert save_tokenizer_files(tokenizer_dir, step) == ["tokenizer.json", "tokenizer_config.json"]
    vocab = load_tokenizer(tokenizer_dir).vocab_size
    assert model_tokenizer(None, step, vocab).path == str(step)
    with pytest.raises(ValueError, match=r"recorded in the tokenizer files in .*step"):
        model_tokenizer(str(swapped_copy(tokenizer_dir, tmp_path / "swapped")), step, vocab)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert model_tokenizer(None, bare, vocab) is None  # nothing stored: the caller decides


def test_save_tokenizer_files_copies_hf_directories_only(tokenizer_dir, tmp_path):
    from megatron_opsd.data.config import ARITH_DIR

    out = tmp_path / "out"
    out.mkdir()
    assert save_tokenizer_files(None, out) == [] and save_tokenizer_files(ARITH_DIR / "tokenizer.model", out) == []
    assert not has_tokenizer(out)
    save_tokenizer_files(tokenizer_dir, out)
    assert has_tokenizer(out) and load_tokenizer(out).fingerprint() == load_tokenizer(tokenizer_dir).fingerprint()
