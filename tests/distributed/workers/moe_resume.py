"""Resuming a mixture-of-experts training checkpoint at the same and at another expert-parallel size.

usage: torchrun --nproc_per_node=2 moe_resume.py CKPT_ROOT

Tiny Qwen3-MoE (4 experts, top-2, router_aux_loss_coef 0.01), OPSD steps with Adam at lr 1e-2 on fixed
batches (one set per step), 2 processes:
  A. EP2 (dense DP2, expert-DP1: megatron-core chains a dense and an expert distributed optimizer):
     3 uninterrupted steps, a training checkpoint after step 1 (in each optimizer format).
  B. EP2 resumed from it: every parameter's optimizer state (fp32 main value, exp_avg, exp_avg_sq,
     step), gathered unsharded under its global name, equals A's at the save; steps 2 and 3 give A's loss,
     aux loss and grad norm (same layout: bit-identical expected, checked to 1e-5 relative); the same
     from the dp_reshardable checkpoint.
  C. EP1 (DP2: one distributed optimizer holds the experts too) resumed from the same checkpoint: the
     same optimizer state equality; steps 2 and 3 within 1e-5 of A; a checkpoint after step 2.
  D. EP2 resumed from C's EP1 checkpoint: the optimizer state equals C's at its save; step 3 within
     1e-5 of A.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from common import rank_print
from megatron_opsd import checkpoint as ckpt
from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
from megatron_opsd.models.provider import build_model
from megatron_opsd.models.sharding import ExpertLayout, expert_offset, layer_offset_map, load_unsharded, to_global_name
from megatron_opsd.opsd import LossConfig, StepContext, Teacher
from megatron_opsd.opsd.step import train_step
from megatron_opsd.parallel import ParallelConfig, init_parallel
from opsd_step import PAD, close, make_pairs, micro_batches

STEPS = 3
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def setup():
    from megatron_opsd.conversion.hf_to_megatron import load_hf_unsharded
    from tests.hf_fixtures import save_hf_model

    with tempfile.TemporaryDirectory(prefix="moe-resume-") as d:
        save_hf_model("qwen3_moe", d, tokenizer=False)
        return load_hf_unsharded(d)


def optimizer_state(model, optimizer, runtime) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's distributed-optimizer state, unsharded, under its global name (on all ranks):
    each DP rank fills the slice of the flattened parameter it owns, a sum over the optimizer's DP group
    assembles it, an all-gather over ranks collects the experts other EP ranks hold."""
    names = {p: to_global_name(n, layer_offset_map(model), expert_offset(model, ExpertLayout.of(runtime)))
             for n, p in model.named_parameters()}
    mine = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for buffer in opt.buffers:
            for param in buffer.param_index_map:
                full = torch.zeros(len(STATE_KEYS) + 1, param.numel())
                if param in opt.model_param_gbuf_map:
                    owned = opt._get_model_param_range_map(param)["param"]
                    state = opt._get_main_param_and_optimizer_states(param)
                    for i, key in enumerate(STATE_KEYS):
                        full[i, owned.start:owned.end] = state[key].detach().float()
                    full[-1, owned.start:owned.end] = float(state["step"])
                dist.all_reduce(full, group=opt.data_parallel_group)
                mine[names[param]] = full
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: {**dict(zip(STATE_KEYS, t[:-1])), "step": t[-1]} for part in gathered for name, t in part.items()}


def run(cfg, full, root: Path, *, ep: int, first: int, save_after: int | None = None, load: Path | None = None):
    """Steps ``first``..STEPS at expert-parallel size ``ep``; metrics per step, the optimizer state after
    the load (or None) and at the save (or None)."""
    runtime = init_parallel(ParallelConfig(ep=ep), seed=5)
    chunks = build_model(cfg, runtime)
    load_unsharded(chunks, full, runtime.tp_rank, runtime.tp, tied=cfg.tie_word_embeddings,
                   experts=ExpertLayout.of(runtime))
    ddp = wrap_ddp(chunks, runtime)
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=1e-2, clip_grad=1.0))
    loaded = saved = None
    if load is not None:
        ckpt.load_training(load, chunks=ddp, optimizer=optimizer, teacher_chunks=None, runtime=runtime)
        loaded = optimizer_state(chunks[0], optimizer, runtime)
    ctx = StepContext(runtime=runtime, loss=LossConfig(clip=None, teacher="live"), temperature=1.0,
                      vocab_size=cfg.vocab_size, teacher=Teacher(ddp))
    metrics = {}
    for step in range(first, STEPS + 1):
        batches = micro_batches(make_pairs(cfg.vocab_size, seed=step), runtime, 2)
        metrics[step] = train_step(ctx, ddp, optimizer, batches, pad_id=PAD, clip_grad=1.0)
        if step == save_after:
            for fmt in ckpt.OPTIMIZER_FORMATS:
                ckpt.save_training(root / fmt, step, chunks=ddp, optimizer=optimizer, teacher_chunks=None,
                                   runtime=runtime, model=cfg, common={}, keep_last=0, optimizer_format=fmt)
            saved = optimizer_state(chunks[0], optimizer, runtime)
    runtime.destroy()
    return metrics, loaded, saved


def same_state(what: str, got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), f"{what}: parameters {sorted(set(got) ^ set(want))[:4]}"
    for name in want:
        for key in (*STATE_KEYS, "step"):
            assert torch.equal(got[name][key], want[name][key]), f"{what}: {name} {key} differs"
    rank_print(f"{what}: optimizer state of {len(want)} parameters equals the saved one")


def same_metrics(what: str, got: dict, want: dict) -> None:
    for step, m in got.items():
        for key in ("loss", "moe_aux_loss", "grad_norm"):
            assert close(m[key], want[step][key]), \
                f"{what} step {step}: {key} {m[key]} vs uninterrupted {want[step][key]}"
        rank_print(f"{what:<26} step {step} loss={m['loss']:.8f} aux={m['moe_aux_loss']:.8f} "
                   f"grad_norm={m['grad_norm']:.8f}: equals the uninterrupted run")


def main() -> None:
    root = Path(sys.argv[1])
    cfg, full = setup()
    ref, _, at_save = run(cfg, full, root / "a", ep=2, first=1, save_after=1)
    assert ref[1]["moe_aux_loss"] > 0
    saved_a = ckpt.step_dir(root / "a" / "fully_reshardable", 1)
    got, loaded, _ = run(cfg, full, root / "b", ep=2, first=2, load=saved_a)
    same_state("EP2 -> EP2", loaded, at_save)
    same_metrics("EP2 -> EP2", got, ref)
    got, loaded, _ = run(cfg, full, root / "b", ep=2, first=2, load=ckpt.step_dir(root / "a" / "dp_reshardable", 1))
    same_state("EP2 -> EP2 dp_reshardable", loaded, at_save)
    same_metrics("EP2 -> EP2 dp_reshardable", got, ref)
    got, loaded, at_ep1_save = run(cfg, full, root / "c", ep=1, first=2, save_after=2, load=saved_a)
    same_state("EP2 -> EP1", loaded, at_save)
    same_metrics("EP2 -> EP1", got, ref)
    got, loaded, _ = run(cfg, full, root / "d", ep=2, first=3, load=ckpt.step_dir(root / "c" / "fully_reshardable", 2))
    same_state("EP1 -> EP2", loaded, at_ep1_save)
    same_metrics("EP1 -> EP2", got, ref)
    rank_print("moe_resume: all checks passed")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
