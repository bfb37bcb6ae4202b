"""Model checkpoints in megatron-core's distributed format (torch_dist), written atomically.

A checkpoint directory holds the dist checkpoint plus ``model.json`` (the model description). It can
be loaded at any TP/PP/VPP layout: megatron-core's ``sharded_state_dict`` records global offsets.

Atomicity: everything is written to ``<dir>.tmp-<pid>`` and renamed into place by rank 0 after all
ranks finished; a crash mid-save leaves only the temporary directory behind, never a half checkpoint
under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opsd.checkpoint_paths import (LATEST, MODEL_JSON, read_model_json, resolve_weights,
                                            step_dirs, with_previous)
from megatron_opsd.models.description import ModelConfig


def _chunk_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(chunks: list[torch.nn.Module], *, adapters_only: bool = False) -> dict:
    """One sharded state dict for all chunks (keys ``model``, or ``model0``, ``model1``, … with VPP);
    ``adapters_only``: the LoRA adapters' entries alone (a LoRA run's checkpoints: the base is not copied)."""
    out = {}
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        state = _unwrap(chunk).sharded_state_dict()
        out[key] = {k: v for k, v in state.items() if LORA_KEY in k} if adapters_only else state
    return out


LORA_KEY = "_lora."  # the adapters' modules: ``linear_qkv_lora``, ... (models/lora.py)


def has_adapters(chunks: list[torch.nn.Module]) -> bool:
    return any(LORA_KEY in name for chunk in chunks for name, _ in _unwrap(chunk).named_parameters())


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def maybe_inject_fault(point: str) -> None:
    """Tests simulate a crash with MEGATRON_OPSD_FAULT=<point> (``mid_save:step_0000002``,
    ``after_step:3``): the process exits at once, as a killed job would."""
    if os.environ.get("MEGATRON_OPSD_FAULT") == point:
        import psutil

        print(f"injected fault at {point}", flush=True)
        for child in psutil.Process().children(recursive=True):  # checkpoint writer helpers die too
            child.kill()
        os._exit(17)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def staging_dir(out: Path) -> Path:
    """A fresh, uniquely named hidden directory next to ``out`` (``.<name>.tmp-XXXX``) to write into.
    Only paths made here are ever deleted: a user's ``<out>.tmp`` or ``<out>.old`` is left alone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``, replacing an existing ``out`` (moved aside into
    a fresh hidden directory first, removed once ``tmp`` is in place)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_save(save_fn, directory: str | Path) -> Path:
    """Run ``save_fn(tmp_dir)`` on every rank, then publish ``tmp_dir`` as ``directory`` (rank 0).

    ``tmp_dir`` is ``staging_dir(directory)``, made by rank 0 and broadcast; an interrupted save leaves
    it behind (``.<name>.tmp-XXXX``, never taken for a checkpoint), and the next save of the same name
    removes such leftovers of its own."""
    directory = Path(directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = [None]
    if rank == 0:
        for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = [str(staging_dir(directory))]
    if dist.is_initialized():
        dist.broadcast_object_list(tmp, src=0)
    tmp = Path(tmp[0])
    save_fn(tmp)
    _barrier()
    maybe_inject_fault(f"mid_save:{directory.name}")
    if rank == 0:
        publish(tmp, directory)
    _barrier()
    return directory


def save_model(chunks: list[torch.nn.Module], model: ModelConfig, directory: str | Path) -> Path:
    """Save model weights (+ description) as a dist checkpoint loadable at any layout."""
    from megatron.core import dist_checkpointing

    def write(tmp: Path) -> None:
        dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_model_json(model, tmp)

    return atomic_save(write, directory)


def write_model_json(model: ModelConfig, directory: Path) -> None:
    tmp = directory / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(model.to_hf_dict(), indent=2))
    os.replace(tmp, directory / MODEL_JSON)


def _read(load, *args, **kwargs):
    """``load(..., str(directory), ...)`` with megatron-core's and torch's failures (damaged file
    contents, a layout it cannot map) as one line naming the directory; that the files exist at full
    length was checked before (``checkpoint_paths.check_complete``)."""
    import pickle

    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    *head, directory = args
    try:
        return load(*head, str(directory), **kwargs)
    except (CheckpointException, CheckpointingException, pickle.UnpicklingError, RuntimeError, KeyError,
            EOFError, OSError, ValueError) as exc:
        cause = next(iter(getattr(exc, "failures", {}).values()), exc)  # torch DCP: per-rank failures
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
        what = "damaged tensor data" if isinstance(cause, pickle.UnpicklingError) else \
            (str(cause).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"{directory}: the checkpoint cannot be read ({type(cause).__name__}: {what})") from exc


def load_model(chunks: list[torch.nn.Module], directory: str | Path, *, prefix: str | None = None,
               strict: str = "raise_all") -> None:
    """Load model weights saved by ``save_model`` (or, with ``strict="assume_ok_unexpected"``, the model
    part of a training checkpoint) into ``chunks``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    sharded = model_sharded_state_dict(chunks)
    if prefix:
        sharded = {prefix: sharded}
    state = load_sharded(sharded, directory, allow_unrequested=strict != "raise_all")
    if prefix:
        state = state[prefix]
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        load_module_state(_unwrap(chunk), state[key])


# Transformer Engine modules (its norms; its linears under FP8) carry ``_extra_state`` entries that a
# checkpoint written with the local spec (or on a machine without TE) lacks, and a TE-written
# checkpoint holds entries a local-spec model does not ask for. Neither holds weights: a missing one
# keeps the module's fresh state, an unrequested one is not read.
EXTRA_STATE = "_extra_state"


def _key_name(key) -> str:
    return key[0] if isinstance(key, tuple) else key  # megatron reports (key, offsets, fragment) ids


def is_extra_state(key) -> bool:
    return _key_name(key).endswith(EXTRA_STATE)


def load_sharded(sharded: dict, directory: str | Path, *, allow_unrequested: bool) -> dict:
    """``dist_checkpointing.load`` that tolerates ``_extra_state`` entries on either side.

    Every other tensor the model asks for must be stored (else ``CheckpointError`` naming the keys); with
    ``allow_unrequested=False`` every stored tensor must also be asked for (a converted model for
    exactly this architecture), otherwise other stored state (optimizer, teacher) is not read.
    (megatron-core's names are from the checkpoint's side: "unexpected" = asked for but not stored,
    "missing" = stored but not asked for.)
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state, stored_not_asked, asked_not_stored = _read(dist_checkpointing.load, sharded, directory,
                                                      strict=StrictHandling.RETURN_ALL)
    absent = sorted({_key_name(k) for k in asked_not_stored if not is_extra_state(k)})
    if absent:
        raise CheckpointError(f"{directory}: the checkpoint lacks {len(absent)} tensor(s) this model needs, "
                              f"e.g. {absent[:4]}: is it a checkpoint of another model?")
    extra = sorted({_key_name(k) for k in stored_not_asked if not is_extra_state(k)})
    if extra and not allow_unrequested:
        raise CheckpointError(f"{directory}: the checkpoint holds {len(extra)} tensor(s) this model does not "
                              f"have, e.g. {extra[:4]}: is it a checkpoint of another model?")
    return state


def load_module_state(module: torch.nn.Module, state: dict, *, partial: bool = False) -> None:
    """``load_state_dict`` that lets a module keep its own ``_extra_state`` when the checkpoint had none
    (``partial``: and everything the state does not hold, e.g. the base weights under LoRA adapters)."""
    result = module.load_state_dict(state, strict=False)
    missing = [] if partial else result.missing_keys
    problems = [k for k in missing if not k.endswith(EXTRA_STATE)] + list(result.unexpected_keys)
    if problems:
        raise CheckpointError(f"state does not match the model: {problems[:4]}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (named keys / files)."""


# ---- training checkpoints ---------------------------------------------------------------------
#
# root/
#   step_0000010/        dist checkpoint: model, optimizer, (teacher), RNG; common: step, scheduler,
#                        data cursor, layout; plus model.json
#   latest               text file naming the newest complete step directory (replaced atomically)

# Distributed-optimizer state format. fully_reshardable (gathered per DP group at save) loads at any
# TP/PP/DP; dp_reshardable (no gather, fully parallel) only at another DP size.
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def _training_state(chunks, optimizer, teacher_chunks, runtime, *, is_loading: bool, with_rng: bool,
                    optimizer_format: str = "fully_reshardable") -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = model_sharded_state_dict(chunks, adapters_only=has_adapters(chunks))
    if optimizer is not None:
        if is_loading:
            _materialise_optimizer_state(optimizer)
        # chained_optim_avoid_prefix: a mixture of experts' chain (dense + expert optimizer) stores its
        # tensors under the parameters' own keys, not ``chained_<i>.``: at EP1 the experts belong to the
        # dense optimizer (there is no chain), so a prefixed key would not be found at another EP.
        metadata = {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading, metadata=metadata)
    if teacher_chunks:
        state["teacher"] = {key: _unwrap(c).sharded_state_dict(prefix="teacher.")
                            for key, c in zip(_chunk_keys(len(teacher_chunks)), teacher_chunks)}
    if with_rng:
        rng = {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
               "numpy": __import__("numpy").random.get_state()}
        # the CP ranks of a (pp, tp, dp) rank are seeded alike and draw alike: replicas of one state
        state["rng"] = ShardedObject("rng_state", rng, (runtime.pp, runtime.tp, runtime.dp),
                                     (runtime.pp_rank, runtime.tp_rank, runtime.dp_rank), replica_id=runtime.cp_rank)
    return state


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no per-parameter state (not even ``step``) to load into:
    create it with one zero-gradient step, as megatron-core does for its FSDP format. The weights it
    touches are overwritten by the load that follows."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _load_optimizer(optimizer, state: dict, optimizer_format: str) -> None:
    """``optimizer.load_state_dict`` for this layout's optimizer, whatever layout saved ``state``.

    A mixture of experts gets a chain of two optimizers (dense, expert parameters) at EP > 1 and a
    single one at EP1 (megatron-core puts a parameter in the expert optimizer when its ``allreduce`` is
    False: tensor_parallel/layers.py:886, set only with expert_model_parallel_size > 1; optimizer/
    __init__.py:646-680). The saved state is one member's dict or one per member (keys 0, 1); its
    tensors come back in this layout's structure (their keys do not depend on the chain, see
    ``_training_state``), its param groups as saved, from the common state. Each member here gets the
    saved param groups that match its own (megatron's identifier keys; ``is_expert_parallel`` follows
    this layout) and is loaded as below.

    Work-around for megatron-core 0.16.1 with torch's Adam (no Apex/TE): a distributed optimizer's
    ``load_state_dict`` adds ``step`` to every parameter state (distrib_optimizer.py:817-825);
    ``load_parameter_state_from_fully_reshardable`` hands ``_set_main_param_and_optimizer_states`` the
    loaded tensors without ``step`` (2100-2103) and that copies every key of the parameter's state
    (936-940): KeyError 'step'. The step is set aside around that copy. The dp_reshardable loader
    (1772) copies into the fp32 main params without ``no_grad``: autograd refuses it (in-place on a
    leaf that requires grad), so it runs under ``no_grad`` here."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    members = getattr(optimizer, "chained_optimizers", [optimizer])
    saved = [state] + [v for k, v in sorted(state.items(), key=lambda kv: str(kv[0])) if isinstance(k, int)]
    saved_groups = [g for m in saved if "optimizer" in m for g in m["optimizer"]["param_groups"]]
    loaded = [state] if len(members) == 1 else [state[i] for i in range(len(members))]
    if not all(isinstance(m, DistributedOptimizer) for m in members):
        try:
            optimizer.load_state_dict(loaded[0] if len(members) == 1 else loaded)
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"the optimizer state does not fit this run's optimizer ({type(exc).__name__}: "
                                  f"{exc}): without parallel.use_distributed_optimizer, resume a mixture of "
                                  "experts at the expert-parallel size it was saved with") from exc
    else:
        scaler = next((m["grad_scaler"] for m in saved if "grad_scaler" in m), None)
        for opt, tensors in zip(members, loaded):
            opt_state = {"optimizer": {"param_groups": _matching_groups(opt, saved_groups)},
                         **({"grad_scaler": scaler} if scaler is not None else {})}
            opt.load_state_dict(opt_state)
            steps = {p: st.pop("step") for p, st in opt.optimizer.state.items() if "step" in st}
            with torch.no_grad():  # megatron-core decorates only the fully_reshardable loader
                if optimizer_format == "fully_reshardable":
                    opt.load_parameter_state_from_fully_reshardable(tensors["param_state"])
                else:
                    opt.load_parameter_state_from_dp_reshardable(tensors["param_state"])
            for p, step in steps.items():
                opt.optimizer.state[p]["step"] = step
    # The same load hands every parameter one shared ``step`` tensor, which torch Adam increments in
    # place once per parameter: bias correction would jump ahead after a resume. One tensor each.
    for opt in members:
        for param_state in getattr(opt, "optimizer", opt).state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()


def _matching_groups(opt, saved_groups: list[dict]) -> list[dict]:
    """For each param group of ``opt``: the saved group with the same megatron identifier keys (wd_mult,
    lr_mult, is_decoupled_lr; ``is_expert_parallel`` too when one matches, else it is this layout's:
    the experts' groups change sides between EP1 and EP > 1)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    def ident(group: dict, *, expert: bool) -> tuple:
        return tuple(group.get(k) for k in param_group_identifier_keys if expert or k != "is_expert_parallel")

    out = []
    for group in opt.optimizer.param_groups:
        match = next((g for g in saved_groups if ident(g, expert=True) == ident(group, expert=True)), None) or \
            next((g for g in saved_groups if ident(g, expert=False) == ident(group, expert=False)), None)
        if match is None:
            raise CheckpointError(f"the checkpoint has no optimizer param group like this run's "
                                  f"{dict(zip(param_group_identifier_keys, ident(group, expert=True)))}")
        out.append({**match, "is_expert_parallel": group["is_expert_parallel"]})
    return out


def save_training(root: str | Path, step: int, *, chunks, optimizer, teacher_chunks, runtime, model: ModelConfig,
                  common: dict, keep_last: int, optimizer_format: str = "fully_reshardable") -> Path:
    """Atomically write step ``step`` and move the ``latest`` pointer; prune to ``keep_last``."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    target = step_dir(root, step)

    def write(tmp: Path) -> None:
        state = _training_state(chunks, optimizer, teacher_chunks, runtime, is_loading=False, with_rng=True,
                                optimizer_format=optimizer_format)
        state["common"] = {**common, "step": step, "layout": [runtime.tp, runtime.pp, runtime.dp],
                           "optimizer_format": optimizer_format}
        dist_checkpointing.save(state, str(tmp))
        if dist.get_rank() == 0:
            from megatron_opsd.conversion.files import save_tokenizer_files

            write_model_json(model, tmp)
            # the tokenizer travels with every step: exports and generation find it there
            save_tokenizer_files(common.get("config", {}).get("data", {}).get("tokenizer_path"), tmp)

    atomic_save(write, target)
    if dist.get_rank() == 0:
        pointer_tmp = root / (LATEST + ".tmp")
        pointer_tmp.write_text(target.name)
        os.replace(pointer_tmp, root / LATEST)
        if keep_last:  # complete steps only: a crashed save's step_*.tmp is no checkpoint
            for old in step_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return target


def load_training(path: str | Path, *, chunks, optimizer, teacher_chunks, runtime) -> dict:
    """Restore model, optimizer, teacher (and RNG when the layout is unchanged); return ``common``."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    try:
        common = _read(dist_checkpointing.load_common_state_dict, path)["common"]
        same_layout = list(common["layout"]) == [runtime.tp, runtime.pp, runtime.dp]
        state = _training_state(chunks, optimizer, teacher_chunks, runtime, is_loading=True,
                                with_rng=same_layout, optimizer_format=common["optimizer_format"])
        loaded = load_sharded(state, path, allow_unrequested=True)
    except ValueError as exc:
        raise with_previous(path.parent, str(exc), path) from None
    adapters_only = has_adapters(chunks)
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        load_module_state(_unwrap(chunk), loaded[key], partial=adapters_only)
    if optimizer is not None:
        _load_optimizer(optimizer, loaded["optimizer"], common["optimizer_format"])
    if teacher_chunks:
        for key, chunk in zip(_chunk_keys(len(teacher_chunks)), teacher_chunks):
            load_module_state(_unwrap(chunk), {k.removeprefix("teacher."): v for k, v in loaded["teacher"][key].items()})
    if same_layout and "rng" in loaded:
        rng = loaded["rng"]
        torch.set_rng_state(rng["torch"])
        __import__("random").setstate(rng["python"])
        __import__("numpy").random.set_state(rng["numpy"])
    return common


def load_weights(chunks, directory: str | Path, option: str = "train.load", runtime=None) -> None:
    """Model weights from a converted checkpoint or a training checkpoint (root or step directory).

    A LoRA run's checkpoint holds its adapters only: the base it records is loaded (its fingerprint
    checked), adapters are attached to ``chunks`` (``runtime`` needed) and filled from the checkpoint."""
    path = resolve_weights(directory, option)
    lora = lora_checkpoint(path)
    if lora is None:
        load_model(chunks, path, strict="assume_ok_unexpected")
        return
    from megatron_opsd.models.lora import attach_lora

    config, base = lora
    if runtime is None:
        raise ValueError(f"{option}: {path} is a LoRA run's checkpoint (adapters over {base}): resume it with "
                         "--load, or export it merged with tools/convert_megatron_to_hf.py and start from that")
    load_model(chunks, base, strict="assume_ok_unexpected")
    attach_lora(chunks, read_model_json(path), config, runtime, seed=0)
    sharded = model_sharded_state_dict(chunks, adapters_only=True)
    loaded = load_sharded(sharded, path, allow_unrequested=True)
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        load_module_state(_unwrap(chunk), loaded[key], partial=True)


def lora_base_record(base: str | Path | None) -> dict:
    """What a LoRA run's checkpoints record of their base (train.load or the warm-up base; None: random
    initialisation from the run's seed)."""
    from megatron_opsd.models.lora import base_fingerprint

    return {"path": None if base is None else str(Path(base).resolve()),
            "fingerprint": None if base is None else base_fingerprint(base)}


def lora_checkpoint(step: Path):
    """(LoRAConfig, base directory) of a LoRA run's training checkpoint; None for any other checkpoint.
    Refuses a base that is gone or was replaced since (its fingerprint changed)."""
    from megatron.core import dist_checkpointing

    from megatron_opsd.models.lora import LoRAConfig, base_fingerprint

    if not (step / "common.pt").is_file():
        return None
    common = _read(dist_checkpointing.load_common_state_dict, step).get("common", {})
    record = common.get("lora_base")
    if not record:
        return None
    config = LoRAConfig(**{k: v for k, v in common["config"]["lora"].items()})
    base = record["path"]
    if base is None:
        raise ValueError(f"{step}: a LoRA checkpoint whose base was a random initialisation: it cannot be "
                         "loaded or exported on its own")
    if not (Path(base) / MODEL_JSON).is_file():
        raise ValueError(f"{step}: its LoRA base {base} is gone: restore it there")
    if base_fingerprint(base) != record["fingerprint"]:
        raise ValueError(f"{step}: its LoRA base {base} changed since training (fingerprint "
                         f"{base_fingerprint(base)} != recorded {record['fingerprint']}): the adapters belong "
                         "to the base they were trained on")
    return config, Path(base)
