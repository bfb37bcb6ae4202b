"""The GRPO step against an independent fp64 computation on the HF model, at TP1, TP2, PP2, DP2 and CP2.

Fixed samples (3 groups of n=2 responses; one group's rewards are equal), fixed rewards, old log-probs
= the model's own plus noise of +-0.4 (so the ratio leaves [0.8, 1.2] and the clip is active), and a
theta_0 (the frozen teacher machinery) that differs from the student by small noise (so the k3 KL and
its gradient are not zero). The reference is plain PyTorch on the HF transformers model in fp64:
advantages (r - mean) / (std + 1e-6) per group, ratio = exp(logp - old),
-min(ratio A, clip(ratio) A) + kl_coef (exp(ref - logp) - (ref - logp) - 1), token mean; Dr.GRPO:
A = r - mean, token sum / (responses * budget). The step's loss and every gradient must match it
(loss 1e-5 relative + 1e-7; gradients 1e-5 of the largest + 1e-4 relative, as opsd_hf_reference.py),
and every layout's loss must match TP1's within 1e-5 relative.

World of one, also: opsd+grpo with grpo_weight 0 equals opsd, and with divergence_weight 0 equals grpo
(loss and gradients); a flat group gives zero advantage and a finite loss.

usage: torchrun --nproc_per_node={1,2} grpo_step.py
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common import chunk_grads_vs_reference, main_grad, rank_print  # noqa: E402
from megatron_opsd.data.batch import collate_pairs  # noqa: E402
from megatron_opsd.data.contexts import build_pair  # noqa: E402
from megatron_opsd.engine import wrap_ddp  # noqa: E402
from megatron_opsd.models.description import ModelConfig  # noqa: E402
from megatron_opsd.models.hf_mapping import hf_to_unsharded  # noqa: E402
from megatron_opsd.models.provider import build_model  # noqa: E402
from megatron_opsd.models.sharding import load_unsharded  # noqa: E402
from megatron_opsd.opsd import FrozenTeacher, LossConfig, StepContext, Teacher  # noqa: E402
from megatron_opsd.methods.grpo import group_advantages  # noqa: E402
from megatron_opsd.opsd.step import run_schedule, zero_grads  # noqa: E402
from megatron_opsd.parallel import ParallelConfig, init_parallel  # noqa: E402
from tests.cp_attention import use_cp_test_attention  # noqa: E402
from tests.hf_fixtures import build_hf_model  # noqa: E402

N, CLIP_EPS, KL_COEF, BUDGET = 2, 0.2, 0.1, 16
REWARDS = [1.0, 0.0, 0.3, 0.9, 0.5, 0.5]  # the third group is flat
FAMILY = "qwen3"  # tied embeddings, qk-norm, head_dim != hidden/heads


def models():
    student = build_hf_model(FAMILY)
    theta0 = build_hf_model(FAMILY)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in theta0.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return student, theta0


def samples(vocab: int):
    """6 (student prompt, teacher prompt, response) triples: groups of 2 share their prompts."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(len(REWARDS) // N):
        s = torch.randint(1, vocab, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
        t = s + torch.randint(1, vocab, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(N):
            r = torch.randint(1, vocab, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()
            out.append((s, t, r))
    return out


def hf_log_softmax(model, prompt, response):
    """[R, V]: the next-token log-probabilities at the response's positions (temperature 1)."""
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(response)]
    return torch.log_softmax(logits, dim=-1)


def hf_logprobs(model, prompt, response):
    return hf_log_softmax(model, prompt, response).gather(1, torch.tensor(response)[:, None])[:, 0]


def old_logprobs(student, triples):
    """The model's own log-probs + fixed noise in [-0.4, 0.4] (a rollout from slightly older weights)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return [(hf_logprobs(student.double(), s, r) + (torch.rand(len(r), generator=gen, dtype=torch.float64) - 0.5)
                 * 0.8).tolist() for s, _, r in triples]


def reference(student, theta0, triples, old, *, dr_grpo=False, kl="k3"):
    """Plain GRPO on the HF model in fp64; ``kl``: None, k3, or the exact forward_kl KL(theta_0 || pi) /
    reverse_kl KL(pi || theta_0) summed over the vocabulary."""
    model = student.double()
    model.zero_grad()
    ref_model = theta0.double()
    total, tokens, clipped = 0.0, 0, 0
    for g in range(len(REWARDS) // N):
        group = REWARDS[g * N:(g + 1) * N]
        mean = sum(group) / N
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / N)
        for i in range(N):
            k = g * N + i
            s, _, r = triples[k]
            adv = group[i] - mean if dr_grpo else (group[i] - mean) / (std + 1e-6)
            logp = hf_logprobs(model, s, r)
            ratio = torch.exp(logp - torch.tensor(old[k], dtype=torch.float64))
            bounded = ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS)
            clipped += int(((bounded * adv) < (ratio * adv)).sum())
            loss = -torch.minimum(ratio * adv, bounded * adv)
            if kl == "k3":
                with torch.no_grad():
                    ref = hf_logprobs(ref_model, s, r)
                loss = loss + KL_COEF * (torch.exp(ref - logp) - (ref - logp) - 1)
            elif kl is not None:
                log_pi = hf_log_softmax(model, s, r)
                with torch.no_grad():
                    log_p0 = hf_log_softmax(ref_model, s, r)
                if kl == "forward_kl":
                    exact = (log_p0.exp() * (log_p0 - log_pi)).sum(-1)
                else:
                    exact = (log_pi.exp() * (log_pi - log_p0)).sum(-1)
                loss = loss + KL_COEF * exact
            total = total + loss.sum()
            tokens += len(r)
    loss = total / (len(REWARDS) * BUDGET if dr_grpo else tokens)
    loss.backward()
    assert clipped > 0, "the ratio clip should be active in this test"
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters()}


def batches(triples, old, runtime, num_microbatches, *, grpo_contexts=True, dr_grpo=False):
    """This DP rank's contiguous share, as micro-batches carrying advantages and old log-probs."""
    adv, flat = group_advantages(REWARDS, N, scale_by_std=not dr_grpo)
    assert flat == 1 and adv[4:].abs().sum() == 0
    pairs = [build_pair(s, s if grpo_contexts else t, r, stop_ids=set(), max_seq_len=64, overlong="drop")
             for s, t, r in triples]
    per_rank = len(pairs) // runtime.dp
    lo = runtime.dp_rank * per_rank
    size = per_rank // num_microbatches
    return [collate_pairs(pairs[lo + i * size:lo + (i + 1) * size], 0,
                          advantages=adv[lo + i * size:lo + (i + 1) * size].tolist(),
                          old_logprobs=old[lo + i * size:lo + (i + 1) * size]) for i in range(num_microbatches)]


def step(cfg, full, full0, triples, old, loss_cfg, *, tp=1, pp=1, cp=1, num_microbatches=2, grpo_contexts=True,
         teacher="theta0"):
    # all-reduced (not reduce-scattered) gradients: every DP rank holds all of them, to be compared
    runtime = init_parallel(ParallelConfig(tp=tp, pp=pp, cp=cp, use_distributed_optimizer=False), seed=0)
    chunks = build_model(cfg, runtime)
    load_unsharded(chunks, full, runtime.tp_rank, runtime.tp, tied=cfg.tie_word_embeddings)
    ddp = wrap_ddp(chunks, runtime)
    if teacher == "theta0":
        frozen = build_model(cfg, runtime)
        load_unsharded(frozen, full0, runtime.tp_rank, runtime.tp, tied=cfg.tie_word_embeddings)
        teacher = FrozenTeacher(frozen)
    elif teacher == "live":
        teacher = Teacher(ddp)
    ctx = StepContext(runtime=runtime, loss=loss_cfg, temperature=1.1, vocab_size=cfg.vocab_size, teacher=teacher,
                      token_budget=BUDGET)
    zero_grads(ddp, None)
    metrics = run_schedule(ctx, ddp, batches(triples, old, runtime, num_microbatches, grpo_contexts=grpo_contexts,
                                             dr_grpo=loss_cfg.advantage == "dr_grpo"), pad_id=0)
    return runtime, ddp, metrics


def unsharded(model):
    cfg = ModelConfig.from_hf_dict(model.config.to_dict())
    return cfg, dict(hf_to_unsharded(((k, v.detach().float()) for k, v in model.state_dict().items()), cfg))


def check_against_reference(cfg, full, full0, triples, old, refs, layout, kwargs):
    for name, loss_cfg in (("grpo kl", LossConfig(mode="grpo", kl_coef=KL_COEF, ppo_clip=CLIP_EPS)),
                           ("dr_grpo", LossConfig(mode="grpo", advantage="dr_grpo", ppo_clip=CLIP_EPS)),
                           *((f"grpo {e}", LossConfig(mode="grpo", kl_coef=KL_COEF, ppo_clip=CLIP_EPS, kl_estimator=e))
                             for e in ("forward_kl", "reverse_kl"))):
        ref_loss, ref_grads, tp1_loss = refs[name]
        teacher = "theta0" if loss_cfg.kl_coef else None
        runtime, ddp, metrics = step(cfg, full, full0, triples, old, loss_cfg, teacher=teacher, **kwargs)
        loss = metrics["loss"]
        assert math.isfinite(loss)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-7, (name, layout, loss, ref_loss)
        if tp1_loss is not None:
            assert abs(loss - tp1_loss) <= 1e-5 * abs(tp1_loss) + 1e-7, (name, layout, loss, tp1_loss)
        scale = max(g.abs().max().item() for g in ref_grads.values())
        worst = chunk_grads_vs_reference(ddp, ref_grads, runtime.tp_rank, runtime.tp, tied=cfg.tie_word_embeddings,
                                         atol=1e-5 * scale, rtol=1e-4)
        assert 0 < metrics["ratio_clip_fraction"] < 1, metrics
        if loss_cfg.kl_coef:
            assert metrics["kl"] > 0, metrics
        rank_print(f"[{name}] {layout:<4} loss={loss:.8f} reference={ref_loss:.8f} max|dgrad|={worst:.2e} "
                   f"(largest {scale:.2e}) ratio_clip_fraction={metrics['ratio_clip_fraction']:.3f}"
                   + (f" kl={metrics['kl']:.2e}" if "kl" in metrics else ""))
        runtime.destroy()
        refs[name] = (ref_loss, ref_grads, loss if tp1_loss is None else tp1_loss)


def combined_checks(cfg, full, full0, triples, old):
    """opsd+grpo: grpo_weight 0 == opsd; divergence_weight 0 == grpo (no KL), on OPSD contexts."""
    def grads(ddp):
        return [main_grad(p).clone() for c in ddp for p in c.parameters()]

    cases = [("grpo_weight=0 vs opsd", LossConfig(mode="opsd+grpo", grpo_weight=0.0, clip=2e-3), "live",
              LossConfig(mode="opsd", clip=2e-3), "live"),
             ("divergence_weight=0 vs grpo", LossConfig(mode="opsd+grpo", divergence_weight=0.0), "live",
              LossConfig(mode="grpo"), None)]
    for name, combined, teacher_c, alone, teacher_a in cases:
        rt, ddp, m_c = step(cfg, full, full0, triples, old, combined, grpo_contexts=False, teacher=teacher_c)
        g_c = grads(ddp)
        rt.destroy()
        rt, ddp, m_a = step(cfg, full, full0, triples, old, alone, grpo_contexts=False, teacher=teacher_a)
        g_a = grads(ddp)
        rt.destroy()
        assert abs(m_c["loss"] - m_a["loss"]) <= 1e-6 * abs(m_a["loss"]) + 1e-8, (name, m_c, m_a)
        worst = max((a - b).abs().max().item() for a, b in zip(g_c, g_a))
        scale = max(b.abs().max().item() for b in g_a)
        assert worst <= 1e-6 * scale, (name, worst, scale)
        rank_print(f"[opsd+grpo {name}] loss {m_c['loss']:.8f} == {m_a['loss']:.8f}, max|dgrad|={worst:.1e}")


def main() -> None:
    student, theta0 = models()
    cfg, full = unsharded(student)
    _, full0 = unsharded(theta0)
    triples = samples(cfg.vocab_size)
    old = old_logprobs(student, triples)
    refs = {}
    for name, dr, kl in (("grpo kl", False, "k3"), ("dr_grpo", True, None), ("grpo forward_kl", False, "forward_kl"),
                         ("grpo reverse_kl", False, "reverse_kl")):
        loss, grads_hf = reference(student, theta0, triples, old, dr_grpo=dr, kl=kl)
        refs[name] = (loss, dict(hf_to_unsharded(grads_hf.items(), cfg)), None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        check_against_reference(cfg, full, full0, triples, old, refs, "TP1", {})
        combined_checks(cfg, full, full0, triples, old)
        rank_print("grpo_step single: all checks passed")
        return
    use_cp_test_attention()  # CP2: the test-only all-gather attention (tests/cp_attention.py)
    for layout, kwargs in (("TP2", dict(tp=2)), ("PP2", dict(pp=2)), ("DP2", dict(num_microbatches=3)),
                           ("CP2", dict(cp=2))):
        check_against_reference(cfg, full, full0, triples, old, refs, layout, kwargs)
    dist.barrier()
    rank_print("grpo_step layouts: all checks passed")


if __name__ == "__main__":
    main()
