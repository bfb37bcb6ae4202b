"""megatron-core training plumbing: DDP wrapping, the optimizer and the forward-backward schedule.

Thin, explicit wrappers: every group comes from the ``ParallelRuntime``; the math is megatron-core's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch

from megatron_opsd import cpu_compat
from megatron_opsd.config_io import doc
from megatron_opsd.parallel import ParallelRuntime


@dataclass
class OptimConfig:
    """megatron-core optimizer and LR schedule."""

    optimizer: Literal["adam", "sgd"] = doc("Optimizer (adam is AdamW: decoupled weight decay).",
                                            default="adam")
    lr: float = doc("Peak learning rate.", default=5e-6)
    min_lr: float = doc("Final learning rate of the cosine decay.", default=0.0)
    weight_decay: float = doc("Decoupled weight decay.", default=0.0)
    adam_beta1: float = doc("Adam beta1.", default=0.9)
    adam_beta2: float = doc("Adam beta2.", default=0.999)
    adam_eps: float = doc("Adam epsilon.", default=1e-8)
    clip_grad: float = doc("Global gradient-norm clip (the paper uses 0.1); 0 disables.", default=0.1)
    warmup_steps: int = doc("Linear warmup steps.", default=0)
    decay_style: Literal["cosine", "constant", "linear"] = doc("LR decay after warmup.", default="cosine")
    initial_loss_scale: float = doc(
        "fp16 only: the dynamic loss scale to start from (halved after overflowing steps, which are "
        "skipped; doubled after 1000 clean ones).", default=2.0 ** 16)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be positive")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.initial_loss_scale < 1:
            raise ValueError(f"optim.initial_loss_scale={self.initial_loss_scale} must be >= 1")


def wrap_ddp(chunks: list[torch.nn.Module], runtime: ParallelRuntime, *,
             per_token_loss: bool = True) -> list[torch.nn.Module]:
    """Wrap model chunks in megatron-core DDP (fp32 grad buffers, optional distributed optimizer).

    ``per_token_loss``: gradients are summed over data-parallel ranks (not averaged) and scaled by
    1 / (global token count) in ``finalize_model_grads``; see ``forward_backward``.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=runtime.config.overlap_grad_reduce,
        use_distributed_optimizer=runtime.config.use_distributed_optimizer,
        average_in_collective=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        chunk.config.calculate_per_token_loss = per_token_loss
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Bucketing only pays off for the first chunk's overlap (Megatron-LM does the same).
            disable_bucketing=i > 0, pg_collection=runtime.pg_collection))
    cpu_compat.embedding_grads_into_main_grad(wrapped)
    return wrapped


def build_optimizer(ddp_chunks: list[torch.nn.Module], runtime: ParallelRuntime, optim: OptimConfig):
    """megatron-core optimizer over the DDP-wrapped chunks (fp32 main params under bf16/fp16)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_config = ddp_chunks[0].config
    config = OptimizerConfig(
        optimizer=optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=model_config.bf16,
        fp16=model_config.fp16,
        params_dtype=model_config.params_dtype,
        initial_loss_scale=optim.initial_loss_scale,  # fp16: megatron's dynamic scaler (unused otherwise)
        use_distributed_optimizer=runtime.config.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, ddp_chunks, pg_collection=runtime.pg_collection,
                                       use_gloo_process_groups=False)
    for inner in _torch_optimizers(optimizer):
        _fuse_cpu_adamw(inner)
    return optimizer


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron optimizer (a chain has one per parameter kind)."""
    found = [getattr(opt, "optimizer", None) for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [opt for opt in found if isinstance(opt, torch.optim.Optimizer)]


def _fuse_cpu_adamw(optimizer: torch.optim.Optimizer) -> None:
    """Without Transformer Engine or Apex megatron-core falls back to ``torch.optim.AdamW``, which on CPU
    runs its per-tensor update: ``exp_avg_sq.sqrt() / bias_correction`` makes two temporaries the size of
    the largest parameter (a [V, H] vocabulary matrix: 2 x 148 MiB fp32 at V=151,936, H=256) at the top of
    the step's memory. Its fused CPU kernel updates every tensor in place (and sooner). The param groups
    a checkpoint loads come from the checkpoint, so the flag is set again after ``load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if type(optimizer) is not torch.optim.AdamW or not params or any(p.device.type != "cpu" for p in params):
        return

    def fuse(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, False

    optimizer.defaults.update(fused=True, foreach=False)
    fuse(optimizer)
    optimizer.register_load_state_dict_post_hook(fuse)


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")


def forward_backward(
    ddp_chunks: list[torch.nn.Module],
    runtime: ParallelRuntime,
    forward_step: Callable,
    data_iterators: Iterator | list[Iterator],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    grad_scale_func: Callable | None = None,
) -> list:
    """Run megatron-core's schedule (no pipelining, 1F1B, or interleaved 1F1B by layout).

    ``forward_step(data_iterator, model) -> (output, loss_func)``; ``loss_func`` returns
    ``(loss_sum, num_tokens, metrics)``. With ``calculate_per_token_loss`` the schedule sums the
    per-micro-batch sums and ``finalize_model_grads`` divides the gradients by the token count summed
    over every micro-batch and data-parallel rank: the loss is a global token mean regardless of layout.
    Pipeline messages: without interleaving shapes are exchanged per message (micro-batches may
    differ in length and ``seq_length`` is unused); with interleaving (VPP) every micro-batch must
    be ``seq_length`` long (see ``models.provider.transformer_config``).
    ``grad_scale_func``: the optimizer's ``scale_loss`` (fp16 loss scaling: the schedule multiplies
    each micro-batch's loss by the scale before backward, the optimizer divides it out of the
    gradients). Without it under fp16, megatron's optimizer would still divide by its scale.
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = ddp_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = grad_scale_func
    # As Megatron-LM: gradients are reduced once per step (or per chunk when overlapping), not per
    # micro-batch.
    no_sync = [c.no_sync for c in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if runtime.config.overlap_grad_reduce:
        grad_sync = [c.start_grad_sync for c in ddp_chunks]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if runtime.vpp is not None and not isinstance(data_iterators, list):
        data_iterators = [data_iterators] * runtime.vpp
    schedule = get_forward_backward_func()

    def forward_then_release(data_iterator, model):
        output = forward_step(data_iterator, model)
        cpu_compat.release_free_heap()  # before the loss, the step's peak: the forward's freed pages
        return output

    try:
        with cpu_compat.placement_context():
            return schedule(
                forward_step_func=forward_then_release,
                data_iterator=data_iterators,
                model=ddp_chunks if len(ddp_chunks) > 1 else ddp_chunks[0],
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )
    finally:
        # The model's config outlives this call: a reference to the optimizer there would keep it (and
        # what it holds: buffers, communicators) alive after the caller drops it.
        config.grad_scale_func = None
