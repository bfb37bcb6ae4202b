"""Parallel layouts vs the TP=1/PP=1 reference, in one 4-process launch.

Checks (each against the unsharded reference model, plain autograd, same weights and data):
  * fp32 logits (still vocab-sharded) and every parameter gradient under TP2, TP2+full recompute,
    PP2 (1F1B), TP2xPP2, PP2xVPP2 (interleaved) and tied embeddings at PP2;
  * DP2 (x TP2) with megatron-core DDP + distributed optimizer: 3 Adam steps with grad clipping equal
    torch.optim.AdamW on the reference;
  * that model, saved as a dist checkpoint at TP2, loads at TP1 and at PP2 with equal logits.

Tolerances: fp32 everywhere; sharded matmuls and all-reduces sum in a different order than the
reference, which moves results by a few ulps of the largest partial sums: 1e-5 absolute (values are
O(1)) with 1e-5 relative.

usage: torchrun --nproc_per_node=4 layouts.py CHECKPOINT_DIR
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from common import (causal_inputs, check_close, chunk_grads_vs_reference, rank_print, tiny_llama,
                    unsharded_params)
from megatron_opsd.checkpoint import load_model, save_model
from megatron_opsd.engine import OptimConfig, build_optimizer, forward_backward, wrap_ddp
from megatron_opsd.models.provider import ModelBuildConfig, build_model
from megatron_opsd.models.sharding import load_unsharded
from megatron_opsd.parallel import ParallelConfig, init_parallel

ATOL = RTOL = 1e-5
NUM_MICROBATCHES, MBS, SEQ = 4, 2, 12


def make_data(vocab: int, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (NUM_MICROBATCHES, MBS, SEQ), generator=gen)
    labels = torch.randint(0, vocab, (NUM_MICROBATCHES, MBS, SEQ), generator=gen)
    probe = torch.randn(NUM_MICROBATCHES, MBS, SEQ, vocab, generator=gen) * 0.1
    return tokens, labels, probe


def reference_loss(logits_bsv: torch.Tensor, labels: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Summed over tokens: cross entropy plus a random linear probe of every logit."""
    ce = torch.nn.functional.cross_entropy(logits_bsv.flatten(0, 1), labels.flatten(), reduction="sum")
    return ce + (logits_bsv * probe).sum()


def run_reference(model, data):
    tokens, labels, probe = data
    model.zero_grad()
    logits, total = [], 0.0
    for i in range(NUM_MICROBATCHES):
        pos, mask = causal_inputs(tokens[i])
        out = model(tokens[i], pos, mask)
        total = total + reference_loss(out, labels[i], probe[i])
        logits.append(out.detach())
    (total / labels.numel()).backward()
    return logits, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def sharded_step(chunks, runtime, data, *, forward_only=False):
    """One forward-backward of this DP rank's micro-batches; returns {micro-batch index: local logits}."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    tokens, labels, probe = data
    per_rank = NUM_MICROBATCHES // runtime.dp
    indices = list(range(runtime.dp_rank * per_rank, (runtime.dp_rank + 1) * per_rank))
    seen: dict[int, torch.Tensor] = {}

    def forward_step(data_iterator, model):
        i = next(data_iterator)
        pos, mask = causal_inputs(tokens[i])
        out = model(tokens[i], pos, mask)

        def loss_func(logits):
            seen[i] = logits.detach().clone()
            lo = runtime.tp_rank * logits.shape[-1]
            probe_local = probe[i][..., lo:lo + logits.shape[-1]]
            linear = reduce_from_tensor_model_parallel_region((logits * probe_local).sum(), runtime.tp_group)
            # megatron's vocab-parallel cross entropy edits its input in place: give it a copy.
            ce = vocab_parallel_cross_entropy(logits.clone(), labels[i]).sum()
            num_tokens = torch.tensor(labels[i].numel(), dtype=torch.int)
            loss = ce + linear
            return loss, num_tokens, {"loss": loss.detach()}

        return out, loss_func

    iterators = [iter(indices) for _ in chunks] if len(chunks) > 1 else iter(indices)
    forward_backward(chunks, runtime, forward_step, iterators, num_microbatches=per_rank,
                     seq_length=SEQ, micro_batch_size=MBS, forward_only=forward_only)
    return seen


def check_logits(seen, ref_logits, runtime, what):
    worst = 0.0
    for i, logits in seen.items():
        v_local = ref_logits[i].shape[-1] // runtime.tp
        assert logits.shape[-1] == v_local, f"{what}: logits not vocab-sharded: {tuple(logits.shape)}"
        lo = runtime.tp_rank * v_local
        worst = max(worst, check_close(f"{what} logits mb{i}", logits, ref_logits[i][..., lo:lo + v_local],
                                       atol=ATOL, rtol=RTOL))
    return worst


def check_layout(name, model_cfg, full, ref_logits, ref_grads, data, *, tp=1, pp=1, vpp=None,
                 recompute="none"):
    start = time.time()
    # Gradients are all-reduced here (the distributed optimizer reduce-scatters them, leaving each DP
    # rank only its own shard reduced); the distributed optimizer is checked through Adam steps below.
    runtime = init_parallel(ParallelConfig(tp=tp, pp=pp, vpp=vpp, use_distributed_optimizer=False), seed=1)
    chunks = build_model(model_cfg, runtime, ModelBuildConfig(recompute=recompute))
    # Random init does not depend on the layout: every shard is the TP1/PP1 init's (same seed), on
    # every pipeline stage (the GPU path uses the same code: models.provider.init_random_weights).
    init_err = chunk_grads_vs_reference(chunks, full, runtime.tp_rank, runtime.tp, tied=model_cfg.tie_word_embeddings,
                                        atol=0.0, rtol=0.0, select=lambda p: p.detach())
    assert init_err == 0.0
    load_unsharded(chunks, full, runtime.tp_rank, runtime.tp, tied=model_cfg.tie_word_embeddings)
    ddp = wrap_ddp(chunks, runtime)
    seen = sharded_step(ddp, runtime, data)
    logit_err = check_logits(seen, ref_logits, runtime, name) if runtime.is_last_stage else 0.0
    grad_err = chunk_grads_vs_reference(ddp, ref_grads, runtime.tp_rank, runtime.tp,
                                        tied=model_cfg.tie_word_embeddings, atol=ATOL, rtol=RTOL)
    errs = torch.tensor([logit_err, grad_err], dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    rank_print(f"{name:<22} dp={runtime.dp} max|dlogit|={errs[0]:.2e} max|dgrad|={errs[1]:.2e} "
               f"({time.time() - start:.1f}s)")
    runtime.destroy()


def check_adam_and_checkpoint(model_cfg, full, data, ckpt_dir):
    """TP2 x DP2, distributed optimizer: 3 AdamW steps with clipping vs torch.optim.AdamW."""
    # Adam normalises each entry's step to ~lr, so an entry whose gradient is at fp32 noise level
    # (sharded vs unsharded summation order) can move by up to ~lr per step: lr=1e-3 keeps 3 steps of
    # that within the 1e-5 tolerance (lr=1e-2 showed one such entry off by 2.4e-5).
    optim_cfg = OptimConfig(lr=1e-3, weight_decay=0.1, clip_grad=0.5)
    steps = 3

    runtime = init_parallel(ParallelConfig(tp=1, pp=1), seed=1)
    ref = build_model(model_cfg, runtime)[0]
    load_unsharded([ref], full, 0, 1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), eps=optim_cfg.adam_eps)
    for _ in range(steps):
        run_reference(ref, data)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), optim_cfg.clip_grad)
        ref_opt.step()
    ref_after = unsharded_params(ref)
    ref_logits, _ = run_reference(ref, data)
    runtime.destroy()

    runtime = init_parallel(ParallelConfig(tp=2, pp=1, use_distributed_optimizer=True), seed=1)
    assert runtime.dp == 2
    chunks = build_model(model_cfg, runtime)
    load_unsharded(chunks, full, runtime.tp_rank, runtime.tp)
    ddp = wrap_ddp(chunks, runtime)
    optimizer = build_optimizer(ddp, runtime, optim_cfg)
    for _ in range(steps):
        for c in ddp:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        sharded_step(ddp, runtime, data)
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
    param_err = chunk_grads_vs_reference(ddp, ref_after, runtime.tp_rank, runtime.tp, tied=False,
                                         atol=ATOL, rtol=RTOL, select=lambda p: p.detach())
    rank_print(f"{'TP2xDP2 distopt adam':<22} 3 steps max|dparam|={param_err:.2e}")
    save_model(ddp, model_cfg, ckpt_dir)
    runtime.destroy()

    for tp, pp in ((1, 1), (1, 2)):
        runtime = init_parallel(ParallelConfig(tp=tp, pp=pp), seed=3)  # another seed: weights must load
        chunks = build_model(model_cfg, runtime)
        load_model(chunks, ckpt_dir)
        seen = sharded_step(wrap_ddp(chunks, runtime), runtime, data, forward_only=True)
        err = check_logits(seen, ref_logits, runtime, f"ckpt TP2 -> TP{tp}PP{pp}") if runtime.is_last_stage else 0
        err = torch.tensor(err, dtype=torch.float64)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        rank_print(f"ckpt TP2 -> TP{tp}xPP{pp}     max|dlogit|={err:.2e}")
        runtime.destroy()


def main() -> None:
    ckpt_dir = sys.argv[1]
    for tied in (False, True):
        model_cfg = tiny_llama(tie_word_embeddings=tied)
        runtime = init_parallel(ParallelConfig(tp=1, pp=1), seed=1)
        ref = build_model(model_cfg, runtime)[0]
        full = unsharded_params(ref)
        data = make_data(model_cfg.vocab_size)
        ref_logits, ref_grads = run_reference(ref, data)
        runtime.destroy()
        if tied:  # tied embeddings matter where the output layer lives on another stage
            check_layout("tied PP2", model_cfg, full, ref_logits, ref_grads, data, pp=2)
            check_layout("tied TP2xPP2", model_cfg, full, ref_logits, ref_grads, data, tp=2, pp=2)
            continue
        check_layout("TP2", model_cfg, full, ref_logits, ref_grads, data, tp=2)
        check_layout("TP2 recompute=full", model_cfg, full, ref_logits, ref_grads, data, tp=2,
                     recompute="full")
        check_layout("TP4", model_cfg, full, ref_logits, ref_grads, data, tp=4)
        check_layout("PP2 (1F1B)", model_cfg, full, ref_logits, ref_grads, data, pp=2)
        check_layout("TP2xPP2", model_cfg, full, ref_logits, ref_grads, data, tp=2, pp=2)
        check_layout("PP2xVPP2 (interleaved)", model_cfg, full, ref_logits, ref_grads, data, pp=2, vpp=2)
        check_adam_and_checkpoint(model_cfg, full, data, ckpt_dir)
    rank_print("layouts: all checks passed")


if __name__ == "__main__":
    main()
