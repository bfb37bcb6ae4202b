"""The OPSD step against an independent computation on the HF transformers model.

For tiny random HF models (Qwen3: qk-norm, head_dim != hidden/heads, tied embeddings; Llama: GQA,
llama3 rope scaling), converted into megatron-core with our name map, the step's loss and every
student-side gradient must equal a plain PyTorch OPSD computation on the HF model in fp64: full
vocabulary, teacher distribution detached, per-entry clip, token mean over all response tokens.

Tolerances: megatron runs fp32, the reference fp64: loss 1e-5 relative plus 1e-7 absolute (the loss
is a small difference of O(1) fp32 log-probabilities, so its error floor is fp32 resolution on those,
~1e-8 here); gradients 1e-5 of the largest gradient entry (absolute) plus 1e-4 relative.

usage: torchrun --nproc_per_node=1 opsd_hf_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common import rank_print  # noqa: E402
from megatron_opsd.data.batch import collate_pairs  # noqa: E402
from megatron_opsd.data.contexts import build_pair  # noqa: E402
from megatron_opsd.engine import wrap_ddp  # noqa: E402
from megatron_opsd.models.description import ModelConfig  # noqa: E402
from megatron_opsd.models.hf_mapping import hf_to_unsharded  # noqa: E402
from megatron_opsd.models.provider import build_model  # noqa: E402
from megatron_opsd.models.sharding import load_unsharded  # noqa: E402
from megatron_opsd.opsd import LossConfig, StepContext, Teacher  # noqa: E402
from megatron_opsd.opsd.step import run_schedule, zero_grads  # noqa: E402
from megatron_opsd.parallel import ParallelConfig, init_parallel  # noqa: E402
from tests.hf_fixtures import build_hf_model  # noqa: E402

TEMPERATURE, CLIP = 1.1, 0.002  # clip low enough that some entries are capped on this random model


def make_pairs(vocab: int):
    gen = torch.Generator().manual_seed(11)
    pairs = []
    for _ in range(4):
        ls = int(torch.randint(3, 8, (1,), generator=gen))
        s = torch.randint(0, vocab, (ls,), generator=gen).tolist()
        t = s + torch.randint(0, vocab, (int(torch.randint(5, 12, (1,), generator=gen)),), generator=gen).tolist()
        r = torch.randint(0, vocab, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()
        pairs.append(build_pair(s, t, r, stop_ids=set(), max_seq_len=64, overlong="drop"))
    return pairs


def reference(hf_model, pairs, teacher_model=None):
    """Plain OPSD on the HF model: fp64, full vocabulary, teacher held constant (``teacher_model``: OPD,
    another model's logits on the teacher context)."""
    model = hf_model.double()
    teacher_model = model if teacher_model is None else teacher_model.double()
    model.zero_grad()
    total, count, clipped_any = 0.0, 0, False
    for pair in pairs:
        r = len(pair.response_ids)
        s_logits = model(torch.tensor([pair.student_ids])).logits[0, pair.student_start:pair.student_start + r]
        with torch.no_grad():
            t_logits = teacher_model(torch.tensor([pair.teacher_ids])).logits[0, pair.teacher_start:pair.teacher_start + r]
        logp_s = torch.log_softmax(s_logits / TEMPERATURE, dim=-1)
        logp_t = torch.log_softmax(t_logits / TEMPERATURE, dim=-1)
        entries = logp_t.exp() * (logp_t - logp_s)
        clipped_any |= bool((entries > CLIP).any())
        total = total + torch.minimum(entries, torch.full_like(entries, CLIP)).sum()
        count += r
    loss = total / count
    loss.backward()
    assert clipped_any, "the clip should be active in this test"
    grads = {name: p.grad.float() for name, p in model.named_parameters()}
    return loss.item(), grads


def check(family: str) -> None:
    hf_model = build_hf_model(family)
    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    pairs = make_pairs(cfg.vocab_size)

    runtime = init_parallel(ParallelConfig(), seed=0)
    chunks = build_model(cfg, runtime)
    full = dict(hf_to_unsharded(((k, v.detach()) for k, v in hf_model.state_dict().items()), cfg))
    load_unsharded(chunks, full, 0, 1, tied=cfg.tie_word_embeddings)
    ddp = wrap_ddp(chunks, runtime)
    ctx = StepContext(runtime=runtime, loss=LossConfig(clip=CLIP, teacher="live"), temperature=TEMPERATURE,
                      vocab_size=cfg.vocab_size, teacher=Teacher(ddp))
    zero_grads(ddp, None)
    batches = [collate_pairs(pairs[:3], 0), collate_pairs(pairs[3:], 0)]
    metrics = run_schedule(ctx, ddp, batches, pad_id=0)
    ours = {name: p.main_grad for name, p in ddp[0].module.named_parameters()}

    ref_loss, ref_grads_hf = reference(hf_model, pairs)
    compare(family, cfg, metrics["loss"], ours, ref_loss, dict(hf_to_unsharded(ref_grads_hf.items(), cfg)))
    runtime.destroy()


def compare(family: str, cfg, loss: float, ours: dict, ref_loss: float, ref_grads: dict) -> None:
    """Loss and every gradient of ours (megatron names) against the reference (unsharded names)."""
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-7, (family, loss, ref_loss)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    worst = 0.0
    for name, grad in ours.items():
        key = "embedding.word_embeddings.weight" if name == "output_layer.weight" and cfg.tie_word_embeddings else name
        expected = ref_grads[key]
        torch.testing.assert_close(grad, expected, atol=1e-5 * scale, rtol=1e-4, msg=lambda m: f"{family} {name}: {m}")
        worst = max(worst, (grad - expected).abs().max().item())
    rank_print(f"{family:<8} loss={loss:.8f} reference={ref_loss:.8f} "
               f"max|dgrad|={worst:.2e} (largest grad {scale:.2e}) over {len(ours)} tensors")


def main() -> None:
    for family in ("qwen3", "llama"):
        check(family)
    rank_print("opsd_hf_reference: all checks passed")


if __name__ == "__main__":
    main()
