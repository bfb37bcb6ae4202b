"""The parallel runtime: the one place that reads megatron-core's global parallel state.

``init_parallel`` starts torch.distributed (NCCL with CUDA, gloo without), initialises megatron-core
model parallel state (tp, pp, optional virtual pp, cp; dp is derived) and all seeds, and returns a
``ParallelRuntime`` holding explicit groups and ranks. Everything else receives groups from it.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_opsd import cpu_compat
from megatron_opsd.config_io import doc


@dataclass
class ParallelConfig:
    """Parallel layout. dp is derived: world_size / (tp * pp * cp). MoE layers use their own layout over
    the same processes (megatron-core's expert groups): ep x etp x pp, expert-data-parallel derived:
    world_size / (etp * ep * pp)."""

    tp: int = doc("Tensor-parallel size (shards heads, MLP and vocabulary).", default=1)
    pp: int = doc("Pipeline-parallel size (stages of consecutive layers).", default=1)
    cp: int = doc("Context-parallel size: each sequence split over cp ranks in megatron's load-balanced "
                  "order (2*cp chunks, rank r holds chunks r and 2*cp-1-r); needs Transformer Engine "
                  "attention on CUDA (refused otherwise).", default=1)
    vpp: int | None = doc("Virtual pipeline chunks per stage (interleaved 1F1B); None = off.", default=None)
    ep: int = doc("Expert-parallel size (MoE models: routed experts split over ep ranks).", default=1)
    etp: int | None = doc("Expert tensor-parallel size (MoE expert weights); None means tp.", default=None)
    sequence_parallel: bool = doc("Megatron sequence parallelism (needs tp > 1): activations between layers "
                                  "are sequence-sharded over TP ranks.", default=False)
    use_distributed_optimizer: bool = doc("Shard optimizer state over data-parallel ranks.", default=True)
    overlap_grad_reduce: bool = doc("Overlap DP gradient reduce-scatter with backward.", default=False)
    timeout_minutes: int = doc("Collective timeout.", default=30)

    def __post_init__(self) -> None:
        if self.etp is None:
            self.etp = self.tp
        for name in ("tp", "pp", "cp", "ep", "etp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.vpp is not None:
            if self.vpp < 1:
                raise ValueError(f"parallel.vpp={self.vpp} must be >= 1 or null")
            if self.vpp > 1 and self.pp < 2:
                raise ValueError(f"parallel.vpp={self.vpp} needs parallel.pp >= 2 (got pp={self.pp}); "
                                 "set vpp: null for a non-pipelined run")
            if self.vpp == 1:
                self.vpp = None
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")

    def check_world_size(self, world_size: int) -> None:
        dense = self.tp * self.pp * self.cp
        if world_size % dense:
            names, sizes = ("parallel.tp * parallel.pp", f"{self.tp} * {self.pp}") if self.cp == 1 else \
                ("parallel.tp * parallel.pp * parallel.cp", f"{self.tp} * {self.pp} * {self.cp}")
            raise ValueError(f"world size {world_size} is not divisible by {names} = {sizes}: launch a multiple "
                             f"of {dense} processes or change {'tp/pp' if self.cp == 1 else 'tp/pp/cp'}")
        expert = self.etp * self.ep * self.pp
        if world_size % expert:
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.etp * parallel.ep * parallel.pp = "
                f"{self.etp} * {self.ep} * {self.pp}: the expert layout needs a multiple of {expert} processes")

    def data_parallel_size(self, world_size: int) -> int:
        """dp: the ranks that see different data (the cp ranks of a data-parallel rank see the same)."""
        return world_size // (self.tp * self.pp * self.cp)

    def check_experts(self, num_experts: int, expert_ffn_size: int) -> None:
        """Layout constraints of a mixture of experts: experts over ep ranks, expert width over etp."""
        if num_experts % self.ep:
            fits = [ep for ep in range(1, num_experts + 1) if num_experts % ep == 0]
            raise ValueError(f"num_experts={num_experts} is not divisible by parallel.ep={self.ep}: choose "
                             f"parallel.ep among {fits}")
        if expert_ffn_size % self.etp:
            raise ValueError(f"moe_intermediate_size={expert_ffn_size} is not divisible by parallel.etp={self.etp}")

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, ffn_size: int | None = None) -> None:
        """Layout constraints that depend on the model shape; the advice lists only tensor-parallel
        sizes that satisfy all of them (heads, KV heads, MLP width; the vocabulary is padded)."""
        def problems(tp: int) -> list[str]:
            found = []
            if num_heads % tp:
                found.append(f"num_attention_heads={num_heads} is not divisible by parallel.tp={tp}")
            if num_kv_heads % tp and tp % num_kv_heads:
                found.append(f"num_key_value_heads={num_kv_heads} and parallel.tp={tp}: one must divide the other")
            if ffn_size is not None and ffn_size % tp:
                found.append(f"intermediate_size={ffn_size} is not divisible by parallel.tp={tp}")
            return found

        wrong = problems(self.tp)
        if wrong:
            fits = [tp for tp in range(1, num_heads + 1) if not problems(tp)]
            raise ValueError(f"{wrong[0]}: choose parallel.tp among {fits}")
        chunks = self.pp * (self.vpp or 1)
        if num_layers % chunks:
            raise ValueError(f"num_hidden_layers={num_layers} is not divisible by parallel.pp * vpp = "
                             f"{chunks}: each pipeline chunk needs the same number of layers")


@dataclass
class ParallelRuntime:
    """Explicit process groups and ranks of this process. Pass it (or its groups) around."""

    config: ParallelConfig
    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup  # context parallel: the ranks splitting one sequence
    dp_cp_group: dist.ProcessGroup  # dp x cp: megatron's DDP reduces gradients (and token counts) here
    embd_group: dist.ProcessGroup | None
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection
    ep_group: dist.ProcessGroup | None = None  # expert parallel
    etp_group: dist.ProcessGroup | None = None  # expert tensor parallel
    expert_dp_group: dist.ProcessGroup | None = None  # replicas of the same experts (their grads reduce here)
    seed: int = 1234

    @property
    def tp(self) -> int:
        return self.config.tp

    @property
    def pp(self) -> int:
        return self.config.pp

    @property
    def vpp(self) -> int | None:
        return self.config.vpp

    @property
    def cp(self) -> int:
        return self.config.cp

    @property
    def dp(self) -> int:
        return self.config.data_parallel_size(self.world_size)

    @property
    def ep(self) -> int:
        return self.config.ep

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group) if self.ep_group is not None else 0

    @property
    def etp_rank(self) -> int:
        return dist.get_rank(self.etp_group) if self.etp_group is not None else 0

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp_group)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def last_stage_global_rank(self) -> int:
        return dist.get_global_rank(self.pp_group, self.pp - 1)

    def destroy(self) -> None:
        """Tear down megatron's model-parallel state and its process groups (the default group stays).

        megatron-core's ``destroy_model_parallel`` only forgets its groups; without destroying them
        each re-initialisation would leave every group's communicator (gloo: its threads) behind.
        """
        from megatron.core import parallel_state

        groups = _megatron_groups(parallel_state)
        parallel_state.destroy_model_parallel()
        if sys.exc_info()[0] is not None:
            # called while an exception propagates (a `finally`): a peer may still be inside a
            # collective, and destroying an NCCL group waits for its pending work; leave them
            return
        registered = dist.distributed_c10d._world.pg_map  # torch's registry of live groups
        for group in groups:
            if group in registered:  # (destroying one group can retire others that share its backend)
                dist.destroy_process_group(group)


def _megatron_groups(parallel_state) -> list[dist.ProcessGroup]:
    """The distinct process groups megatron's parallel state holds (module globals, also in lists)."""
    found: dict[int, dist.ProcessGroup] = {}
    for value in vars(parallel_state).values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, dist.ProcessGroup) and item is not dist.GroupMember.WORLD:
                found[id(item)] = item
    return list(found.values())


# Every process group carries gloo for CPU tensors and NCCL for CUDA tensors: small bookkeeping
# reductions (metric sums, stop flags, evaluation totals) may be made of CPU tensors, and a plain
# "nccl" group raises "No backend type associated with device type cpu" on them. megatron-core's
# groups inherit the default group's backends.
CUDA_BACKEND = "cpu:gloo,cuda:nccl"


def process_group_backend(cuda: bool) -> str:
    return CUDA_BACKEND if cuda else "gloo"


def launcher_environment(env: dict) -> dict:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for torch.distributed, from how the process was launched.

    torchrun sets RANK itself. ``srun python -m ...`` sets only SLURM's variables: without reading
    them every task would think it is alone, and N tasks would train N independent copies writing one
    checkpoint directory. A plain ``python`` (also inside an sbatch script, where SLURM_PROCID is set
    but no job step is running) is a world of one.
    """
    if "RANK" in env:
        return {}
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:  # a task of an srun job step
        tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": tasks, "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
        if "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = first_slurm_host(nodes)
        if "MASTER_PORT" not in env:  # the same on every task, different for concurrent jobs
            out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return out
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port())}


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    prefix, ranges = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist).groups()
    return prefix if ranges is None else prefix + re.split("[,-]", ranges)[0]


def _init_process_group(timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    os.environ.update(launcher_environment(dict(os.environ)))
    cuda = torch.cuda.is_available()
    if cuda:
        # megatron-core orders TP communication and compute on one hardware queue (sequence
        # parallelism, TP overlap); it must be set before the CUDA context exists.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(process_group_backend(cuda), timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_everything(seed: int, tp_rank: int = 0, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """Seed python, numpy, torch and megatron's tensor-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # on CPU megatron's CUDA seeding below is a no-op for the default generator
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=ep_rank, etp_rank=etp_rank,
                                                    force_reset_rng=True)
    torch.manual_seed(seed)


# Warnings megatron-core 0.16.1 triggers on every run that say nothing a user can act on (its own calls
# of torch names torch deprecated; a deprecation inside megatron's default TransformerConfig). Only
# these are filtered: megatron's performance warnings (a missing fused kernel, ...) stay visible.
_NOISE = ((FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
          (UserWarning, r"full scope is deprecated"))


def init_parallel(config: ParallelConfig, seed: int = 1234) -> ParallelRuntime:
    """Start (or reuse) torch.distributed and build megatron-core's parallel state for ``config``."""
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    cpu_compat.check_version()  # our work-arounds (CPU patches, checkpoint loading) are for this release
    cpu_compat.apply()
    _init_process_group(config.timeout_minutes)
    world_size = dist.get_world_size()
    config.check_world_size(world_size)

    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=config.tp,
        pipeline_model_parallel_size=config.pp,
        context_parallel_size=config.cp,
        virtual_pipeline_model_parallel_size=config.vpp,
        expert_model_parallel_size=config.ep,
        expert_tensor_parallel_size=config.etp,
        distributed_timeout_minutes=config.timeout_minutes,
        # Nothing here uses megatron's gloo groups (the optimizer is built without them); on a large
        # cluster each would cost a gloo communicator per group per process.
        create_gloo_process_groups=False,
    )
    runtime = ParallelRuntime(
        config=config,
        world_size=world_size,
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
        else torch.device("cpu"),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        embd_group=ps.get_embedding_group(check_initialized=False),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        seed=seed,
    )
    seed_everything(seed, tp_rank=runtime.tp_rank, ep_rank=runtime.ep_rank, etp_rank=runtime.etp_rank)
    return runtime


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
