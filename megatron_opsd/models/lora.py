"""LoRA adapters on megatron-core's tensor-parallel linears, one (A, B) pair per HF projection.

``linear_qkv`` fuses q, k, v and ``linear_fc1`` fuses gate and up, but each HF projection keeps its own
adapter, so adapters map 1:1 to and from PEFT (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r];
delta = (alpha / r) B A x). Tensor parallelism:

- column-parallel (``linear_qkv``, ``linear_fc1``; input replicated over TP): A is replicated, B is
  split by output rows like the layer's weight. h = A x is computed on every rank; its gradient is
  all-reduced over TP in backward (``copy_to_tensor_model_parallel_region`` on h, [s, b, r] per
  projection), so A's gradient and the adapter's input gradient are complete on every rank.
- row-parallel (``linear_proj``, ``linear_fc2``; input split over TP): A is split by input columns, B is
  replicated. The partial product A_local x_local rides the layer's own output all-reduce (appended to
  its output before the reduction: one collective, r columns wider), then B is applied to the sum.

With sequence parallelism the layers' inputs (column) and outputs (row) are sequence shards: the
column adapters all-gather h over the sequence (backward: reduce-scatter), the row adapters' partial
product rides the layer's reduce-scatter; the replicated A (column) and B (row) then see only their
sequence shard's gradient and are marked ``sequence_parallel`` so megatron sums them over TP.

The adapters are children of the attention/MLP module (``linear_qkv_lora``, ...) with their own sharded
state dict (B split on dim 0, resp. A on dim 1), so megatron's dist checkpoints reshard them to any
TP/PP layout. ``active`` switches an adapter between the student's weights (``"on"``), nothing
(``"off"``: the base model theta_0, the paper's teacher) and an exponential moving average of the
student's adapters (``"ema"``). Base weights are frozen: megatron's DDP and optimizer skip them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from dataclasses import dataclass

import torch

from megatron_opsd.config_io import doc

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# megatron linear -> (parent attribute, HF projections it fuses, column- or row-parallel)
LINEARS = {
    "linear_qkv": ("self_attention", ("q_proj", "k_proj", "v_proj"), "column"),
    "linear_proj": ("self_attention", ("o_proj",), "row"),
    "linear_fc1": ("mlp", ("gate_proj", "up_proj"), "column"),
    "linear_fc2": ("mlp", ("down_proj",), "row"),
}


@dataclass
class LoRAConfig:
    """LoRA adapters (rank 0 = full fine-tuning). The paper: rank 64, alpha 128, all seven projections."""

    rank: int = doc("Adapter rank r; 0 disables LoRA (every weight trains).", default=0)
    alpha: float = doc("Scaling numerator: delta = (alpha / rank) * B A x.", default=128.0)
    dropout: float = doc("Dropout on the adapters' input (PEFT's lora_dropout).", default=0.0)
    targets: list[str] = doc("HF projections that get adapters (PEFT target_modules names).",
                             default_factory=lambda: list(PROJECTIONS))
    init_from: str | None = doc("A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) "
                                "to start from instead of PEFT's initialisation.", default=None)

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank} must be >= 0 (0 disables LoRA)")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"lora.targets: unknown projection(s) {unknown}; choose from {list(PROJECTIONS)}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty: name at least one projection, or set lora.rank: 0")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRAAdapters(torch.nn.Module):
    """The adapters of one megatron linear (its fused HF projections), installed on that linear."""

    def __init__(self, linear: torch.nn.Module, kind: str, shapes: dict[str, tuple[int, int]], cfg: LoRAConfig,
                 tp_rank: int, tp: int, tp_group, layout=None, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.kind, self.rank, self.scaling, self.tp, self.tp_rank, self.tp_group = kind, cfg.rank, cfg.scaling, tp, \
            tp_rank, tp_group
        self.projections = [p for p in shapes if p in cfg.targets]
        self.all_projections = list(shapes)
        self.shapes = shapes  # name -> (in_full, out_full)
        self.layout = layout  # column: local deltas by projection -> the layer's fused output layout
        self.dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout else None
        self.active = "on"
        self.ema: dict[str, torch.Tensor] = {}
        dtype, device = linear.weight.dtype, linear.weight.device
        for p in self.projections:
            in_full, out_full = shapes[p]
            a_shape = (cfg.rank, in_full // tp if kind == "row" else in_full)
            b_shape = (out_full // tp if kind == "column" else out_full, cfg.rank)
            for side, shape in (("A", a_shape), ("B", b_shape)):
                param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
                split = {"column": ("B", 0), "row": ("A", 1)}[kind]
                if tp > 1 and side == split[0]:
                    # a TP shard: megatron's grad norm (and clipping) then counts every rank's part;
                    # replicated tensors (no attribute) are counted once
                    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

                    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=split[1], stride=1)
                elif sequence_parallel:
                    # replicated, but each rank's gradient covers its sequence shard only: megatron's
                    # finalize_model_grads sums such parameters' gradients over TP (as for norms)
                    param.sequence_parallel = True
                self.register_parameter(f"{p}_{side}", param)
        self._install(linear)

    # ---- weights ---------------------------------------------------------------------------------
    def weights(self, p: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = getattr(self, f"{p}_A"), getattr(self, f"{p}_B")
        if self.active == "ema":  # the fp32 averages, in the adapters' dtype
            return self.ema[f"{p}_A"].to(a.dtype), self.ema[f"{p}_B"].to(b.dtype)
        return a, b

    def shard(self, key: str, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's part of the unsharded adapter tensor ``key`` (``q_proj_A``, ...)."""
        if self.tp == 1:
            return full
        if key.endswith("_B") and self.kind == "column":
            return full.chunk(self.tp, dim=0)[self.tp_rank]
        if key.endswith("_A") and self.kind == "row":
            return full.chunk(self.tp, dim=1)[self.tp_rank]
        return full

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)  # adapters (and their EMA, when kept)
        split = ("_B", 0) if self.kind == "column" else ("_A", 1)
        axis = {key: split[1] for key in state if key.endswith(split[0])}
        return make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)

    # ---- forward -----------------------------------------------------------------------------------
    def _install(self, linear: torch.nn.Module) -> None:
        original_forward = linear.forward
        if self.kind == "column":
            def forward(input_, *args, **kwargs):
                output, bias = original_forward(input_, *args, **kwargs)
                if self.active == "off" or not self.projections:
                    return output, bias
                return output + self._column_delta(input_), bias
        else:
            original_impl = linear._forward_impl

            def forward_impl(input, weight, *args, **kwargs):  # before the layer's all-reduce
                output = original_impl(input, weight, *args, **kwargs)
                if self.active == "off" or not self.projections:
                    return output
                x = self.dropout(input) if self.dropout is not None else input
                a, _ = self.weights(self.projections[0])
                return torch.cat([output, x @ a.t()], dim=-1)

            def forward(input_, *args, **kwargs):
                output, bias = original_forward(input_, *args, **kwargs)
                if self.active == "off" or not self.projections:
                    return output, bias
                output, h = output.split([output.shape[-1] - self.rank, self.rank], dim=-1)
                _, b = self.weights(self.projections[0])
                return output + (h @ b.t()) * self.scaling, bias

            linear._forward_impl = forward_impl
        linear.forward = forward

    def _column_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                            gather_from_sequence_parallel_region)

        x = self.dropout(x) if self.dropout is not None else x
        a_all = torch.cat([self.weights(p)[0] for p in self.projections])  # [n * r, H]: one matmul
        h = x @ a_all.t()
        if self.sequence_parallel:  # x is this rank's sequence shard: all of h, backward reduce-scatters dh
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        elif self.tp > 1:  # identity forward; backward all-reduces dh over TP (B is split by rows)
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        deltas = {}
        for i, p in enumerate(self.projections):
            deltas[p] = (h[..., i * self.rank:(i + 1) * self.rank] @ self.weights(p)[1].t()) * self.scaling
        for p in self.all_projections:
            if p not in deltas:  # an untargeted projection of a fused layer
                deltas[p] = x.new_zeros(*x.shape[:-1], self.shapes[p][1] // self.tp)
        return self.layout(deltas)


def _qkv_layout(heads_per_group: int, head_dim: int):
    """megatron's fused qkv output: for each local KV group, its query heads, then k, then v."""

    def layout(d: dict[str, torch.Tensor]) -> torch.Tensor:
        q, k, v = d["q_proj"], d["k_proj"], d["v_proj"]
        lead = q.shape[:-1]
        groups = k.shape[-1] // head_dim
        q = q.reshape(*lead, groups, heads_per_group * head_dim)
        k, v = k.reshape(*lead, groups, head_dim), v.reshape(*lead, groups, head_dim)
        return torch.cat([q, k, v], dim=-1).reshape(*lead, -1)

    return layout


def _fc1_layout(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d["gate_proj"], d["up_proj"]], dim=-1)  # rank r: cat(gate shard, up shard)


def adapters(chunks: list[torch.nn.Module]):
    """(global layer index, megatron linear name, adapters) of every adapter in ``chunks``."""
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        for layer in module.decoder.layers:
            for linear, (parent, _, _) in LINEARS.items():
                found = getattr(getattr(layer, parent), f"{linear}_lora", None)
                if found is not None:
                    yield layer.layer_number - 1, linear, found


def projection_shapes(model) -> dict[str, tuple[int, int]]:
    """HF projection -> (in features, out features) of ``model`` (a ``ModelConfig``)."""
    hidden, ffn, d = model.hidden_size, model.intermediate_size, model.head_dim
    nh, ng = model.num_attention_heads, model.num_key_value_heads
    return {"q_proj": (hidden, nh * d), "k_proj": (hidden, ng * d), "v_proj": (hidden, ng * d),
            "o_proj": (nh * d, hidden), "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn),
            "down_proj": (ffn, hidden)}


def peft_shapes(model, cfg: LoRAConfig) -> dict[str, tuple[int, int]]:
    """PEFT key -> unsharded shape of every adapter tensor of ``model`` under ``cfg``."""
    io = projection_shapes(model)
    out = {}
    for layer in range(model.num_hidden_layers):
        for p in PROJECTIONS:
            if p in cfg.targets:
                out[peft_key(layer, p, "A")] = (cfg.rank, io[p][0])
                out[peft_key(layer, p, "B")] = (io[p][1], cfg.rank)
    return out


def check_lora_model(model, cfg: LoRAConfig) -> None:
    """Refuse what the adapters cannot express: MLP projections of a mixture-of-experts model (routed
    experts and the shared expert have no adapters yet; attention adapters work)."""
    mlp = [p for p in cfg.targets if p in ("gate_proj", "up_proj", "down_proj")]
    if getattr(model, "is_moe", False) and mlp:
        attention = [p for p in cfg.targets if p not in mlp] or ["q_proj", "k_proj", "v_proj", "o_proj"]
        raise ValueError(f"lora.targets {mlp}: adapters on the MLP of a mixture-of-experts model "
                         f"({model.model_type}: experts) are not supported; set lora.targets to attention "
                         f"projections, e.g. [{', '.join(attention)}]")


def attach_lora(chunks: list[torch.nn.Module], model, cfg: LoRAConfig, runtime, seed: int) -> None:
    """Freeze every base weight of ``chunks`` and give the targeted linears adapters (PEFT's init:
    A Kaiming-uniform, drawn whole from (seed, name) so every layout gets the same adapters; B zero)."""
    check_lora_model(model, cfg)
    tp = runtime.tp
    if model.num_key_value_heads % tp:
        raise ValueError(f"lora: parallel.tp={tp} above num_key_value_heads={model.num_key_value_heads} is not "
                         "supported with LoRA (replicated KV heads)")
    io = projection_shapes(model)
    shapes = {linear: {p: io[p] for p in projections} for linear, (_, projections, _) in LINEARS.items()}
    layouts = {"linear_qkv": _qkv_layout(model.num_attention_heads // model.num_key_value_heads, model.head_dim),
               "linear_fc1": _fc1_layout}
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        for param in module.parameters():
            param.requires_grad_(False)
        for layer in module.decoder.layers:
            for linear_name, (parent_name, projections, kind) in LINEARS.items():
                if not set(projections) & set(cfg.targets):
                    continue
                parent = getattr(layer, parent_name)
                linear = getattr(parent, linear_name)
                if type(linear).__name__.startswith("TE"):
                    raise ValueError("LoRA needs the local layer spec (Transformer Engine's fused layernorm-linear "
                                     "hides the adapters' input): set model_build.transformer_engine: off")
                lora = LoRAAdapters(linear, kind, shapes[linear_name], cfg, runtime.tp_rank, tp, runtime.tp_group,
                                    layouts.get(linear_name), sequence_parallel=runtime.config.sequence_parallel)
                parent.add_module(f"{linear_name}_lora", lora)
    init_adapters(chunks, seed)


@torch.no_grad()
def init_adapters(chunks: list[torch.nn.Module], seed: int) -> None:
    for layer, linear, lora in adapters(chunks):
        for p in lora.projections:
            a = getattr(lora, f"{p}_A")
            in_full = lora.shapes[p][0]
            name = f"decoder.layers.{layer}.{linear}_lora.{p}_A"
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform_(a=sqrt(5)), PEFT's and nn.Linear's default
            full = torch.empty(lora.rank, in_full).uniform_(-bound, bound, generator=generator)
            a.copy_(lora.shard(f"{p}_A", full))
            getattr(lora, f"{p}_B").zero_()


@contextlib.contextmanager
def adapters_set(chunks: list[torch.nn.Module], mode: str):
    """Run the adapters of ``chunks`` in ``mode`` ("on", "off", "ema") inside the block."""
    found = [lora for _, _, lora in adapters(chunks)]
    previous = [lora.active for lora in found]
    for lora in found:
        lora.active = mode
    try:
        yield
    finally:
        for lora, mode in zip(found, previous):
            lora.active = mode


# ---- PEFT names ------------------------------------------------------------------------------------
def peft_key(layer: int, projection: str, side: str) -> str:
    """PEFT's name of an adapter tensor of a ``*ForCausalLM`` (side "A" or "B")."""
    block = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{projection}.lora_{side}.weight"


def adapter_items(chunks: list[torch.nn.Module]):
    """(PEFT key, adapter, local attribute name) of every adapter tensor of ``chunks``."""
    for layer, _, lora in adapters(chunks):
        for p in lora.projections:
            for side in ("A", "B"):
                yield peft_key(layer, p, side), lora, f"{p}_{side}"


@torch.no_grad()
def load_peft_tensors(chunks: list[torch.nn.Module], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy unsharded PEFT adapter tensors (``peft_key`` names) into this rank's adapters."""
    for key, lora, name in adapter_items(chunks):
        if key not in tensors:
            raise ValueError(f"{source}: no tensor {key!r} (the run's lora.targets need it)")
        local = getattr(lora, name)
        value = lora.shard(name, tensors[key])
        if value.shape != local.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, this model's adapter "
                             f"needs {tuple(local.shape)} on each of {lora.tp} TP rank(s): an adapter for "
                             "another base model or rank?")
        local.copy_(value)


# ---- PEFT adapter directories ------------------------------------------------------------------------
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# PEFT options that change what an adapter computes; only their neutral values are supported
_NEUTRAL = {"use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
            "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}


def read_peft_adapter(directory: str, model, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The unsharded adapter tensors of a PEFT LoRA directory for ``model`` under ``cfg``, checked:
    rank, alpha and targets as configured, no option we do not implement, every tensor present with
    this base model's shape. Errors name the directory and the field or tensor."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    where = f"lora.init_from {directory}"
    path = Path(directory)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{where}: not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}/{ADAPTER_CONFIG}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}, only LORA adapters are supported")
    for field, neutral in _NEUTRAL.items():
        value = config.get(field, neutral)
        if value != neutral and not (neutral is None and value in ([], {})):
            raise ValueError(f"{where}: {field}={value!r} is not supported (only {neutral!r})")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or sorted(targets) != sorted(cfg.targets):
        raise ValueError(f"{where}: target_modules={targets!r} but lora.targets={sorted(cfg.targets)}: set "
                         "lora.targets to the adapter's")
    if config.get("r") != cfg.rank or float(config.get("lora_alpha", -1)) != float(cfg.alpha):
        raise ValueError(f"{where}: r={config.get('r')}, lora_alpha={config.get('lora_alpha')} but the run has "
                         f"lora.rank={cfg.rank}, lora.alpha={cfg.alpha}: set them to the adapter's")
    expected = peft_shapes(model, cfg)
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        stored = set(f.keys())
        missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
        if missing or extra:
            raise ValueError(f"{where}: {len(missing)} adapter tensor(s) missing (e.g. {missing[:2]}) and "
                             f"{len(extra)} unexpected (e.g. {extra[:2]}): an adapter for another base model?")
        tensors = {key: f.get_tensor(key) for key in sorted(expected)}
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"{where}: {key} has shape {tuple(tensor.shape)}, this base model needs "
                             f"{expected[key]}: an adapter for another base model?")
    return tensors


def write_peft_adapter(directory, tensors: dict[str, torch.Tensor], cfg: LoRAConfig, model,
                       base_model: str | None = None) -> None:
    """A PEFT LoRA directory that ``peft.PeftModel.from_pretrained(base, directory)`` loads."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from megatron_opsd.models.description import FAMILIES

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
              "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
              "auto_mapping": {"base_model_class": FAMILIES[model.model_type][0]}}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


# ---- LoRA training checkpoints: adapters only, plus the base they adapt ---------------------------------
_ADAPTER_KEY = re.compile(r"^decoder\.layers\.(?:self_attention|mlp)\.linear_\w+_lora\.(\w+_proj)_([AB])$")


def read_checkpoint_adapters(step_dir) -> dict[str, torch.Tensor]:
    """Unsharded adapter tensors (PEFT names) of a LoRA training checkpoint, whatever its layout."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    out = {}
    for key, value in load_plain_tensors(str(step_dir)).items():
        match = _ADAPTER_KEY.match(key)
        if match:  # layers are stacked on a leading axis
            for layer in range(value.shape[0]):
                out[peft_key(layer, match.group(1), match.group(2))] = value[layer]
    return out


def merge_adapters(hf_tensors, adapters: dict[str, torch.Tensor], scaling: float):
    """Wrap an (HF name, tensor) stream: every adapted projection becomes W + scaling * B A, computed in
    fp32 and stored in W's dtype."""
    pattern = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.weight$")
    used = 0
    for name, tensor in hf_tensors:
        match = pattern.match(name)
        key = match and peft_key(int(match.group(1)), match.group(2), "A")
        if key in adapters:
            a, b = adapters[key].float(), adapters[key[:-len("A.weight")] + "B.weight"].float()
            tensor = (tensor.float() + scaling * (b @ a)).to(tensor.dtype)
            used += 2
        yield name, tensor
    if used != len(adapters):
        raise ValueError(f"{len(adapters) - used} adapter tensor(s) found no projection to merge into")


def base_fingerprint(directory) -> str:
    """A fingerprint of a converted (base) checkpoint's files: model.json, the dist checkpoint's metadata
    and every data file's name and size. Cheap (no weight is read) and changes when the checkpoint is
    replaced or re-converted; a LoRA run refuses to resume or export over another base."""
    from pathlib import Path

    path = Path(directory)
    digest = hashlib.sha256()
    for name in ("model.json", ".metadata"):
        if (path / name).is_file():
            digest.update(name.encode() + (path / name).read_bytes())
    for file in sorted(path.glob("*.distcp")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]
