"""The loss section: what is distilled, from which teacher, with which divergence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_opsd.config_io import doc


@dataclass
class LossConfig:
    """OPSD (the method), or a baseline in the same machinery."""

    mode: Literal["opsd", "opd", "sft", "grpo", "opsd+grpo"] = doc(
        "opsd: teacher = the model conditioned on problem + reference solution; opd: teacher = a "
        "separate checkpoint (same architecture and tokenizer) on the student's context; sft: "
        "cross-entropy on the reference solution (no rollout, no teacher); grpo: group-relative policy "
        "gradient on rewards (rollout.samples_per_prompt >= 2); opsd+grpo: divergence_weight * the OPSD "
        "divergence + grpo_weight * the GRPO loss on the same rollouts.", default="opsd")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "sampled_token"] = doc(
        "Per-token divergence D(p_T || p_S) (the paper: forward_kl); sampled_token is the "
        "advantage-weighted log-likelihood of the sampled token (comparison only).", default="forward_kl")
    beta: float = doc("JSD mixture weight (0 = forward KL, 1 = reverse KL).", default=0.5)
    clip: float | None = doc(
        "Per-entry cap tau on each vocabulary term before the sum (paper: 0.05; 0.06 for 8B); null "
        "disables.", default=0.05)
    temperature: float | None = doc(
        "Both logits are divided by it; null = the rollout sampling temperature (the paper).", default=None)
    top_k: int | None = doc("Restrict both distributions to the teacher's top-k ids; null = full vocab.",
                            default=None)
    top_k_tail: bool = doc("With top_k: add a tail bucket holding the remaining mass.", default=True)
    teacher: Literal["live", "initial", "ema"] = doc(
        "Teacher weights: live (current weights, no extra memory), initial (frozen copy of the "
        "starting weights; the paper), ema (moving average updated after each optimizer step).",
        default="initial")
    ema_decay: float = doc("EMA teacher decay per optimizer step.", default=0.999)
    opd_teacher_load: str | None = doc("mode=opd: the teacher checkpoint directory.", default=None)
    chunk_size: int | None = doc("Tokens per chunk in the divergence kernels; null = automatic.",
                                 default=None)
    fused_projection: bool = doc(
        "Project the last hidden states onto the vocabulary chunk by chunk inside the loss, so that "
        "response logits [R, V/TP] never exist whole (student or teacher); false materialises them "
        "(the reference path; more memory, same result).", default=True)
    projection_chunk: int | None = doc(
        "fused_projection: tokens per projected chunk; null = automatic (2^24 logits per chunk on "
        "CPU, 2^26 on GPU).", default=None)

    reward: str = doc(
        "grpo: the reward function, 'answer' (1 when the last \\boxed{} matches the problem's answer; "
        "math-verify when installed) or 'package.module:function' called as f(problem, response_text) "
        "-> float (problem: data.dataset.Problem).", default="answer")
    advantage: Literal["grpo", "dr_grpo"] = doc(
        "grpo: (r - group mean) / group std, token-mean loss; dr_grpo (Dr.GRPO): r - group mean, token "
        "sum divided by responses * rollout.max_new_tokens.", default="grpo")
    ppo_clip: float = doc("grpo: the ratio is clipped to [1 - ppo_clip, 1 + ppo_clip].", default=0.2)
    kl_coef: float = doc("grpo: weight of the KL to theta_0 (loss.teacher=initial; with LoRA the adapters-off "
                         "model); 0 = no reference pass.", default=0.0)
    kl_estimator: Literal["k3", "forward_kl", "reverse_kl"] = doc(
        "grpo, kl_coef > 0: k3 (exp(ref - pi) - (ref - pi) - 1 at the sampled token), or the exact KL over "
        "the full vocabulary at temperature 1 (vocab-parallel kernels): forward_kl KL(theta_0 || pi), "
        "reverse_kl KL(pi || theta_0).", default="k3")
    grpo_weight: float = doc("opsd+grpo: lambda, the GRPO term's weight.", default=1.0)
    divergence_weight: float = doc("opsd+grpo: the OPSD divergence's weight.", default=1.0)

    @property
    def policy_gradient(self) -> bool:
        """Whether the loss has a GRPO term (rewards, advantages, old log-probs)."""
        return self.mode in ("grpo", "opsd+grpo")

    def __post_init__(self) -> None:
        if not 0.0 < self.ppo_clip < 1.0:
            raise ValueError(f"loss.ppo_clip={self.ppo_clip} must lie in (0, 1)")
        if self.kl_coef < 0 or self.grpo_weight < 0 or self.divergence_weight < 0:
            raise ValueError("loss.kl_coef, loss.grpo_weight and loss.divergence_weight must be >= 0")
        if self.mode == "opsd+grpo" and self.kl_coef:
            raise ValueError("loss.kl_coef > 0 with loss.mode=opsd+grpo is not supported: the teacher pass is "
                             "the OPSD teacher, not theta_0; set loss.kl_coef: 0")
        if self.kl_estimator not in ("k3", "forward_kl", "reverse_kl"):
            raise ValueError(f"loss.kl_estimator={self.kl_estimator!r}: use k3, forward_kl or reverse_kl")
        if self.kl_estimator != "k3" and not (self.mode == "grpo" and self.kl_coef):
            raise ValueError(f"loss.kl_estimator={self.kl_estimator} is the KL to theta_0 of loss.mode=grpo with "
                             "loss.kl_coef > 0: set both, or leave kl_estimator: k3")
        if self.mode == "grpo" and self.kl_coef and self.teacher != "initial":
            raise ValueError(f"loss.kl_coef > 0 is a KL to theta_0: set loss.teacher=initial (not {self.teacher})")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"loss.beta={self.beta} must lie in [0, 1]")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"loss.clip={self.clip} must be positive (or null to disable clipping)")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"loss.temperature={self.temperature} must be positive")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"loss.top_k={self.top_k} must be >= 1 (or null for the full vocabulary)")
        if self.top_k is not None and self.divergence == "sampled_token":
            raise ValueError("loss.top_k has no meaning with divergence=sampled_token: set top_k: null")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"loss.ema_decay={self.ema_decay} must lie in (0, 1)")
        if self.projection_chunk is not None and self.projection_chunk < 1:
            raise ValueError(f"loss.projection_chunk={self.projection_chunk} must be >= 1 (or null)")
        if self.mode == "opd" and not self.opd_teacher_load:
            raise ValueError("loss.mode=opd needs loss.opd_teacher_load: the teacher checkpoint directory")
