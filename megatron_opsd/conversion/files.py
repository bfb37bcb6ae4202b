"""Files that travel with the weights (tokenizer, generation config) and output-directory handling.

The tokenizer travels with the model: conversion copies it into the converted directory and records
its fingerprint (size, special ids, vocabulary hash) in ``conversion.json``; training copies it into
every step directory (``save_tokenizer_files``); export takes it from the step directory, else from the
run's base model named in the checkpoint's saved config (``find_tokenizer_dir``). A tokenizer given by
the user is checked against the model's (``model_tokenizer``).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from megatron_opsd.checkpoint import publish, staging_dir

# Copied verbatim between HF and megatron directories when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer/generation files present in ``src`` into ``dst``; return their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _default_tokenizer_path() -> str:
    import dataclasses

    from megatron_opsd.data.config import DataConfig

    return next(f.default for f in dataclasses.fields(DataConfig) if f.name == "tokenizer_path")


DEFAULT_TOKENIZER_PATH = _default_tokenizer_path()
"""``data.tokenizer_path`` when the user sets none (the toy tokenizer of the shipped data)."""


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds an HF tokenizer."""
    return any((Path(directory) / name).is_file() for name in HF_TOKENIZER_FILES)


def save_tokenizer_files(tokenizer_path: str | Path | None, directory: str | Path) -> list[str]:
    """Copy the run's tokenizer (an HF tokenizer directory; a sentencepiece file is not copied) into a
    checkpoint ``directory`` being written; return the names copied. The checkpoint saver calls this
    on rank 0, before the directory is published, so exports and generation find the tokenizer."""
    if tokenizer_path is None or not Path(tokenizer_path).is_dir():
        return []
    return copy_tokenizer_files(tokenizer_path, directory)


def recorded_fingerprint(model_dir: str | Path) -> tuple[dict | None, str]:
    """(the tokenizer fingerprint a model directory records, where): ``conversion.json``'s, else that of
    the tokenizer files stored with the model, else None."""
    from megatron_opsd.data.tokenizer import load_tokenizer

    record = Path(model_dir) / "conversion.json"
    if record.is_file():
        try:
            fingerprint = json.loads(record.read_text()).get("tokenizer_fingerprint")
        except (ValueError, AttributeError):
            raise ValueError(f"{record}: not a valid conversion record (JSON object)") from None
        if fingerprint:
            return fingerprint, str(record)
    if has_tokenizer(model_dir):
        return load_tokenizer(model_dir).fingerprint(), f"the tokenizer files in {model_dir}"
    return None, ""


def model_tokenizer(tokenizer_path: str | Path | None, model_dir: str | Path, vocab_size: int):
    """The tokenizer to use with the model in ``model_dir``: ``tokenizer_path`` when given (refused
    when it disagrees with the model's recorded tokenizer), else the one stored with the model, else
    None. Also refuses ids past the model's embedding table."""
    from megatron_opsd.data.tokenizer import load_tokenizer

    if tokenizer_path is None:
        if not has_tokenizer(model_dir):
            return None
        tokenizer_path = model_dir
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.check_model_vocab(vocab_size)
    if Path(tokenizer_path).resolve() != Path(model_dir).resolve() or (Path(model_dir) / "conversion.json").is_file():
        recorded, where = recorded_fingerprint(model_dir)
        if recorded is not None:
            tokenizer.check_fingerprint(recorded, where)
    return tokenizer


def find_tokenizer_dir(checkpoint_dir: str | Path) -> Path | None:
    """Where the tokenizer of a checkpoint lives: the checkpoint directory itself, else (training
    checkpoints) the HF tokenizer directory or base model named by the run's saved config
    (``data.tokenizer_path``, ``train.load``), else None."""
    checkpoint_dir = Path(checkpoint_dir)
    if has_tokenizer(checkpoint_dir):
        return checkpoint_dir
    if not (checkpoint_dir / "common.pt").is_file():
        return None
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    except Exception:  # an unreadable common.pt: the caller asks for --tokenizer-dir
        return None
    config = (common.get("common") or {}).get("config") or {} if isinstance(common, dict) else {}
    for section, key in (("data", "tokenizer_path"), ("train", "load")):
        candidate = (config.get(section) or {}).get(key)
        if candidate and Path(candidate).is_dir() and has_tokenizer(candidate):
            return Path(candidate)
    return None


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an existing non-empty ``out`` unless ``force`` (it is then replaced atomically)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"output {out} exists and is not empty: choose another --out or pass --force "
                              "to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def staging(out: Path):
    """A fresh directory next to ``out`` to write the output into (``checkpoint.staging_dir``):
    published as ``out`` when the block ends, removed when it raises."""
    tmp = staging_dir(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)
