"""HF safetensors checkpoint -> megatron-core distributed checkpoint (torch_dist) + model.json.

Single process: a TP=1/PP=1 GPTModel is built in the target dtype without random init, HF tensors are
streamed in one at a time (``safetensors_io.read_tensors``), mapped (``hf_mapping.hf_to_unsharded``)
and copied into the parameters, then megatron-core saves its ``sharded_state_dict``. The sharded
state dict records global shapes and offsets, so the checkpoint loads at any TP/PP/VPP layout.
Peak memory: the model in the target dtype plus the largest HF tensor (or fused tensor's inputs);
saving adds one parameter's copy (``standalone_sharded_state_dict``) and the writer processes' own
footprint (Qwen2.5-0.5B shapes, bf16: 1.46x the model's bytes in RSS, 0.38x of it the interpreter).

Output directory: the dist checkpoint, ``model.json`` (the model description, an HF config dict),
the tokenizer files found in the HF directory, and ``conversion.json`` (source, dtype, the layout
the user asked for, validated against the model shape, and the tokenizer's fingerprint: size,
special ids, vocabulary hash, checked when a tokenizer is later given for this model). Written to ``<out>.tmp`` and renamed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from megatron_opsd.conversion.files import check_output_dir, copy_tokenizer_files, has_tokenizer
from megatron_opsd.data.tokenizer import load_tokenizer
from megatron_opsd.conversion.safetensors_io import checkpoint_infos, read_tensors
from megatron_opsd.models.description import ModelConfig
from megatron_opsd.models.hf_mapping import MEGATRON_IGNORED, ConversionError, hf_to_unsharded
from megatron_opsd.parallel import ParallelConfig

CONVERSION_JSON = "conversion.json"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_layout(cfg: ModelConfig, tp: int, pp: int, vpp: int | None) -> ParallelConfig:
    """The layout the user asked for, validated against the model shape (ValueError with the fix)."""
    layout = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    layout.check_model(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    if cfg.intermediate_size % tp:
        raise ValueError(f"intermediate_size={cfg.intermediate_size} is not divisible by --tp={tp}")
    return layout


def resolve_dtype(dtype: str, infos) -> str:
    """'auto' -> the HF tensors' floating dtype (fp32 if they mix dtypes)."""
    if dtype != "auto":
        if dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--dtype={dtype!r}: choose auto, fp32, bf16 or fp16")
        return dtype
    found = {i.dtype for i in infos if i.dtype.is_floating_point}
    return DTYPE_NAMES.get(found.pop(), "fp32") if len(found) == 1 else "fp32"


def load_hf_unsharded(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model description, unsharded megatron weights) of an HF checkpoint, in the HF dtype.

    For tests and tools that place HF weights into sharded models:
    ``sharding.load_unsharded(chunks, weights, tp_rank, tp, tied=cfg.tie_word_embeddings)``.
    Holds the whole model in memory (the converter streams instead: ``load_hf_into``).
    """
    cfg = ModelConfig.from_hf(hf_dir)
    infos = checkpoint_infos(hf_dir)
    return cfg, dict(hf_to_unsharded(read_tensors(infos), cfg, names=[i.name for i in infos]))


@torch.no_grad()
def load_hf_into(model: torch.nn.Module, hf_dir: str | Path, cfg: ModelConfig) -> None:
    """Stream the HF checkpoint in ``hf_dir`` into a TP=1/PP=1 ``model`` (casting to its dtype)."""
    infos = checkpoint_infos(hf_dir)
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not MEGATRON_IGNORED.search(k)}
    loaded = set()
    for name, tensor in hf_to_unsharded(read_tensors(infos), cfg, names=[i.name for i in infos]):
        param = params.get(name)
        if param is None:
            raise ConversionError(f"mapped tensor {name!r} has no parameter in the megatron model")
        if param.shape != tensor.shape:
            raise ConversionError(f"mapped tensor {name!r} has shape {tuple(tensor.shape)}, the megatron "
                                  f"parameter {tuple(param.shape)}")
        param.copy_(tensor)
        loaded.add(name)
    unset = sorted(set(params) - loaded)
    if unset:
        raise ConversionError(f"megatron parameter(s) not set from the HF checkpoint: {unset[:8]}")


def standalone_sharded_state_dict(model: torch.nn.Module) -> dict:
    """``model``'s sharded state dict for saving, without megatron's save-time copies; consumes ``model``.

    megatron-core's writer clones every tensor that is a view of a larger storage, all before writing:
    with SwiGLU that is every layer's gate and up half of fc1 at once (~40% of a model's bytes). Here
    factories are applied up front and those views are replaced by standalone copies one parameter at a
    time, releasing the parameter's own storage as we go: peak +1 parameter instead of +all fc1.
    The model's weights are unusable afterwards.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_opsd.checkpoint import model_sharded_state_dict

    sharded = model_sharded_state_dict([model])
    apply_factories(sharded)
    views: dict[int, list] = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor) and item.data is not None:
            data = item.data
            if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                views.setdefault(data.untyped_storage().data_ptr(), []).append(item)
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    for ptr, items in views.items():
        for item in items:
            item.data = item.data.detach().clone()
        if ptr in params:
            params[ptr].data = torch.empty(0, dtype=params[ptr].dtype)
    return sharded


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1,
                           vpp: int | None = None, dtype: str = "auto", max_seq_len: int | None = None,
                           force: bool = False, log=print) -> Path:
    """Convert ``hf_dir`` to a megatron-core dist checkpoint in ``out``; return ``out``.

    ``max_seq_len``: the longest sequence the checkpoint will be trained on; refused when it exceeds a
    sliding window (not implemented). Without it a shorter window is only noted: training and the
    verifier refuse longer sequences themselves.
    """
    from megatron.core import dist_checkpointing

    from megatron_opsd.checkpoint import atomic_save, write_model_json
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.parallel import init_parallel

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("convert_hf_to_megatron runs in a single process (the checkpoint it writes loads "
                         "at any layout): do not launch it with torchrun")
    start = time.time()
    hf_dir = Path(hf_dir)
    out = check_output_dir(out, force)
    cfg = ModelConfig.from_hf(hf_dir)  # refuses unsupported configs
    if max_seq_len is not None:
        cfg.check_sequence_length(max_seq_len)
    layout = check_layout(cfg, tp, pp, vpp)
    dtype = resolve_dtype(dtype, checkpoint_infos(hf_dir))
    window = cfg.effective_sliding_window
    if window is not None and window < cfg.max_position_embeddings:
        log(f"note: sliding_window={window} < max_position_embeddings={cfg.max_position_embeddings}; "
            f"sliding-window attention is not implemented, so training refuses sequences longer than {window}")

    runtime = init_parallel(ParallelConfig())
    try:
        [model] = build_model(cfg, runtime, ModelBuildConfig(dtype=dtype, init_weights=False,
                                                              transformer_engine="off"))
        load_hf_into(model, hf_dir, cfg)
        fingerprint = load_tokenizer(hf_dir).fingerprint() if has_tokenizer(hf_dir) else None
        record = {"source": str(hf_dir.resolve()), "direction": "hf_to_megatron", "dtype": dtype,
                  "layout": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp}, "max_seq_len": max_seq_len,
                  "note": "the checkpoint loads at any TP/PP/VPP layout; 'layout' is the one requested"}

        def write(tmp: Path) -> None:
            dist_checkpointing.save(standalone_sharded_state_dict(model), str(tmp))
            write_model_json(cfg, tmp)
            copied = copy_tokenizer_files(hf_dir, tmp)
            (tmp / CONVERSION_JSON).write_text(json.dumps({**record, "tokenizer_files": copied,
                                                           "tokenizer_fingerprint": fingerprint}, indent=2))

        atomic_save(write, out)
    finally:
        runtime.destroy()
    log(f"converted {hf_dir} -> {out} ({cfg.model_type}, {dtype}, {time.time() - start:.1f}s)")
    return out
