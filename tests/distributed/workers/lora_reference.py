"""LoRA OPSD step against transformers + peft (independent reference), world of one.

For tiny random HF Qwen3 (qk-norm, tied) and Llama (GQA) models with PEFT adapters on all seven
projections (random, non-zero B, so every adapter matters), the megatron step with our adapters and the
theta_0 teacher by adapter switch-off must give the loss and every adapter gradient of a plain fp64
OPSD computation on the PEFT model: student = adapters on, teacher = ``disable_adapter()``, detached.
Also: the teacher's logits equal the base model's bit for bit, and no base weight is copied.

Tolerances: loss as in opsd_hf_reference.py (megatron fp32 vs reference fp64); gradients ATOL below.

usage: torchrun --nproc_per_node=1 lora_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common import rank_print  # noqa: E402
from opsd_hf_reference import CLIP, TEMPERATURE, make_pairs  # noqa: E402

from megatron_opsd.data.batch import collate_pairs  # noqa: E402
from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp  # noqa: E402
from megatron_opsd.models.description import ModelConfig  # noqa: E402
from megatron_opsd.models.hf_mapping import hf_to_unsharded  # noqa: E402
from megatron_opsd.models.lora import PROJECTIONS, LoRAConfig, adapter_items, attach_lora, load_peft_tensors  # noqa: E402
from megatron_opsd.models.provider import build_model  # noqa: E402
from megatron_opsd.models.sharding import load_unsharded  # noqa: E402
from megatron_opsd.opsd import AdapterTeacher, LossConfig, StepContext, check_teacher_isolated  # noqa: E402
from megatron_opsd.opsd.step import run_schedule, train_step, zero_grads  # noqa: E402
from megatron_opsd.parallel import ParallelConfig, init_parallel  # noqa: E402
from tests.hf_fixtures import build_hf_model  # noqa: E402

RANK, ALPHA = 4, 8.0
# Adapter gradients are sums over every token of products with h = A x (O(1) entries that cancel to
# ~1e-2): fp32 accumulation leaves ~4e-5 of the largest gradient (seen: llama 8.1e-7 of 2.15e-2).
ATOL = 5e-5


def peft_model(family: str):
    import peft

    base = build_hf_model(family)
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                      target_modules=list(PROJECTIONS)))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # non-zero B: the adapters change the student
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def reference(model, pairs):
    """Plain OPSD on the PEFT model in fp64: student with adapters, teacher = the base (disabled)."""
    model = model.double()
    model.zero_grad()
    total, count = 0.0, 0
    for pair in pairs:
        r = len(pair.response_ids)
        s_logits = model(torch.tensor([pair.student_ids])).logits[0, pair.student_start:pair.student_start + r]
        with torch.no_grad(), model.disable_adapter():
            t_logits = model(torch.tensor([pair.teacher_ids])).logits[0, pair.teacher_start:pair.teacher_start + r]
        logp_s = torch.log_softmax(s_logits / TEMPERATURE, dim=-1)
        logp_t = torch.log_softmax(t_logits / TEMPERATURE, dim=-1)
        entries = logp_t.exp() * (logp_t - logp_s)
        total = total + torch.minimum(entries, torch.full_like(entries, CLIP)).sum()
        count += r
    loss = total / count
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}


def check(family: str) -> None:
    model = peft_model(family)
    base_state = {k.removeprefix("base_model.model."): v.detach().clone()
                  for k, v in model.state_dict().items() if "lora_" not in k}
    base_state = {k.replace(".base_layer.", "."): v for k, v in base_state.items()}
    adapters_state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    adapters_state = {k.replace(".default.", "."): v for k, v in adapters_state.items()}
    cfg = ModelConfig.from_hf_dict(model.base_model.model.config.to_dict())
    pairs = make_pairs(cfg.vocab_size)

    runtime = init_parallel(ParallelConfig(), seed=0)
    chunks = build_model(cfg, runtime)
    load_unsharded(chunks, dict(hf_to_unsharded(base_state.items(), cfg)), 0, 1, tied=cfg.tie_word_embeddings)
    storage_before = {p.untyped_storage().data_ptr() for p in chunks[0].parameters()}
    attach_lora(chunks, cfg, LoRAConfig(rank=RANK, alpha=ALPHA), runtime, seed=0)
    load_peft_tensors(chunks, adapters_state, "peft model")
    ddp = wrap_ddp(chunks, runtime)
    teacher = AdapterTeacher(ddp, "initial")
    check_teacher_isolated(teacher, ddp)
    trainable = [n for n, p in ddp[0].module.named_parameters() if p.requires_grad]
    assert trainable and all("_lora." in n for n in trainable), trainable
    base_params = [p for n, p in ddp[0].module.named_parameters() if "_lora." not in n]
    assert {p.untyped_storage().data_ptr() for p in base_params} <= storage_before, "a base weight was copied"

    ctx = StepContext(runtime=runtime, loss=LossConfig(clip=CLIP, teacher="initial"), temperature=TEMPERATURE,
                      vocab_size=cfg.vocab_size, teacher=teacher)
    zero_grads(ddp, None)
    metrics = run_schedule(ctx, ddp, [collate_pairs(pairs[:3], 0), collate_pairs(pairs[3:], 0)], pad_id=0)
    ours = {key: getattr(lora, name).main_grad.clone() for key, lora, name in adapter_items(ddp)}

    # the teacher (adapters off) is the base model, bit for bit
    tokens = torch.tensor([pairs[0].teacher_ids])
    positions = torch.arange(tokens.shape[1])[None]
    mask = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool), 1)[None, None]
    plain = build_model(cfg, runtime)
    load_unsharded(plain, dict(hf_to_unsharded(base_state.items(), cfg)), 0, 1, tied=cfg.tie_word_embeddings)
    with torch.no_grad():
        base_logits = plain[0](tokens, positions, mask)

    def teacher_is_base() -> None:
        with torch.no_grad(), teacher.context():
            teacher_logits = ddp[0].module(tokens, positions, mask)
        with torch.no_grad():
            student_logits = ddp[0].module(tokens, positions, mask)
        assert torch.equal(teacher_logits, base_logits), "the adapters-off teacher is not the base model"
        assert (student_logits - base_logits).abs().max() > 1e-3, "the adapters change nothing: the test is void"

    teacher_is_base()
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=1e-2))
    for step in range(2):  # ... at every step: optimizer steps move the adapters only
        ctx.step = step
        train_step(ctx, ddp, optimizer, [collate_pairs(pairs, 0)], pad_id=0, clip_grad=1.0)
        teacher_is_base()

    ref_loss, ref_grads = reference(model, pairs)
    ref_grads = {k.replace(".default.", "."): v for k, v in ref_grads.items()}
    assert set(ref_grads) == set(ours), sorted(set(ref_grads) ^ set(ours))[:4]
    assert abs(metrics["loss"] - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-7, (family, metrics["loss"], ref_loss)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    worst = 0.0
    for key, grad in ours.items():
        torch.testing.assert_close(grad, ref_grads[key], atol=ATOL * scale, rtol=1e-4, msg=lambda m: f"{key}: {m}")
        worst = max(worst, (grad - ref_grads[key]).abs().max().item())
    rank_print(f"lora {family:<8} loss={metrics['loss']:.8f} reference={ref_loss:.8f} max|dgrad|={worst:.2e} "
               f"(largest grad {scale:.2e}) over {len(ours)} adapter tensors; teacher == base bit for bit")
    runtime.destroy()


def main() -> None:
    for family in ("qwen3", "llama"):
        check(family)
    rank_print("lora_reference: all checks passed")


if __name__ == "__main__":
    main()
