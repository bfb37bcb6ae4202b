"""The OPSD step on mixtures of experts against a plain fp64 OPSD computation on the HF transformers model
(the dense check is opsd_hf_reference.py; same pairs, loss, tolerances). The aux loss is off in both
(router_aux_loss_coef = 0 here; HF adds none without output_router_logits): loss and every student
gradient, router and each expert included, must match. Also SFT (fp64 mean NLL of the response tokens)
and OPD (the teacher another random Qwen3-MoE with its own routers, frozen) on Qwen3-MoE.

usage: torchrun --nproc_per_node=1 moe_opsd_hf_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common import rank_print  # noqa: E402
from opsd_hf_reference import CLIP, TEMPERATURE, compare, make_pairs, reference  # noqa: E402
from megatron_opsd.data.batch import collate_pairs  # noqa: E402
from megatron_opsd.engine import wrap_ddp  # noqa: E402
from megatron_opsd.models.description import ModelConfig  # noqa: E402
from megatron_opsd.models.hf_mapping import hf_to_unsharded  # noqa: E402
from megatron_opsd.models.provider import build_model  # noqa: E402
from megatron_opsd.models.sharding import load_unsharded  # noqa: E402
from megatron_opsd.opsd import FrozenTeacher, LossConfig, StepContext, Teacher  # noqa: E402
from megatron_opsd.opsd.step import run_schedule, zero_grads  # noqa: E402
from megatron_opsd.parallel import ParallelConfig, init_parallel  # noqa: E402
from tests.hf_fixtures import build_hf_model, checkpoint_tensors, to_checkpoint_names  # noqa: E402


def megatron_copy(hf_model, cfg, runtime) -> list:
    chunks = build_model(cfg, runtime)
    tensors = checkpoint_tensors(hf_model)
    load_unsharded(chunks, dict(hf_to_unsharded(tensors.items(), cfg, names=set(tensors))), 0, 1,
                   tied=cfg.tie_word_embeddings)
    return chunks


def moe_hf_model(family: str, seed: int = 0, **overrides):
    hf_model = build_hf_model(family, seed=seed, router_aux_loss_coef=0.0, **overrides)
    hf_model.config._experts_implementation = "eager"  # the per-expert loop: the grouped kernel has no fp64
    return hf_model


def sft_reference(hf_model, pairs):
    """Plain SFT on the HF model: fp64 mean negative log-likelihood of the response tokens."""
    model = hf_model.double()
    model.zero_grad()
    total, count = 0.0, 0
    for pair in pairs:
        r = len(pair.response_ids)
        logits = model(torch.tensor([pair.student_ids])).logits[0, pair.student_start:pair.student_start + r]
        total = total - torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(pair.response_ids)[:, None]).sum()
        count += r
    loss = total / count
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters()}


def check(family: str, mode: str = "opsd", **overrides) -> None:
    """``mode``: opsd (live teacher), sft (no teacher), opd (a frozen teacher: another random model of
    the same family, its own routers)."""
    hf_model = moe_hf_model(family, **overrides)
    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    pairs = make_pairs(cfg.vocab_size)
    runtime = init_parallel(ParallelConfig(), seed=0)
    ddp = wrap_ddp(megatron_copy(hf_model, cfg, runtime), runtime)
    hf_teacher = moe_hf_model(family, seed=1, **overrides) if mode == "opd" else None
    if mode == "sft":
        loss, teacher = LossConfig(mode="sft"), None
    elif mode == "opd":
        loss = LossConfig(mode="opd", opd_teacher_load="(in memory)", teacher="initial", clip=CLIP)
        teacher = FrozenTeacher(megatron_copy(hf_teacher, cfg, runtime))
    else:
        loss, teacher = LossConfig(clip=CLIP, teacher="live"), Teacher(ddp)
    ctx = StepContext(runtime=runtime, loss=loss, temperature=TEMPERATURE, vocab_size=cfg.vocab_size, teacher=teacher)
    zero_grads(ddp, None)
    metrics = run_schedule(ctx, ddp, [collate_pairs(pairs[:3], 0), collate_pairs(pairs[3:], 0)], pad_id=0)
    ours = {name: p.main_grad for name, p in ddp[0].module.named_parameters()}

    ref_loss, ref_grads_hf = sft_reference(hf_model, pairs) if mode == "sft" else \
        reference(hf_model, pairs, hf_teacher)
    compare(family if mode == "opsd" else f"{family} {mode}", cfg, metrics["loss"], ours, ref_loss,
            dict(hf_to_unsharded(to_checkpoint_names(ref_grads_hf, family).items(), cfg)))
    assert metrics["moe_aux_loss"] == 0.0 and any("local_experts.3" in n for n in ours)
    runtime.destroy()


def main() -> None:
    check("qwen3_moe")
    check("qwen2_moe", mlp_only_layers=[1])
    check("mixtral")
    check("qwen3_moe", mode="sft")
    check("qwen3_moe", mode="opd")
    rank_print("moe_opsd_hf_reference: all checks passed")


if __name__ == "__main__":
    main()
