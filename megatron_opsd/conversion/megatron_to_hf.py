"""megatron-core distributed checkpoint (+ model.json) -> HF safetensors checkpoint.

Single process, streaming: the model's tensors are read from the dist checkpoint one checkpoint key
at a time, unsharded (megatron-core stores each as one global tensor, layers stacked on dim 0, in
Transformer Engine names: ``DIST_GLOBAL`` / ``DIST_LAYER`` map them to the unsharded local-spec names),
mapped by ``hf_mapping.unsharded_to_hf`` and written tensor by tensor into safetensors files
(``safetensors_io.ShardedWriter``). Any layout that wrote the checkpoint reads the same (the
dist checkpoint records global shapes); padded vocabulary rows are dropped by the mapping.
Peak memory: the largest stacked tensor (e.g. every layer's fc1) plus one layer's split copies.

Accepted inputs: a directory with ``model.json`` holding either a model checkpoint written by
``checkpoint.save_model`` / ``convert_hf_to_megatron``, or a training checkpoint whose dist checkpoint
holds the model next to other state (optimizer, teacher, RNG, ...): only the model's tensors are read.
A training run's checkpoint root (``step_*`` directories and a ``latest`` pointer) means its latest. The
model's tensor keys may carry a prefix (e.g. ``model.``): it is the shortest prefix ``P`` such that
``P + 'embedding.word_embeddings.weight'`` is a tensor of the checkpoint (optimizer state keys embed
the model key after a longer prefix).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

from megatron_opsd.conversion.files import (check_output_dir, copy_tokenizer_files, find_tokenizer_dir,
                                            has_tokenizer, staging)
from megatron_opsd.conversion.safetensors_io import ShardedWriter, TensorSpec, parse_size
from megatron_opsd.models.description import ModelConfig
from megatron_opsd.models.hf_mapping import ConversionError, unsharded_to_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ANCHOR = "embedding.word_embeddings.weight"  # every model checkpoint has it (first stage)

# Dist-checkpoint key (relative to the model prefix) -> unsharded local-spec name. megatron-core's
# local-spec sharded_state_dict uses the Transformer Engine names, so both specs write these keys.
DIST_GLOBAL = {
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight": "decoder.final_layernorm.weight",
    "output_layer.weight": "output_layer.weight",
}
# decoder.layers.<key> [num_layers, ...] -> decoder.layers.{i}.<name>
DIST_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias": "self_attention.linear_qkv.bias",
    "self_attention.q_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight": "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight",
}
# Mixtures of experts (MoE layers; megatron-core writes one key per layer, ``decoder.layers.{i}.<key>``,
# for every layer of a model whose moe_layer_freq is a list, dense ones included).
DIST_LAYER.update({
    "mlp.router.weight": "mlp.router.weight",
    "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts.linear_fc1.weight",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.linear_fc2.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_experts.gate_weight",
})
# Routed experts stacked [num_experts, ...] -> decoder.layers.{i}.mlp.experts.local_experts.{j}.<name>
DIST_EXPERTS = {
    "mlp.experts.experts.linear_fc1.weight": "linear_fc1.weight",
    "mlp.experts.experts.linear_fc2.weight": "linear_fc2.weight",
}
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MODEL_NAMESPACES = ("embedding.", "decoder.", "output_layer.")


def _layer_key(rel: str) -> tuple[int | None, str | None]:
    """(layer index or None when stacked over layers, key within the layer) of a dist key; (None, None)
    for a global tensor."""
    if not rel.startswith("decoder.layers."):
        return None, None
    match = _PER_LAYER.match(rel)
    if match:
        return int(match.group(1)), match.group(2)
    return None, rel[len("decoder.layers."):]


def find_model_prefix(tensor_keys) -> str:
    """The prefix of the model's tensor keys in a dist checkpoint ('' for a model checkpoint)."""
    candidates = sorted((k[: -len(_ANCHOR)] for k in tensor_keys if k.endswith(_ANCHOR)), key=len)
    candidates = [c for c in candidates if c == "" or c.endswith(".")]
    if not candidates:
        raise ConversionError(f"cannot find the model in the checkpoint: no tensor named "
                              f"'<prefix>{_ANCHOR}'")
    return candidates[0]


def model_tensor_metadata(megatron_dir: str | Path) -> tuple[str, dict]:
    """(model key prefix, {dist key without prefix: ShardedTensor metadata}) of the model's tensors."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(megatron_dir))
    prefix = find_model_prefix(metadata.keys())
    model = {}
    for key, sharded in metadata.items():
        if not key.startswith(prefix) or not key[len(prefix):].startswith(_MODEL_NAMESPACES):
            continue  # optimizer state, RNG, ...: not read
        rel = key[len(prefix):]
        _, layer_key = _layer_key(rel)
        if rel not in DIST_GLOBAL and layer_key not in DIST_LAYER and layer_key not in DIST_EXPERTS:
            raise ConversionError(f"unknown model tensor {key!r} in the dist checkpoint (no entry in "
                                  "DIST_GLOBAL / DIST_LAYER)")
        model[rel] = sharded
    return prefix, model


def resolve_checkpoint_dir(directory: str | Path, log=print) -> Path:
    """``checkpoint_paths.resolve_weights`` for ``--megatron-dir`` (a checkpoint directory holding
    model.json, or a training run's checkpoint root: its latest step), saying which step a root gave."""
    from megatron_opsd.checkpoint_paths import resolve_weights

    resolved = resolve_weights(directory, "--megatron-dir")
    if resolved != Path(directory):
        log(f"{directory} is a checkpoint root: using its latest checkpoint {resolved.name}")
    return resolved


def checkpoint_dtype(megatron_dir: str | Path) -> torch.dtype:
    """The stored dtype of the model's weight matrices (a bf16/fp16 model keeps its norms in fp32)."""
    _, tensors = model_tensor_metadata(megatron_dir)
    return tensors[_ANCHOR].dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def export_tokenizer_dir(megatron_dir: Path, tokenizer_dir: str | Path | None) -> Path:
    """The directory whose tokenizer files the export carries: ``tokenizer_dir`` when given, else the
    checkpoint's own or its run's base model's (``files.find_tokenizer_dir``); refuses when none."""
    if tokenizer_dir is not None:
        if not has_tokenizer(tokenizer_dir):
            raise ValueError(f"--tokenizer-dir {tokenizer_dir} holds no tokenizer.json/tokenizer_config.json")
        return Path(tokenizer_dir)
    found = find_tokenizer_dir(megatron_dir)
    if found is None:
        raise ValueError(f"{megatron_dir} holds no tokenizer files and its run config names no HF tokenizer "
                         "directory: pass --tokenizer-dir DIR (e.g. the HF model the run started from), or "
                         "--no-tokenizer to export the weights alone")
    return found


def stream_unsharded(megatron_dir: str | Path, cfg: ModelConfig, *, meta: bool = False):
    """Yield the checkpoint's unsharded ``(local-spec name, tensor)`` pairs, one dist key per read.

    ``meta=True`` yields meta tensors of the right shapes without reading any data (for planning).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    prefix, tensors = model_tensor_metadata(megatron_dir)
    for rel, info in tensors.items():
        shape, dtype = tuple(info.global_shape), info.dtype
        if meta:
            value = torch.empty(shape, dtype=dtype, device="meta")
        else:
            request = {"t": ShardedTensor.from_rank_offsets(prefix + rel, torch.empty(shape, dtype=dtype))}
            # Whole tensors on a world of one: skip the check that ranks tile the tensor exactly.
            value = dist_checkpointing.load(request, str(megatron_dir), validate_access_integrity=False)["t"]
        if rel in DIST_GLOBAL:
            yield DIST_GLOBAL[rel], value
            continue
        layer, key = _layer_key(rel)
        if layer is not None:  # one layer's tensor (MoE models)
            if layer >= cfg.num_hidden_layers:
                raise ConversionError(f"dist tensor {prefix + rel!r} is for layer {layer}, model.json says "
                                      f"num_hidden_layers={cfg.num_hidden_layers}")
            if key in DIST_EXPERTS:
                for j in range(shape[0]):
                    yield f"decoder.layers.{layer}.mlp.experts.local_experts.{j}.{DIST_EXPERTS[key]}", value[j]
            else:
                yield f"decoder.layers.{layer}.{DIST_LAYER[key]}", value
            del value
            continue
        if shape[0] != cfg.num_hidden_layers:
            raise ConversionError(f"dist tensor {prefix + rel!r} stacks {shape[0]} layers, model.json says "
                                  f"num_hidden_layers={cfg.num_hidden_layers}")
        name = DIST_LAYER[rel[len("decoder.layers."):]]
        for i in range(cfg.num_hidden_layers):
            yield f"decoder.layers.{i}.{name}", value[i]
        del value


def checkpoint_model_info(megatron_dir: str | Path) -> tuple[str, torch.dtype]:
    """(key prefix of the model's tensors, their stored dtype) from the dist checkpoint's metadata."""
    prefix, tensors = model_tensor_metadata(megatron_dir)
    return prefix, tensors[_ANCHOR].dtype


def load_into(chunks: list[torch.nn.Module], megatron_dir: str | Path, prefix: str | None = None) -> None:
    """Load the model weights of a (model or training) dist checkpoint into ``chunks``, any layout.

    Through megatron-core's ``sharded_state_dict`` (resharding to the chunks' layout); other state in
    the checkpoint (optimizer, ...) is not read. Casts to the chunks' dtype.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_opsd.checkpoint import load_module_state

    if prefix is None:
        prefix, _ = checkpoint_model_info(megatron_dir)
    # ShardedTensor keys are global (layer offsets included), so the nesting of this dict is free.
    sharded = {f"chunk{i}": c.sharded_state_dict(prefix=prefix) for i, c in enumerate(chunks)}
    # megatron-core's words: "unexpected" = requested but absent from the checkpoint; "missing" = in
    # the checkpoint but not requested (a training checkpoint's optimizer, teacher, RNG: expected).
    state, not_requested, absent = dist_checkpointing.load(sharded, str(megatron_dir),
                                                           strict=StrictHandling.RETURN_ALL)
    check_model_keys(megatron_dir, prefix, absent, not_requested)
    for i, chunk in enumerate(chunks):
        load_module_state(chunk, {k[len(prefix):]: v for k, v in state[f"chunk{i}"].items()})


def check_model_keys(megatron_dir, prefix: str, absent: set[str], not_requested: set[str]) -> None:
    """Refuse a checkpoint that lacks tensors the model needs, or holds model tensors (under ``prefix``)
    the model does not have (another model shape or family); other state is ignored."""
    import torch.distributed as dist

    foreign = sorted(k for k in not_requested if k.startswith(prefix) and
                     k[len(prefix):].startswith(_MODEL_NAMESPACES) and not k.endswith("_extra_state"))
    # a TE-spec model asks for _extra_state (FP8 metadata) that local-spec checkpoints lack: optional
    from megatron_opsd.checkpoint import is_extra_state

    absent = {k for k in absent if not is_extra_state(k)}
    flags = torch.tensor([float(bool(absent))])
    if dist.is_initialized():  # "absent" may differ across ranks: every rank raises or none
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags.item():
        raise ConversionError(f"{megatron_dir}: the checkpoint lacks model tensor(s) "
                              f"{sorted(absent)[:8] or '(on another rank)'}")
    if foreign:
        raise ConversionError(f"{megatron_dir}: the checkpoint holds model tensor(s) this model does not have: "
                              f"{foreign[:8]} (model.json describes another model?)")


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """``config.json`` content: both rope spellings (transformers 4.x and 5.x) and the dtype."""
    out = cfg.to_hf_dict()
    if cfg.rope_scaling:  # 4.x (>= 4.43, the first with llama3 scaling) reads rope_scaling["rope_type"]
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        out["rope_scaling"] = {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"}, "rope_type": kind}
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    out["torch_dtype"] = out["dtype"] = name
    out["use_cache"] = True
    return out


def convert_megatron_to_hf(megatron_dir: str | Path, out: str | Path, *, dtype: str = "auto",
                           max_shard_size: str | int = "5GB", tokenizer_dir: str | Path | None = None,
                           with_tokenizer: bool = True, force: bool = False, adapter_only: bool = False,
                           log=print) -> Path:
    """Convert the checkpoint in ``megatron_dir`` to an HF directory ``out``; return ``out``.

    A LoRA run's checkpoint exports merged (W + (alpha / r) B A over the base it records, merged in fp32,
    stored in the base's dtype), or with ``adapter_only`` as a PEFT adapter directory for that base."""
    from megatron_opsd.checkpoint import lora_checkpoint, read_model_json
    from megatron_opsd.models.lora import merge_adapters, read_checkpoint_adapters, write_peft_adapter
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("convert_megatron_to_hf runs in a single process: do not launch it with torchrun")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}: choose auto, fp32, bf16 or fp16")
    start = time.time()
    max_bytes = parse_size(max_shard_size)
    megatron_dir = resolve_checkpoint_dir(megatron_dir, log)
    out = check_output_dir(out, force)
    cfg = read_model_json(megatron_dir)
    lora = lora_checkpoint(megatron_dir)
    if adapter_only and lora is None:
        raise ValueError(f"--adapter-only: {megatron_dir} is not a LoRA run's checkpoint (no adapters to export)")
    tokenizer_source = export_tokenizer_dir(megatron_dir, tokenizer_dir) if with_tokenizer and not adapter_only \
        else None

    runtime = init_parallel(ParallelConfig())  # dist_checkpointing.load needs a process group
    try:
        adapters = read_checkpoint_adapters(megatron_dir) if lora is not None else None
        if adapter_only:
            with staging(out) as tmp:
                write_peft_adapter(tmp, adapters, lora[0], cfg, base_model=str(lora[1]))
            log(f"exported the LoRA adapters of {megatron_dir} -> {out} (PEFT; base {lora[1]})")
            return out
        source = megatron_dir if lora is None else lora[1]  # a LoRA checkpoint: its base, adapters merged

        def hf_tensors():
            stream = unsharded_to_hf(stream_unsharded(source, cfg), cfg)
            return stream if lora is None else merge_adapters(stream, adapters, lora[0].scaling)

        target = DTYPES[dtype] if dtype != "auto" else checkpoint_dtype(source)
        # The plan (names, shapes, shard boundaries) comes from the mapping run on meta tensors.
        specs = [TensorSpec(n, target, tuple(t.shape))
                 for n, t in unsharded_to_hf(stream_unsharded(source, cfg, meta=True), cfg)]
        # The largest change the cast makes to a weight: a bf16 run's fp32 norms, which training moved
        # off the bf16 grid, or any weight under a narrower --dtype.
        rounding = (0.0, "", target)
        with staging(out) as tmp, torch.no_grad():
            writer = ShardedWriter(tmp, specs, max_bytes)
            for name, tensor in hf_tensors():
                cast = tensor.to(target)
                if tensor.dtype != target and tensor.numel():
                    change = (cast.to(tensor.dtype) - tensor).abs().max().item()
                    rounding = max(rounding, (change, name, tensor.dtype), key=lambda r: r[0])
                writer.write(name, cast)
            writer.close()
            (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, target), indent=2) + "\n")
            if tokenizer_source is not None:
                copy_tokenizer_files(tokenizer_source, tmp)
    finally:
        runtime.destroy()
    change, where, source = rounding
    if change > 0:
        log(f"warning: exporting {_dtype_name(target)} rounds the checkpoint's {_dtype_name(source)} weights: "
            f"max |change| {change:.3e} ({where}); --dtype {_dtype_name(source)} keeps them exactly")
    log(f"converted {megatron_dir} -> {out} ({cfg.model_type}, {str(target).removeprefix('torch.')}, "
        f"{len(writer.files)} file(s), "
        f"{time.time() - start:.1f}s)")
    return out
