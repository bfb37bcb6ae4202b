"""A GGUF file (llama.cpp's format) -> an ordinary HF directory that the converter and transformers read.

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=...)``, with the ``gguf`` package),
dequantizing every tensor to fp32, but refuses ``save_pretrained`` of the result ("quantized with gguf,
not serializable"). Here the dequantized state dict is written with our safetensors writer instead,
next to ``config.json`` (architectures and dtype filled in; GGUF-loading fields dropped),
``generation_config.json`` and the tokenizer with its chat template (``tokenizer.save_pretrained``).
Tied embeddings stay tied: no ``lm_head.weight`` is written.

Only the families the converter supports are accepted (``models.description.FAMILIES``); other GGUF
architectures are refused by name before any weight is read. The output is written to ``<out>.tmp``
and renamed; an existing non-empty ``out`` is refused (the GGUF file itself is only read).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_opsd.conversion.files import check_output_dir, staging
from megatron_opsd.conversion.safetensors_io import ShardedWriter, TensorSpec, parse_size
from megatron_opsd.models.description import FAMILIES, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# GGUF ``general.architecture`` values of the supported families (Mistral GGUFs usually say llama).
GGUF_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}
# GGUF stores norms in F32 whatever the model's dtype; the large matrices tell the source dtype.
_UNQUANTIZED = {"F32": None, "F16": "fp16", "BF16": "bf16"}


@contextlib.contextmanager
def gguf_parsed_once(path: Path) -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader(path)`` returns one shared reader, and
    ``gguf.get_tensor_name_map`` is memoised.

    Why: transformers builds a new ``GGUFReader`` for the config, the weights and the tokenizer (and the
    config twice: ``AutoModel`` reads it again), and each parses every metadata field, the tokenizer's
    ~100k strings included (~5 s each for SmolLM2-135M); its weight-name mapping then builds gguf's
    tensor-name table once per module (~400 times, ~10 s). Both are read-only after construction
    (the reader memory-maps the file read-only), so sharing them changes no result. transformers
    imports both names from ``gguf`` at each call, which is what makes them replaceable here.
    """
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    shared: dict[str, object] = {}
    path = path.resolve()

    def reader(file, *args, **kwargs):
        if args or kwargs or Path(file).resolve() != path:
            return real_reader(file, *args, **kwargs)
        if "reader" not in shared:
            shared["reader"] = real_reader(file)
        return shared["reader"]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def read_gguf_header(path: Path) -> tuple[str, set[str]]:
    """(``general.architecture``, the set of tensor storage types) of a GGUF file."""
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"--gguf {path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError, OSError) as exc:  # bad magic, truncated, no architecture
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--gguf {path}: not a readable GGUF file ({reason})") from None
    return arch, {t.tensor_type.name for t in reader.tensors}


def resolve_dtype(dtype: str, tensor_types: set[str]) -> str:
    """'auto': fp16/bf16 when every large tensor is stored so, else fp32 (quantized data dequantizes
    to fp32 exactly; rounding it to 16 bits would change the weights)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"--dtype={dtype!r}: choose auto, fp32, bf16 or fp16")
        return dtype
    kinds = {_UNQUANTIZED.get(t, "quantized") for t in tensor_types} - {None}
    return kinds.pop() if kinds in ({"fp16"}, {"bf16"}) else "fp32"


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 names the GGUF tokenizer's class ``TokenizersBackend``, which 4.x cannot load;
    ``PreTrainedTokenizerFast`` (the same tokenizer.json) loads in both."""
    if path.is_file():
        config = json.loads(path.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(config, indent=2) + "\n")


def convert_gguf_to_hf(gguf_file: str | Path, out: str | Path, *, dtype: str = "auto",
                       max_shard_size: str | int = "5GB", log=print) -> Path:
    """Write the HF directory ``out`` for ``gguf_file``; return ``out``."""
    start = time.time()
    gguf_file = Path(gguf_file)
    max_bytes = parse_size(max_shard_size)
    out = check_output_dir(out, force=False)
    with gguf_parsed_once(gguf_file):
        return _convert(gguf_file, out, dtype, max_bytes, start, log)


def _convert(gguf_file: Path, out: Path, dtype: str, max_bytes: int, start: float, log) -> Path:
    import transformers

    arch, tensor_types = read_gguf_header(gguf_file)
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"--gguf {gguf_file}: architecture {arch!r} is not supported; supported: "
                         f"{sorted(GGUF_ARCHITECTURES)}")
    target = DTYPES[resolve_dtype(dtype, tensor_types)]
    where, name = str(gguf_file.parent), gguf_file.name
    try:
        config = transformers.AutoConfig.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError) as exc:  # transformers: "GGUF model with architecture X is not supported"
        raise ValueError(f"--gguf {gguf_file}: architecture {arch!r} is not supported (transformers: "
                         f"{str(exc).splitlines()[0]}); supported families: {sorted(FAMILIES)}") from None
    if config.model_type not in FAMILIES:
        raise ValueError(f"--gguf {gguf_file}: architecture {arch!r} (model_type {config.model_type!r}) is not "
                         f"supported; supported families: {sorted(FAMILIES)}")
    ModelConfig.from_hf_dict(config.to_dict())  # refuses options the converter cannot express, up front

    model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; transformers re-ties it
    specs = [TensorSpec(k, target, tuple(v.shape)) for k, v in state.items()]

    config.architectures = [FAMILIES[config.model_type][0]]
    config.dtype = str(target).removeprefix("torch.")
    for field in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, field):
            delattr(config, field)
    with staging(out) as tmp:
        writer = ShardedWriter(tmp, specs, max_bytes)
        for key, value in state.items():
            writer.write(key, value.to(target))
        writer.close()
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
    log(f"converted {gguf_file} -> {out} ({config.model_type}, {config.dtype}, {len(writer.files)} file(s), "
        f"{time.time() - start:.1f}s)")
    return out
