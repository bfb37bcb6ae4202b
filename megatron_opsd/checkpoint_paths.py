"""What a checkpoint path given by a user is, and whether it is what the option asks for.

Every option that takes a checkpoint directory goes through here: ``--load`` / ``checkpoint.dir`` with
``checkpoint.resume`` (a training checkpoint to resume), ``train.load`` / ``loss.opd_teacher_load`` and
the tools' ``--load`` / ``--megatron-dir`` (weights: a converted model or a training checkpoint), and
the run's outputs (``checkpoint.dir``, ``logging.dir``: writable, never inside an input).

Kinds of directory:

    converted   model.json + dist checkpoint, no ``latest`` (tools/convert_hf_to_megatron.py, the
                embedded warm-up's base model)
    step        model.json + dist checkpoint in a ``step_NNNNNNN`` directory (one training step)
    root        a training run's checkpoint directory: ``latest`` and ``step_*`` directories
    run         a directory holding ``checkpoints/`` (what a run's config names as its run directory)
    hf          a Hugging Face model (config.json + *.safetensors)
    empty, missing, file, other

The wrong kind is refused with a ``ValueError`` whose single line says what the path is and what to
pass instead. Nothing here writes anything.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

MODEL_JSON = "model.json"
LATEST = "latest"
STEP_NAME = re.compile(r"^step_(\d+)$")
CONVERT_HINT = "convert it first with tools/convert_hf_to_megatron.py"


@dataclass(frozen=True)
class Found:
    """What ``inspect`` found at ``path``."""

    kind: str
    path: Path

    def describe(self) -> str:
        return {
            "converted": f"{self.path} is a converted model (model.json, no `latest`), not a training checkpoint",
            "step": f"{self.path} is one step of a training run",
            "root": f"{self.path} is a training run's checkpoint directory",
            "run": f"no checkpoint under {self.path}; did you mean {self.path / 'checkpoints'}?",
            "hf": f"{self.path} is an HF model directory: {CONVERT_HINT}",
            "empty": f"no checkpoint under {self.path} (the directory is empty)",
            "missing": f"no checkpoint under {self.path} (it does not exist)",
            "file": f"{self.path} is a file, not a checkpoint directory",
            "other": f"no checkpoint under {self.path} (no {MODEL_JSON}, no `{LATEST}`)",
        }[self.kind]


def inspect(path: str | Path) -> Found:
    path = Path(path)
    if not path.exists():
        return Found("missing", path)
    if not path.is_dir():
        return Found("file", path)
    if (path / LATEST).exists() or any(step_dirs(path)):
        return Found("root", path)
    if (path / MODEL_JSON).is_file():
        return Found("step" if STEP_NAME.match(path.name) else "converted", path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return Found("hf", path)
    if (path / "checkpoints").is_dir():
        return Found("run", path)
    return Found("empty" if not any(path.iterdir()) else "other", path)


def step_dirs(root: Path) -> list[Path]:
    """``step_*`` directories (no ``.tmp``/``.old`` leftovers), oldest first."""
    steps = [p for p in root.iterdir() if STEP_NAME.match(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(steps, key=lambda p: int(STEP_NAME.match(p.name).group(1)))


def step_of(step_dir: Path) -> int:
    return int(STEP_NAME.match(step_dir.name).group(1))


# ---- integrity of one checkpoint directory ---------------------------------------------------------
def check_complete(directory: Path) -> None:
    """Raise a ``ValueError`` naming the file when ``directory`` is not a readable, complete checkpoint:
    model.json parses, and every file the dist checkpoint's metadata refers to exists at full length."""
    read_model_json(directory)
    from torch.distributed.checkpoint import FileSystemReader

    if not (directory / ".metadata").is_file():
        raise ValueError(f"{directory / '.metadata'} is missing: {directory} is not a complete dist checkpoint")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # a truncated or foreign pickle
        raise ValueError(f"{directory / '.metadata'} is unreadable ({type(exc).__name__}): the checkpoint "
                         "is damaged") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            raise ValueError(f"{file} is missing: the checkpoint {directory} is incomplete")
        if file.stat().st_size < size:
            raise ValueError(f"{file} is truncated ({file.stat().st_size} of {size} bytes): the checkpoint "
                             f"{directory} is damaged")


def read_model_json(directory: Path):
    """The ``ModelConfig`` in ``directory/model.json``; a broken file is named in a ``ValueError``."""
    from megatron_opsd.models.description import ModelConfig

    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MODEL_JSON}: not a megatron_opsd model checkpoint")
    try:
        return ModelConfig.from_hf_dict(json.loads(path.read_bytes().decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a valid model description: {exc}") from None


def with_previous(root: Path, problem: str, before: Path | None = None) -> ValueError:
    """``problem``, plus the newest complete step (older than ``before``) if there is one."""
    for candidate in reversed(step_dirs(root)):
        if before is not None and STEP_NAME.match(before.name) and step_of(candidate) >= step_of(before):
            continue
        try:
            check_complete(candidate)
        except (ValueError, FileNotFoundError):
            continue
        which = "previous" if before is not None else "newest"
        return ValueError(f"{problem}; the {which} complete checkpoint is {candidate}: write "
                          f"'{candidate.name}' into {root / LATEST} to resume from it")
    return ValueError(f"{problem}; no earlier complete checkpoint under {root}")


def latest_step(root: Path) -> Path:
    """The complete step that ``root/latest`` names; every failure is one line naming the file."""
    pointer = root / LATEST
    if not pointer.is_file():
        steps = step_dirs(root)
        raise with_previous(root, f"{pointer} is missing"
                             + (f" (the directory holds {steps[-1].name})" if steps else ""))
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise with_previous(root, f"{pointer} is not a text pointer "
                             "(not UTF-8)") from None
    if not STEP_NAME.match(name):
        raise with_previous(root, f"{pointer} should name a step directory (step_NNNNNNN), it holds {name[:40]!r}")
    step = root / name
    if not step.is_dir():
        raise with_previous(root, f"{pointer} names {step}, which does not exist", step)
    try:
        check_complete(step)
    except (ValueError, FileNotFoundError) as exc:
        raise with_previous(root, str(exc), step) from None
    return step


# ---- what each consumer wants ------------------------------------------------------------------
def resolve_weights(path: str | Path, option: str) -> Path:
    """The directory (holding model.json) to read model weights from, for ``option`` (``train.load``,
    ``--megatron-dir``, ...): a converted model, a training step, or a checkpoint root's latest step."""
    found = inspect(path)
    if found.kind in ("converted", "step"):
        check_complete(found.path)
        return found.path
    if found.kind == "root":
        return latest_step(found.path)
    raise ValueError(f"{option}: {found.describe()}")


def resolve_resume(path: str | Path, option: str = "--load") -> Path:
    """The latest complete step to resume from under the checkpoint root ``path``; ``option`` requires
    one (``--load``), so anything else is refused with what it is and what to pass instead."""
    found = inspect(path)
    if found.kind == "root":
        return latest_step(found.path)
    hint = {
        "converted": ": use --train.load to start a run from its weights",
        "step": f": pass its checkpoint directory {found.path.parent} to resume from the latest step, or "
                "--train.load to start a new run from these weights",
        "hf": ", then --train.load the result",
        "run": "",
    }.get(found.kind, f": {option} resumes a run; to start one, leave {option} out")
    raise ValueError(f"{option}: {found.describe()}{hint}")


def existing_checkpoint(root: str | Path) -> Path | None:
    """For resume-if-present: the latest step under ``root``, None when ``root`` holds no checkpoint,
    an error when it holds something else (a model, a broken pointer)."""
    found = inspect(root)
    if found.kind in ("missing", "empty", "other"):  # "other": e.g. a crashed first save's step_*.tmp
        return None
    if found.kind == "root":
        return latest_step(found.path)
    hint = "" if found.kind == "run" else ": checkpoints of a run go into a directory of their own"
    raise ValueError(f"checkpoint.dir: {found.describe()}{hint}")


# ---- outputs ---------------------------------------------------------------------------------------
def check_output_dir(path: str | Path, option: str, inputs: dict[str, str | Path | None]) -> None:
    """``path`` can be created or written, and is neither an input directory nor inside one."""
    path = Path(path).absolute()
    for name, given in inputs.items():
        source = Path(given).absolute() if given else None
        if source is None or not source.is_dir():  # a file (e.g. a .model tokenizer) holds no directory
            continue
        if path == source or source in path.parents:
            raise ValueError(f"{option}={path} is {'' if path == source else 'inside '}the input directory "
                             f"{name}={given}: nothing is written into an input; choose another {option}")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option}={path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only(ancestor):
        raise ValueError(f"{option}={path}: {ancestor} is not writable")


def _read_only(directory: Path) -> bool:
    """``os.access`` says yes to root on most directories; ask the file system (statvfs ST_RDONLY),
    and refuse pseudo file systems (procfs, sysfs) where nothing can be created."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return True
    return str(directory.resolve()).split(os.sep)[1:2] in (["proc"], ["sys"])
