"""Files that travel with the weights (tokenizer, generation config) and output-directory handling."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an existing non-empty ``out`` unless ``force`` (it is then replaced atomically)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"output {out} exists and is not empty: choose another --out or pass --force "
                              "to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``, replacing an existing ``out``."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
