"""OPSD step on a mixture of experts (tiny Qwen2-MoE: 4 experts top-2, a gated shared expert, layer 1 dense;
router_aux_loss_coef 0.01): layout invariance and the student's load-balancing loss.

usage: torchrun --nproc_per_node=1 moe_opsd_step.py REF.json   (the single-process reference, checks)
       torchrun --nproc_per_node=4 moe_opsd_step.py REF.json   (layouts)

Reference (world of one, 4 micro-batches of 2 pairs):
  * the reported ``moe_aux_loss`` equals the load-balancing loss of student-only forwards of the same
    micro-batches (megatron's tracker read after each): the teacher part (live teacher = the student's
    own weights and routers, under no_grad) adds nothing to it;
  * router_aux_loss_coef = 0: same loss, a different gradient norm (the aux loss reaches the gradients),
    and no aux loss tracked at all.
Layouts (4 processes; micro-batches stay the same 2 pairs, so each rank runs 4 / dp of them): EP2 (x DP4
for the dense part, expert-DP 2), EP4, EP2 x PP2, DP4 (EP1), and EP2 with a frozen teacher copy: loss,
aux loss and gradient norm equal the reference within 1e-5 relative.
"""

from __future__ import annotations

import json
import sys
import tempfile


from common import rank_print
from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
from megatron_opsd.models.provider import ModelBuildConfig, build_model
from megatron_opsd.models.sharding import ExpertLayout, load_unsharded
from megatron_opsd.opsd import FrozenTeacher, LossConfig, StepContext, Teacher
from megatron_opsd.opsd.step import clear_moe_aux_losses, train_step
from megatron_opsd.parallel import ParallelConfig, init_parallel
from opsd_step import PAD, close, make_pairs, micro_batches

PAIRS_PER_MICROBATCH = 2
LOSS = LossConfig(clip=None, teacher="live")


def setup(aux_coef: float = 0.01):
    from megatron_opsd.conversion.hf_to_megatron import load_hf_unsharded
    from tests.hf_fixtures import save_hf_model

    with tempfile.TemporaryDirectory(prefix="moe-step-") as d:
        save_hf_model("qwen2_moe", d, tokenizer=False, mlp_only_layers=[1], router_aux_loss_coef=aux_coef)
        cfg, full = load_hf_unsharded(d)
    return cfg, full, make_pairs(cfg.vocab_size)


def one_step(cfg, full, pairs, *, ep=1, pp=1, teacher_mode="live", check_tracker=False, uneven=False):
    runtime = init_parallel(ParallelConfig(pp=pp, ep=ep), seed=5)
    chunks = build_model(cfg, runtime)
    load_unsharded(chunks, full, runtime.tp_rank, runtime.tp, tied=cfg.tie_word_embeddings,
                   experts=ExpertLayout.of(runtime))
    ddp = wrap_ddp(chunks, runtime)
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=1e-2, clip_grad=1.0))
    teacher = Teacher(ddp) if teacher_mode == "live" else FrozenTeacher.copy_of(ddp, cfg, runtime, ModelBuildConfig())
    ctx = StepContext(runtime=runtime, loss=LOSS, temperature=1.0, vocab_size=cfg.vocab_size, teacher=teacher)
    count = len(pairs) // PAIRS_PER_MICROBATCH // runtime.dp
    if uneven:  # odd data-parallel ranks: all their pairs in one micro-batch, even ranks: one pair each
        count = 1 if runtime.dp_rank % 2 else len(pairs) // runtime.dp
    batches = micro_batches(pairs, runtime, count)
    expected_aux = student_only_aux_loss(chunks, batches) if check_tracker else None
    metrics = train_step(ctx, ddp, optimizer, batches, pad_id=PAD, clip_grad=1.0)
    runtime.destroy()
    return metrics, expected_aux


def student_only_aux_loss(chunks, batches) -> float:
    """Mean over micro-batches and MoE layers of the load-balancing loss of student-only forwards."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    [model] = chunks
    total = 0.0
    for b in batches:
        clear_moe_aux_losses()
        model(b.student.tokens, b.student.position_ids, b.student.attention_mask)  # grad enabled
        total += get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].sum().item()
    clear_moe_aux_losses()
    return total / (len(batches) * sum(model.config.moe_layer_freq))


def reference(path: str) -> None:
    cfg, full, pairs = setup()
    ref, expected = one_step(cfg, full, pairs, check_tracker=True)
    assert ref["moe_aux_loss"] > 0
    assert abs(ref["moe_aux_loss"] - expected) <= 1e-7 * expected, (ref["moe_aux_loss"], expected)
    print(f"reference loss={ref['loss']:.8f} aux={ref['moe_aux_loss']:.8f} grad_norm={ref['grad_norm']:.8f}; "
          f"aux equals student-only forwards ({expected:.8f}): the teacher part adds nothing", flush=True)
    off_cfg, off_full, _ = setup(aux_coef=0.0)
    off, _ = one_step(off_cfg, off_full, pairs)
    assert close(off["loss"], ref["loss"]), (off["loss"], ref["loss"])
    assert abs(off["grad_norm"] - ref["grad_norm"]) > 1e-4 * ref["grad_norm"], (off, ref)
    assert off["moe_aux_loss"] == 0.0
    print(f"router_aux_loss_coef=0: same loss, grad_norm {off['grad_norm']:.8f} != {ref['grad_norm']:.8f}, "
          "no aux loss tracked", flush=True)
    with open(path, "w") as f:
        json.dump({**ref, "aux_off": off}, f)
    print("moe_opsd_step reference: done", flush=True)


LAYOUTS = [("EP2", dict(ep=2)), ("EP4", dict(ep=4)), ("EP2xPP2", dict(ep=2, pp=2)), ("DP4", dict()),
           ("EP2 frozen teacher", dict(ep=2, teacher_mode="initial"))]


def layouts(path: str) -> None:
    with open(path) as f:
        ref = json.load(f)
    cfg, full, pairs = setup()
    off_cfg, off_full, _ = setup(aux_coef=0.0)  # before any process group: HF saves on every rank then
    for name, kwargs in LAYOUTS:
        got, _ = one_step(cfg, full, pairs, **kwargs)
        for key in ("loss", "moe_aux_loss", "grad_norm"):
            assert close(got[key], ref[key]), f"{name}: {key} {got[key]} vs reference {ref[key]}"
        rank_print(f"{name:<19} loss={got['loss']:.8f} aux={got['moe_aux_loss']:.8f} "
                   f"grad_norm={got['grad_norm']:.8f}: matches the single-process run")
    # EP2 with data-parallel ranks holding different numbers of micro-batches (as token-budget batching
    # makes them): every rank takes part in each all-to-all (no hang) and, aux loss off, loss and
    # gradient norm equal the single-process run (the padding micro-batches add nothing)
    got, _ = one_step(off_cfg, off_full, pairs, ep=2, uneven=True)
    for key in ("loss", "grad_norm"):
        assert close(got[key], ref["aux_off"][key]), f"EP2 uneven: {key} {got[key]} vs {ref['aux_off'][key]}"
    rank_print(f"{'EP2 uneven':<19} loss={got['loss']:.8f} grad_norm={got['grad_norm']:.8f}: matches the "
               "single-process run (aux loss off)")
    rank_print("moe_opsd_step: all checks passed")


def main() -> None:
    import torch.distributed as dist

    path = sys.argv[1]
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    reference(path) if world == 1 else layouts(path)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
