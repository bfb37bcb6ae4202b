"""The run configuration: one typed section per concern, loaded from YAML with dotted overrides.

    cfg = load_config("examples/configs/tiny_llama_tp2.yaml", ["--parallel.tp", "2"])

Sections validate themselves; ``JobConfig.__post_init__`` checks what spans sections (the model shape
against the parallel layout). The world size is checked when the runtime starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron_opsd.config_io import describe, doc, load
from megatron_opsd.data.config import DataConfig
from megatron_opsd.engine import OptimConfig
from megatron_opsd.models.description import ModelConfig
from megatron_opsd.models.lora import LoRAConfig, check_lora_model
from megatron_opsd.models.provider import ModelBuildConfig, check_context_parallel
from megatron_opsd.opsd.config import LossConfig
from megatron_opsd.parallel import ParallelConfig


@dataclass
class RolloutConfig:
    """On-policy sampling from the student (the paper: T=1.1, top-p 0.95, top-k 20, 1024 tokens)."""

    temperature: float = doc("Sampling temperature.", default=1.1)
    top_p: float = doc("Nucleus mass; 1 disables.", default=0.95)
    top_k: int = doc("Top-k; 0 disables.", default=20)
    max_new_tokens: int = doc("Longest sampled response (tokens).", default=1024)
    samples_per_prompt: int = doc("Responses per problem per step (the paper: 1).", default=1)
    max_batch_size: int | None = doc("Prompts decoded together; null = all of this rank's.", default=None)
    kv_cache: bool = doc("KV-cached decoding (false: recompute, for debugging).", default=True)
    shared_prefill: bool = doc("With kv_cache: the samples of one prompt share one prefill (its KV cache "
                               "is replicated); the samples are the same either way.", default=True)

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1:
            raise ValueError(f"rollout.samples_per_prompt={self.samples_per_prompt} must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"rollout.temperature={self.temperature} must be a positive finite number")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p={self.top_p} must lie in (0, 1]; 1 disables nucleus filtering")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k={self.top_k} must be >= 0; 0 disables top-k filtering")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size={self.max_batch_size} must be >= 1 or null")


@dataclass
class TrainConfig:
    """The loop: how many steps, how big, from which weights."""

    steps: int = doc("Optimizer steps.", default=100)
    prompts_per_step: int = doc("Problems per step over all data-parallel ranks (the paper: 32).",
                                default=32)
    micro_batch_size: int = doc("Pairs per micro-batch (per data-parallel rank).", default=1)
    max_tokens_per_micro_batch: int | None = doc(
        "Token-budget batching: micro-batches of packed pairs formed by token count (context tokens, "
        "student + teacher; length-sorted first-fit), so their number varies per step; a longer pair "
        "gets one of its own. null = micro_batch_size pairs per padded micro-batch.", default=None)
    load: str | None = doc(
        "Initial weights: a converted or training checkpoint directory (model weights only); null = "
        "random init (tests) or the embedded base model when warmup_sft_steps > 0.", default=None)
    warmup_sft_steps: int = doc(
        "Embedded default: first make a base model by this many SFT steps on the reference solutions "
        "(cached under checkpoint.dir/../base-<hash>); 0 = off.", default=0)
    warmup_lr: float = doc("Learning rate of the SFT warm-up.", default=3e-3)
    warmup_teacher_fraction: float = doc(
        "Fraction of the warm-up examples (evenly spread) that use the teacher's prompt (problem + "
        "reference solution) instead of the student's, so a tiny base model learns to read it; real "
        "base models need no such step. 0.5: every other example; 1: the student's prompt is never "
        "trained on.", default=0.5)
    updates_per_rollout: int = doc(
        "grpo: optimizer updates on each rollout (the clipped ratio against the rollout's own log-probs "
        "acts from the second); train.steps counts rollouts.", default=1)
    eval_every: int = doc("Evaluate every N steps (0: only before and after training).", default=0)
    eval_problems: int = doc("Held-out problems per evaluation (0: all).", default=200)
    eval_greedy: bool = doc("Greedy decoding for evaluation (else the rollout sampling settings).",
                            default=True)
    eval_max_new_tokens: int | None = doc("Evaluation response budget; null = rollout.max_new_tokens.",
                                          default=None)
    eval_teacher_context: bool = doc(
        "The evaluation before training also decodes from the teacher's prompt (problem + reference "
        "solution): what OPSD's teacher can draw from the solution (kind eval_teacher_context in "
        "metrics.jsonl, responses in logging.dir/eval_teacher_context_step_0.jsonl).", default=False)
    eval_answer_fallback: Literal["none", "last_number"] = doc(
        "A response's answer is its last \\boxed{}; last_number: when it has none, its last number "
        "instead (for models that answer right but never box). Each evaluation's responses, extracted "
        "answers and verdicts are in logging.dir/eval_step_N.jsonl.", default="none")

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "micro_batch_size", "updates_per_rollout"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"train.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch} must be >= 1 "
                             "(or null)")
        if self.warmup_sft_steps < 0 or self.eval_every < 0 or self.eval_problems < 0:
            raise ValueError("train.warmup_sft_steps, train.eval_every and train.eval_problems must be >= 0")
        if not 0.0 <= self.warmup_teacher_fraction <= 1.0:
            raise ValueError(f"train.warmup_teacher_fraction={self.warmup_teacher_fraction} must lie in [0, 1]")


@dataclass
class CheckpointConfig:
    """Training checkpoints (megatron-core dist_checkpointing; atomic; resumable at another layout)."""

    dir: str = doc("Where step_XXXXXXX checkpoints and the `latest` pointer go.", default="runs/opsd/checkpoints")
    save_every: int = doc("Save every N steps (0: only at the end and on SIGTERM).", default=0)
    keep_last: int = doc("Keep the newest N checkpoints (0: keep all).", default=2)
    resume: bool | Literal["required"] = doc(
        "true: resume from the latest checkpoint in `dir` when there is one, else start fresh (the log "
        "says which); required: refuse to start without one (what `--load DIR` sets); false: start "
        "fresh, refused when `dir` already holds checkpoints (nothing is overwritten).", default=True)
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = doc(
        "Distributed-optimizer state: fully_reshardable resumes at any TP/PP/DP (gathers each DP group's "
        "state at save); dp_reshardable saves fully in parallel but resumes only at another DP size.",
        default="fully_reshardable")

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.save_every and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    """Metrics outputs."""

    dir: str = doc("metrics.jsonl and TensorBoard events go here.", default="runs/opsd/logs")
    tensorboard: bool = doc("Write TensorBoard events (needs the tensorboard package).", default=True)
    wandb_project: str | None = doc("Log to Weights & Biases when set and wandb is installed.", default=None)
    progress_bar: bool = doc("A tqdm progress bar on rank 0.", default=True)
    detailed_metrics: bool = doc("Entropies, raw divergence and clip fraction (3 extra no-grad vocab "
                                 "passes per micro-batch).", default=True)
    teacher_advantage_every: int = doc(
        "Every N steps log the teacher's advantage: mean log-probability of the step's reference solutions "
        "under the teacher context minus the student context (one extra forward-only pass; opsd and "
        "opsd+grpo, whose teacher sees the solution). 0 = off. The leakage rate is logged every step.", default=1)

    def __post_init__(self) -> None:
        if self.teacher_advantage_every < 0:
            raise ValueError("logging.teacher_advantage_every must be >= 0")


@dataclass
class JobConfig:
    """Everything a run needs."""

    model: ModelConfig = doc("The model (HF config.json field names).", default_factory=ModelConfig)
    model_build: ModelBuildConfig = doc("dtype, recompute, layer spec.", default_factory=ModelBuildConfig)
    parallel: ParallelConfig = doc("TP/PP/VPP layout; DP is derived.", default_factory=ParallelConfig)
    optim: OptimConfig = doc("Optimizer and LR schedule.", default_factory=OptimConfig)
    data: DataConfig = doc("Problems, tokenizer, templates, length budget.", default_factory=DataConfig)
    rollout: RolloutConfig = doc("On-policy sampling.", default_factory=RolloutConfig)
    loss: LossConfig = doc("Divergence, teacher, baselines.", default_factory=LossConfig)
    lora: LoRAConfig = doc("LoRA adapters (rank 0: full fine-tuning).", default_factory=LoRAConfig)
    train: TrainConfig = doc("Loop sizes, initial weights, evaluation.", default_factory=TrainConfig)
    checkpoint: CheckpointConfig = doc("Checkpoints.", default_factory=CheckpointConfig)
    logging: LoggingConfig = doc("Metrics outputs.", default_factory=LoggingConfig)
    seed: int = doc("Global seed (weights init, sampling, data order).", default=1234)

    def __post_init__(self) -> None:
        if not self.train.load:  # else the model is train.load's model.json, checked once read
            self.check_model_fits()
        if self.loss.mode == "opd" and self.loss.teacher != "initial":
            raise ValueError("loss.mode=opd uses the teacher checkpoint as is: leave loss.teacher=initial")
        if self.loss.mode != "opd" and self.loss.opd_teacher_load:
            raise ValueError(f"loss.opd_teacher_load={self.loss.opd_teacher_load} is set but loss.mode="
                             f"{self.loss.mode}: it is read only with loss.mode=opd (with LoRA the theta_0 "
                             "teacher is the base model with the adapters off)")
        if self.loss.policy_gradient and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"loss.mode={self.loss.mode} needs rollout.samples_per_prompt >= 2 (got "
                             f"{self.rollout.samples_per_prompt}): a group of one response has no advantage")
        if self.train.updates_per_rollout > 1 and not self.loss.policy_gradient:
            raise ValueError(f"train.updates_per_rollout={self.train.updates_per_rollout} needs loss.mode grpo "
                             "or opsd+grpo (the clipped ratio is what makes repeated updates safe)")
        if "grpo" in self.loss.mode and self.train.max_tokens_per_micro_batch:
            raise ValueError(f"train.max_tokens_per_micro_batch={self.train.max_tokens_per_micro_batch}: "
                             f"token-budget batching does not apply to loss.mode={self.loss.mode} yet (its "
                             "micro-batches hold train.micro_batch_size samples); leave it unset")
        if self.lora.enabled:
            if self.model_build.transformer_engine == "on":
                raise ValueError("lora.rank > 0 needs the local layer spec (TE's fused layernorm-linear hides the "
                                 "adapters' input): set model_build.transformer_engine: off or auto")
            self.model_build.transformer_engine = "off"  # auto: the local spec
        if self.parallel.cp > 1:
            self.check_context_parallel()

    def check_context_parallel(self) -> None:
        """What context parallelism supports (tested on CPU with a test-only attention, see README)."""
        cp = self.parallel.cp
        if self.lora.enabled:
            raise ValueError(f"parallel.cp={cp} with lora.rank > 0: LoRA needs the local layer spec and context "
                             "parallelism needs Transformer Engine attention; set parallel.cp: 1")
        if self.train.max_tokens_per_micro_batch:
            raise ValueError(f"train.max_tokens_per_micro_batch={self.train.max_tokens_per_micro_batch} with "
                             f"parallel.cp={cp}: packed micro-batches are not supported under context "
                             "parallelism yet; leave it unset or set parallel.cp: 1")
        check_context_parallel(cp, self.model_build)

    def check_model_fits(self) -> None:
        """The model against the layout and the length budget (again once train.load gave the model)."""
        m = self.model
        self.parallel.check_model(m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads,
                                  m.intermediate_size)
        self.model.check_sequence_length(self.data.max_seq_len)
        if self.lora.enabled:
            check_lora_model(self.model, self.lora)
        if m.is_moe and self.parallel.cp > 1:
            raise ValueError(f"parallel.cp={self.parallel.cp} with a mixture of experts ({m.model_type}, "
                             f"num_experts={m.num_experts}) is not supported (untested): set parallel.cp: 1")
        if m.is_moe:
            self.parallel.check_experts(m.num_experts, m.moe_intermediate_size)
            if self.parallel.tp > 1 and not self.parallel.sequence_parallel:
                raise ValueError(f"parallel.tp={self.parallel.tp} with a mixture of experts needs "
                                 "parallel.sequence_parallel=true (megatron-core refuses MoE training under "
                                 "TP without it); or split the experts with parallel.ep instead")
        if self.data.max_seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.max_seq_len={self.data.max_seq_len} exceeds the model's "
                             f"max_position_embeddings={self.model.max_position_embeddings}: lower "
                             "data.max_seq_len (and data.max_prompt_len, rollout.max_new_tokens)")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> JobConfig:
    return load(JobConfig, path, overrides)


def help_text() -> str:
    return "\n".join(describe(JobConfig))
