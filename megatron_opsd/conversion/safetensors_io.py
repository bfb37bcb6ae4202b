"""Streaming safetensors I/O: read and write one tensor at a time.

Why not ``safetensors.safe_open`` / ``save_file``: ``safe_open`` memory-maps the file and the pages a
read touches stay resident (and count in the process's RSS) until the file is closed, so reading a
single-file model costs the whole file on top of the destination weights; ``save_file`` needs every
tensor of a shard in memory at once. The format is simple (an 8-byte little-endian header length, a
JSON header of ``{name: {dtype, shape, data_offsets}}`` offsets relative to the data start, then the
raw little-endian bytes), so both directions stream here with plain file reads and writes; tests check
the files against the ``safetensors`` library both ways.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in ``file``
    end: int


def read_header(file: str | Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Tensor descriptions of one safetensors file (in data order) and its metadata."""
    file = Path(file)
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    infos = []
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        infos.append(TensorInfo(name, file, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                start + begin, start + end))
    infos.sort(key=lambda i: i.begin)
    return infos, metadata


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of an HF checkpoint: the index's shards, or the single file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return [directory / f for f in files]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors "
                            "checkpoints are supported; convert .bin with transformers first)")


def checkpoint_infos(directory: str | Path) -> list[TensorInfo]:
    """Every tensor of an HF checkpoint directory, file by file in data order.

    With an index, each tensor must live in the shard the index names (a stale index raises).
    """
    directory = Path(directory)
    infos = [i for f in checkpoint_files(directory) for i in read_header(f)[0]]
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        found = {i.name: i.file.name for i in infos}
        if found != weight_map:
            bad = sorted(set(found.items()) ^ set(weight_map.items()))[:8]
            raise ValueError(f"{index} does not match the shards' contents, e.g. {bad}")
    return infos


def read_tensors(infos: Iterable[TensorInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` reading each tensor's bytes into a fresh buffer (no mmap)."""
    handle, current = None, None
    try:
        for info in infos:
            if info.file != current:
                if handle:
                    handle.close()
                handle, current = open(info.file, "rb"), info.file
            nbytes = info.end - info.begin
            expected = math.prod(info.shape) * _itemsize(info.dtype)
            if nbytes != expected:
                raise ValueError(f"{info.file}: tensor {info.name!r} has {nbytes} bytes, its shape "
                                 f"{info.shape} and dtype need {expected}")
            buffer = bytearray(nbytes)
            handle.seek(info.begin)
            if handle.readinto(buffer) != nbytes:
                raise ValueError(f"{info.file}: truncated while reading tensor {info.name!r}")
            tensor = torch.frombuffer(buffer, dtype=info.dtype) if nbytes else torch.empty(0, dtype=info.dtype)
            yield info.name, tensor.reshape(info.shape)
    finally:
        if handle:
            handle.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# ---- writing --------------------------------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """'5GB', '200MB', '1.5GiB', '512KB' or a byte count -> bytes (decimal units as transformers)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    unit = next((u for u in units if text.endswith(u)), "")
    try:
        value = int(float(text[: len(text) - len(unit)]) * units.get(unit, 1))
    except (ValueError, OverflowError):  # not a number; inf
        value = 0
    if value <= 0:
        raise ValueError(f"--max-shard-size {size!r}: expected a positive size such as 5GB, 500MB, 1.5GiB or a "
                         "byte count")
    return value


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedWriter:
    """Writes tensors, in the order of ``specs``, into safetensors file(s) under ``directory``.

    One file ``model.safetensors`` when everything fits in ``max_shard_bytes``; otherwise
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (as transformers).
    Headers are written up front from the specs; ``write`` checks name, dtype and shape against them.
    """

    def __init__(self, directory: str | Path, specs: list[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.shards = plan_shards(specs, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                   for i in range(n)]
        self._queue = [(f, s) for f, shard in zip(self.files, self.shards) for s in shard]
        self._position = 0
        self._handle = None
        self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._position >= len(self._queue):
            raise ValueError(f"unexpected extra tensor {name!r}: every planned tensor was written")
        file, spec = self._queue[self._position]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise ValueError(f"tensor {name!r} {tensor.dtype} {tuple(tensor.shape)} does not match the plan: "
                             f"{spec.name!r} {spec.dtype} {spec.shape}")
        if file != self._file:
            self._open(file)
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._position += 1

    def close(self) -> None:
        """Finish the last file and write the index (raises if tensors are missing)."""
        if self._position != len(self._queue):
            missing = [s.name for _, s in self._queue[self._position:]]
            raise ValueError(f"{len(missing)} planned tensor(s) were never written: {missing[:8]}")
        if self._handle:
            self._handle.close()
            self._handle = None
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for _, s in self._queue)},
                     "weight_map": {s.name: f for f, s in self._queue}}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _open(self, file: str) -> None:
        if self._handle:
            self._handle.close()
        shard = self.shards[self.files.index(file)]
        header, offset = {"__metadata__": self.metadata}, 0
        for spec in shard:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes
        self._handle = open(self.directory / file, "wb")
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)
        self._file = file

