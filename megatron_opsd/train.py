"""The OPSD job: ``torchrun ... -m megatron_opsd.train --config FILE [--dotted.overrides ...]``.

With no ``--config`` it runs the embedded default (a tiny Llama-shaped model on the shipped arithmetic
data, TP=2 on CPU): an SFT warm-up makes a base model (cached), then OPSD, with held-out accuracy
before and after. ``--load DIR`` resumes the run whose checkpoints are in DIR (and refuses a DIR that
holds none); ``--validate-only`` runs every start-up check that needs no process group (the layout
against ``WORLD_SIZE`` when it is set) and exits (0: ok, 2: one line naming what is wrong). See ``megatron_opsd/checkpoint_paths.py`` for what each
checkpoint option accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_opsd import checkpoint as ckpt
from megatron_opsd import checkpoint_paths as paths
from megatron_opsd import lifetime
from megatron_opsd.config import JobConfig, help_text, load_config
from megatron_opsd.config_io import ConfigError, to_dict
from megatron_opsd.conversion.files import DEFAULT_TOKENIZER_PATH, find_tokenizer_dir, model_tokenizer
from megatron_opsd.data import ContextBuilder, ProblemSampler, answers_match, collate_pairs, extract_answer
from megatron_opsd.data import load_splits, load_tokenizer
from megatron_opsd.data.contexts import OPSDPair, PromptIds, build_pair
from megatron_opsd.engine import build_optimizer, build_scheduler, wrap_ddp
from megatron_opsd.metrics_log import MetricsLogger, peak_memory_mib
from megatron_opsd.models.lora import attach_lora, load_peft_tensors, read_peft_adapter
from megatron_opsd.models.provider import build_model
from megatron_opsd.opsd import AdapterTeacher, EMATeacher, FrozenTeacher, LossConfig, StepContext, Teacher
from megatron_opsd.opsd import NonFiniteError, check_teacher_isolated, train_step
from megatron_opsd.opsd.grpo import (RewardError, answer_reward, group_advantages, load_reward_function,
                                     policy_micro_batches, score)
from megatron_opsd.parallel import init_parallel, shutdown
from megatron_opsd.rollout import MegatronRolloutEngine
from megatron_opsd.rollout.types import Rollout, SampleKey, SamplingParams

EMBEDDED_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "embedded_tiny_llama_tp2.yaml"


@dataclass
class Plan:
    """What a run will do, decided from the config alone (no process group, nothing written)."""

    tokenizer: object
    train_problems: list
    eval_problems: list
    weights: Path | None
    """train.load resolved to the directory holding model.json."""
    teacher_weights: Path | None
    """loss.opd_teacher_load resolved likewise."""
    resume_from: Path | None
    """The training checkpoint to resume (checkpoint.resume), or None: start fresh."""
    adapters: dict | None = None
    """lora.init_from's adapter tensors (PEFT names, unsharded), read and checked."""
    reward_fn: object = None
    """GRPO modes: loss.reward resolved to a function."""


def plan_run(cfg: JobConfig, world_size: int | None) -> Plan:
    """Check everything a user can get wrong before anything is built or written; ``cfg.model`` becomes
    the loaded model's description when ``train.load`` is set. Raises ``ValueError`` (one line).
    ``world_size=None`` (validating with no WORLD_SIZE set) skips the checks that need it."""
    weights = paths.resolve_weights(cfg.train.load, "train.load") if cfg.train.load else None
    if weights is not None:
        cfg.model = ckpt.read_model_json(weights)
        # The tokenizer stored with the model unless the user set one; a set one must match it.
        user_path = None if cfg.data.tokenizer_path == DEFAULT_TOKENIZER_PATH else cfg.data.tokenizer_path
        tokenizer = model_tokenizer(user_path, find_tokenizer_dir(weights) or weights,
                                    cfg.model.vocab_size) or load_tokenizer(cfg.data.tokenizer_path)
        cfg.data.tokenizer_path = tokenizer.path
    else:
        tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    teacher = None
    if cfg.loss.mode == "opd":
        teacher = paths.resolve_weights(cfg.loss.opd_teacher_load, "loss.opd_teacher_load")
    cfg.check_model_fits()
    tokenizer.check_model_vocab(cfg.model.vocab_size)
    dp = 1
    if world_size is not None:
        cfg.parallel.check_world_size(world_size)
        dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    if cfg.train.prompts_per_step % dp:
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} is not divisible by the "
                          f"data-parallel size {dp}: make it a multiple of {dp}")
    required = cfg.checkpoint.resume == "required"
    resume_from = _resume_point(cfg) if required else None  # --load DIR: first say what DIR is
    inputs = {"train.load": cfg.train.load, "loss.opd_teacher_load": cfg.loss.opd_teacher_load,
              "data.tokenizer_path": cfg.data.tokenizer_path}
    for option, out in (("checkpoint.dir", cfg.checkpoint.dir), ("logging.dir", cfg.logging.dir)):
        paths.check_output_dir(out, option, inputs)
    if not required:
        resume_from = _resume_point(cfg)
    train_problems, eval_problems = load_splits(cfg.data)
    check_eval_answers(eval_problems or train_problems, cfg)
    adapters = read_peft_adapter(cfg.lora.init_from, cfg.model, cfg.lora) if cfg.lora.init_from else None
    reward_fn = load_reward_function(cfg.loss.reward) if cfg.loss.policy_gradient else None
    return Plan(tokenizer, train_problems, eval_problems, weights, teacher, resume_from, adapters, reward_fn)


def _resume_point(cfg: JobConfig) -> Path | None:
    """The step to resume from as ``checkpoint.resume`` says, checked against this run's model."""
    root, mode = cfg.checkpoint.dir, cfg.checkpoint.resume
    if mode == "required":
        step = paths.resolve_resume(root, "--load")
    else:
        step = paths.existing_checkpoint(root)
        if step is not None and mode is False:
            raise ConfigError(f"checkpoint.dir={root} already holds checkpoints (latest {step.name}) and "
                              "checkpoint.resume=false: resume (true) or choose a new checkpoint.dir; "
                              "nothing is overwritten")
    if step is None:
        return None
    saved = ckpt.read_model_json(step)
    differences = [f"{f.name}={getattr(saved, f.name)!r} (this run: {getattr(cfg.model, f.name)!r})"
                   for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(cfg.model, f.name)]
    if differences:
        raise ConfigError(f"{step / ckpt.MODEL_JSON} describes another model: {', '.join(differences[:3])}: "
                          "resume with the model it was trained with, or choose a new checkpoint.dir")
    if saved.is_moe:  # megatron-core 0.16.1's chained (dense + expert) distributed optimizer state does not load
        raise ConfigError(f"{step}: resuming a mixture-of-experts run is not supported yet (its expert optimizer "
                          f"state does not load in megatron-core 0.16.1); start a new run from its weights: "
                          f"--train.load {step} with another checkpoint.dir")
    return step


def check_eval_answers(problems: list, cfg: JobConfig) -> None:
    """Evaluation needs reference answers: refuse a set with none (accuracy would be 0 by
    construction); warn with the count when some lack one (they count as wrong)."""
    source = cfg.data.eval_path or cfg.data.train_path
    count = len(problems) if not cfg.train.eval_problems else min(cfg.train.eval_problems, len(problems))
    missing = [p for p in problems[:count] if p.answer is None]
    if missing and len(missing) == count:
        raise ConfigError(f"{source}: none of the {count} evaluation problems has an answer (no "
                          f"{cfg.data.answer_key!r} field, no \\boxed{{}} in the solution): accuracy would be 0; "
                          "add the column or set data.answer_key")
    if missing and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {len(missing)} of {count} evaluation problems in {source} have no answer "
              f"(e.g. {missing[0].source}); they count as wrong", file=sys.stderr, flush=True)


class Trainer:
    """Builds the run from a ``JobConfig`` and runs the loop (``fit``)."""

    def __init__(self, cfg: JobConfig, plan: Plan):
        self.cfg = cfg
        self.tokenizer = plan.tokenizer
        self.train_problems, self.eval_problems = plan.train_problems, plan.eval_problems
        self.plan = plan
        self.contexts = ContextBuilder(cfg.data, self.tokenizer, self.train_problems)
        self.eval_contexts = ContextBuilder(cfg.data, self.tokenizer, self.eval_problems or self.train_problems)

        self.runtime = rt = init_parallel(cfg.parallel, cfg.seed)
        self.is_logger = rt.rank == 0
        self.chunks = build_model(cfg.model, rt, cfg.model_build)
        self.step = 0
        self.sampler = ProblemSampler(len(self.train_problems), cfg.train.prompts_per_step, cfg.seed,
                                      rank=rt.dp_rank, world_size=rt.dp)
        latest = plan.resume_from
        lora = cfg.lora.enabled
        if latest is None or lora:  # a LoRA run's checkpoints hold its adapters only: the base is loaded
            self._initial_weights()
        if lora:
            attach_lora(self.chunks, cfg.model, cfg.lora, rt, cfg.seed)
            if plan.adapters is not None and latest is None:
                load_peft_tensors(self.chunks, plan.adapters, f"lora.init_from {cfg.lora.init_from}")
        self.ddp = wrap_ddp(self.chunks, rt)
        self.optimizer = build_optimizer(self.ddp, rt, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps * cfg.train.updates_per_rollout)
        self.teacher = self._make_teacher()
        check_teacher_isolated(self.teacher, self.ddp)
        self.rollout = MegatronRolloutEngine(self.ddp, rt, vocab_size=cfg.model.vocab_size,
                                             pad_id=self.tokenizer.pad_id,
                                             max_batch_size=cfg.rollout.max_batch_size,
                                             kv_cache=cfg.rollout.kv_cache,
                                             shared_prefill=cfg.rollout.shared_prefill)
        if latest is not None:
            self._resume(latest)
        self.log = MetricsLogger(cfg.logging.dir, enabled=self.is_logger, tensorboard=cfg.logging.tensorboard,
                                 wandb_project=cfg.logging.wandb_project, progress_bar=cfg.logging.progress_bar,
                                 total_steps=cfg.train.steps, start_step=self.step, config=to_dict(cfg))
        if self.is_logger:
            write_config_yaml(cfg)
        self.log.message(f"resumed from {latest} at step {self.step}" if latest is not None else
                         f"started fresh: no checkpoint under {cfg.checkpoint.dir}")
        self._stop_requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request_stop)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        results = {}
        if self.step == 0:
            results["accuracy_before"] = self.evaluate()["accuracy"]
        while self.step < cfg.train.steps:
            metrics = self.train_one_step()
            self.step += 1
            self.log.log("train", self.step, metrics)
            ckpt.maybe_inject_fault(f"after_step:{self.step}")
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate()
            if self._should_stop():
                self.save()
                self.log.message(f"stopped by signal after step {self.step}; checkpoint saved")
                return results
            if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                self.save()
        results["accuracy_after"] = self.evaluate()["accuracy"]
        if not cfg.checkpoint.save_every or self.step % cfg.checkpoint.save_every:
            self.save()
        self.log.message(json.dumps(results))
        return results

    def train_one_step(self) -> dict:
        cfg, start = self.cfg, time.perf_counter()
        prompts, keys = self._sample_prompts()                                   # prompts
        if cfg.loss.mode == "sft":  # the reference solutions take the samples' place: nothing is generated
            rollout = Rollout(response_ids=[solution_ids(self.tokenizer, self.train_problems[i]) for _, i in prompts])
            prompts = [(PromptIds(p.student, p.student), i) for p, i in prompts]
            generated = 0
        else:
            rollout = self.rollout.generate([p.student for p, _ in prompts], self._sampling(),
                                            keys)                                 # rollout
            generated = sum(map(len, rollout.response_ids))
        rollout_s = time.perf_counter() - start
        if cfg.loss.policy_gradient:
            batches, reward_metrics = self._policy_batches(prompts, rollout)     # rewards + contexts
        else:
            pairs = [self.contexts.build(p, ids) for (p, _), ids in zip(prompts, rollout.response_ids)]
            batches, reward_metrics = self._micro_batches([p for p in pairs if p is not None], prompts), {}  # contexts
        ctx = StepContext(runtime=self.runtime, loss=cfg.loss, temperature=self._loss_temperature(),
                          vocab_size=cfg.model.vocab_size, teacher=self.teacher, step=self.step + 1,
                          detailed_metrics=cfg.logging.detailed_metrics, token_budget=cfg.rollout.max_new_tokens)
        for _ in range(cfg.train.updates_per_rollout):  # the old log-probs stay the rollout's
            metrics = train_step(ctx, self.ddp, self.optimizer, batches, pad_id=self.tokenizer.pad_id,
                                 clip_grad=cfg.optim.clip_grad, scheduler=self.scheduler)  # teacher+student
        lengths = torch.tensor([sum(map(len, rollout.response_ids)), len(rollout.response_ids), generated],
                               dtype=torch.float64, device=self.runtime.device)
        dist.all_reduce(lengths, group=self.runtime.dp_group)
        metrics.update(reward_metrics)
        metrics.update(response_length=(lengths[0] / lengths[1].clamp(min=1)).item(), rollout_s=rollout_s,
                       generated_tokens=int(lengths[2].item()),
                       step_s=time.perf_counter() - start, peak_memory_mib=peak_memory_mib(self.runtime.device),
                       dropped_pairs=self.contexts.stats.num_dropped_overlong + self.contexts.stats.num_dropped_long_prompt,
                       truncated_pairs=self.contexts.stats.num_truncated)
        return metrics

    def evaluate(self) -> dict:
        """Held-out accuracy and mean response length; every response goes to
        ``logging.dir/eval_step_N.jsonl`` (rank 0 writes what all data-parallel ranks generated)."""
        cfg, rt = self.cfg, self.runtime
        problems = self.eval_problems or self.train_problems
        count = len(problems) if not cfg.train.eval_problems else min(cfg.train.eval_problems, len(problems))
        mine = list(range(rt.dp_rank, count, rt.dp))
        prompts = [self.eval_contexts.prompt_ids(i) for i in mine]
        kept = [(i, p) for i, p in zip(mine, prompts) if p is not None]
        sampling = self._sampling(greedy=cfg.train.eval_greedy,
                                  max_new_tokens=cfg.train.eval_max_new_tokens or cfg.rollout.max_new_tokens)
        rollout = self.rollout.generate([p.student for _, p in kept], sampling,
                                        [SampleKey(step=-1, prompt_id=i) for i, _ in kept])
        records = []
        for (i, _), ids in zip(kept, rollout.response_ids):
            text = self.tokenizer.decode(ids)
            answer = extract_answer(text, cfg.train.eval_answer_fallback)
            records.append({"id": i, "source": problems[i].source, "response": text, "answer": answer,
                            "reference": problems[i].answer, "correct": answers_match(answer, problems[i].answer),
                            "response_tokens": len(ids)})
        gathered = [None] * rt.dp
        dist.all_gather_object(gathered, records, group=rt.dp_group)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["id"])
        num = max(len(records), 1)
        metrics = {"accuracy": sum(r["correct"] for r in records) / num, "problems": len(records),
                   "dropped_long_prompt": count - len(records),
                   "response_length": sum(r["response_tokens"] for r in records) / num}
        if self.is_logger:
            write_jsonl(Path(cfg.logging.dir) / f"eval_step_{self.step}.jsonl", records)
            if metrics["dropped_long_prompt"]:
                self.log.message(f"evaluation: {metrics['dropped_long_prompt']} of {count} problems dropped: "
                                 f"their prompt exceeds data.max_prompt_len={cfg.data.max_prompt_len}")
        self.log.log("eval", self.step, metrics)
        return metrics

    # ---- phases' helpers ----------------------------------------------------------------------
    def _sample_prompts(self):
        samples = self.cfg.rollout.samples_per_prompt
        prompts, keys = [], []
        for index in self.sampler.next_batch():
            ids = self.contexts.prompt_ids(index)
            if ids is None:
                continue
            for s in range(samples):
                prompts.append((ids, index))
                keys.append(SampleKey(step=self.step, prompt_id=index, sample_idx=s))
        return prompts, keys

    def _micro_batches(self, pairs: list[OPSDPair], prompts) -> list:
        size = self.cfg.train.micro_batch_size
        pad = self.tokenizer.pad_id
        if not pairs:  # every pair dropped: one fully masked micro-batch keeps the schedule in step
            ids = prompts[0][0] if prompts else None
            stub = build_pair(ids.student, ids.teacher, [pad], stop_ids=set(), max_seq_len=10**9,
                              overlong="drop")
            batch = collate_pairs([stub], pad)
            batch.loss_mask.zero_()
            return [batch]
        budget = self.cfg.train.max_tokens_per_micro_batch
        if budget is not None:  # packed, by token count (loss and grads are normalised by global tokens)
            from megatron_opsd.data.batch import token_budget_groups

            costs = [len(p.student_ids) + (len(p.teacher_ids) if self.teacher is not None else 0) for p in pairs]
            return [collate_pairs([pairs[i] for i in group], pad, pack=True)
                    for group in token_budget_groups(costs, budget)]
        return [collate_pairs(pairs[i:i + size], pad) for i in range(0, len(pairs), size)]

    def _policy_batches(self, prompts, rollout) -> tuple[list, dict]:
        """GRPO: rewards, group advantages, and micro-batches carrying them with the rollout's own
        log-probabilities. grpo's pairs put the student's prompt on both sides (the teacher pass, when
        loss.kl_coef > 0, is theta_0 on the student's context); opsd+grpo's keep the OPSD teacher's.
        Empty responses get their reward (for the group) but no pair."""
        cfg, rt = self.cfg, self.runtime
        problems = [self.train_problems[index] for _, index in prompts]
        texts = [self.tokenizer.decode(ids) for ids in rollout.response_ids]
        rewards = self._rewards(problems, texts)
        advantages, flat_groups = group_advantages(rewards, cfg.rollout.samples_per_prompt,
                                                   scale_by_std=cfg.loss.advantage == "grpo")

        def build(row: int, response: list[int]):
            ids = prompts[row][0]
            return self.contexts.build(ids if cfg.loss.mode == "opsd+grpo" else PromptIds(ids.student, ids.student),
                                       response)

        batches, empty = policy_micro_batches(rollout.response_ids, advantages.tolist(), rollout.model_logprobs,
                                              build, self.tokenizer.stop_ids,
                                              micro_batch_size=cfg.train.micro_batch_size, pad_id=self.tokenizer.pad_id)
        if not batches:
            batches = [dataclasses.replace(b, advantages=torch.zeros_like(b.loss_mask),
                                           old_logprobs=torch.zeros_like(b.loss_mask))
                       for b in self._micro_batches([], prompts)]
        correct = [answer_reward(p, t) for p, t in zip(problems, texts)]
        adv = advantages.tolist()
        sums = torch.tensor([len(rewards), sum(rewards), sum(r * r for r in rewards), sum(correct),
                             sum(adv), sum(a * a for a in adv), flat_groups,
                             len(rewards) // cfg.rollout.samples_per_prompt, empty],
                            dtype=torch.float64, device=rt.device)
        dist.all_reduce(sums, group=rt.dp_group)
        n, r_sum, r_sq, hits, a_sum, a_sq, flat, groups, empty = sums.tolist()
        n = max(n, 1.0)
        return batches, {"reward_mean": r_sum / n, "reward_std": max(r_sq / n - (r_sum / n) ** 2, 0.0) ** 0.5,
                         "accuracy": hits / n, "advantage_mean": a_sum / n,
                         "advantage_std": max(a_sq / n - (a_sum / n) ** 2, 0.0) ** 0.5,
                         "zero_advantage_groups": int(flat), "groups": int(groups), "empty_responses": int(empty)}

    def _rewards(self, problems, texts) -> list[float]:
        """The reward function on this rank's responses; if it fails on any rank, every rank stops
        (RewardError: the failing rank's message names the problem)."""
        error, rewards = None, []
        try:
            rewards = score(self.plan.reward_fn, problems, texts)
        except RewardError as exc:
            error = exc
        flag = torch.tensor([float(error is not None)], device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is not None:
            raise RewardError(f"step {self.step + 1}: {error}")
        if flag.item():
            raise RewardError(f"step {self.step + 1}: the reward function failed on another rank (its message names "
                              "the problem)")
        return rewards

    def _sampling(self, *, greedy: bool = False, max_new_tokens: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, greedy=greedy,
                              max_new_tokens=max_new_tokens or r.max_new_tokens,
                              stop_ids=tuple(sorted(self.tokenizer.stop_ids)), seed=self.cfg.seed)

    def _loss_temperature(self) -> float:
        return self.cfg.loss.temperature or self.cfg.rollout.temperature

    def _make_teacher(self) -> Teacher | None:
        loss, rt = self.cfg.loss, self.runtime
        if loss.mode == "sft" or (loss.mode == "grpo" and not loss.kl_coef):
            return None
        if loss.mode == "opd":
            teacher_chunks = build_model(ckpt.read_model_json(self.plan.teacher_weights), rt,
                                         self.cfg.model_build)
            ckpt.load_weights(teacher_chunks, self.plan.teacher_weights, "loss.opd_teacher_load", runtime=rt)
            return FrozenTeacher(teacher_chunks)
        if self.cfg.lora.enabled:  # the same weights, adapters switched: no copy of the base
            return AdapterTeacher(self.ddp, loss.teacher, loss.ema_decay)
        if loss.teacher == "live":
            return Teacher(self.ddp)
        if loss.teacher == "ema":
            return EMATeacher.copy_of(self.ddp, self.cfg.model, rt, self.cfg.model_build, loss.ema_decay)
        return FrozenTeacher.copy_of(self.ddp, self.cfg.model, rt, self.cfg.model_build)

    def _initial_weights(self) -> None:
        cfg = self.cfg
        if self.plan.weights is not None:
            ckpt.load_weights(self.chunks, self.plan.weights)
        elif cfg.train.warmup_sft_steps:
            base = embedded_base_dir(cfg)
            if not (base / ckpt.MODEL_JSON).is_file():
                sft_warmup(cfg, self, base)
            ckpt.load_model(self.chunks, base)

    # ---- checkpoints and signals -----------------------------------------------------------------
    def save(self) -> Path:
        teacher = self.teacher.state_dict_to_save() if self.teacher is not None else None
        path = ckpt.save_training(
            self.cfg.checkpoint.dir, self.step, chunks=self.ddp, optimizer=self.optimizer,
            teacher_chunks=teacher, runtime=self.runtime, model=self.cfg.model, keep_last=self.cfg.checkpoint.keep_last,
            optimizer_format=self.cfg.checkpoint.optimizer_format,
            common={"scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                    "config": to_dict(self.cfg), **self._lora_record()})
        self.log.message(f"saved {path}")
        return path

    def _base_dir(self) -> Path | None:
        """Where this run's initial weights come from (None: random initialisation)."""
        if self.plan.weights is not None:
            return self.plan.weights
        return embedded_base_dir(self.cfg) if self.cfg.train.warmup_sft_steps else None

    def _lora_record(self) -> dict:
        return {"lora_base": ckpt.lora_base_record(self._base_dir())} if self.cfg.lora.enabled else {}

    def _resume(self, path: Path) -> None:
        teacher = self.teacher.state_dict_to_save() if self.teacher is not None else None
        if self.cfg.lora.enabled:
            from megatron.core import dist_checkpointing

            recorded = dist_checkpointing.load_common_state_dict(str(path))["common"].get("lora_base")
            current = self._lora_record()["lora_base"]
            if recorded != current:
                raise ConfigError(f"{path}: its LoRA adapters were trained on the base {recorded}, this run's is "
                                  f"{current}: resume with the base they belong to")
        common = ckpt.load_training(path, chunks=self.ddp, optimizer=self.optimizer, teacher_chunks=teacher,
                                    runtime=self.runtime)
        if self.teacher is not None:
            self.teacher.after_load()
        self.step = int(common["step"])
        self.scheduler.load_state_dict(common["scheduler"])
        self.sampler.load_state_dict(common["sampler"])

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([float(self._stop_requested)], device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        self.log.close()


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def write_config_yaml(cfg: JobConfig) -> Path:
    """The resolved config (file + overrides + the loaded model's description) as
    ``logging.dir/config.yaml``: rerun with ``--config`` on it to repeat the run."""
    path = Path(cfg.logging.dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


# ---- the embedded default's base model ----------------------------------------------------------
def embedded_base_dir(cfg: JobConfig) -> Path:
    """Cache key: everything that determines the warm-up's result."""
    key = json.dumps([to_dict(cfg.model), cfg.data.train_path, cfg.data.tokenizer_path, cfg.seed,
                      cfg.train.warmup_sft_steps, cfg.train.warmup_lr, cfg.train.prompts_per_step,
                      cfg.train.warmup_teacher_prompts, cfg.data.student_template, cfg.data.teacher_template],
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.checkpoint.dir).parent / f"base-sft-{digest}"


def solution_ids(tokenizer, problem) -> list[int]:
    """The reference solution as a response: its tokens and the end-of-turn id (SFT's target)."""
    return tokenizer.encode(problem.solution) + [min(tokenizer.stop_ids - {tokenizer.eos_id}, default=tokenizer.eos_id)]


def sft_warmup(cfg: JobConfig, trainer: Trainer, out: Path) -> None:
    """Cross-entropy on the reference solutions for ``train.warmup_sft_steps`` steps; saves ``out``."""
    from megatron_opsd.engine import OptimConfig

    rt, tok = trainer.runtime, trainer.tokenizer
    ddp = wrap_ddp(trainer.chunks, rt)
    optim = OptimConfig(lr=cfg.train.warmup_lr, min_lr=cfg.train.warmup_lr / 10, clip_grad=1.0,
                        warmup_steps=max(cfg.train.warmup_sft_steps // 10, 1))
    optimizer = build_optimizer(ddp, rt, optim)
    scheduler = build_scheduler(optimizer, optim, cfg.train.warmup_sft_steps)
    sampler = ProblemSampler(len(trainer.train_problems), cfg.train.prompts_per_step, cfg.seed + 1,
                             rank=rt.dp_rank, world_size=rt.dp)
    ctx = StepContext(runtime=rt, loss=LossConfig(mode="sft"), temperature=1.0,
                      vocab_size=cfg.model.vocab_size, teacher=None, detailed_metrics=False)
    start = time.perf_counter()
    for step in range(cfg.train.warmup_sft_steps):
        pairs = []
        for i, index in enumerate(sampler.next_batch()):
            prompts = trainer.contexts.prompt_ids(index)
            if prompts is None:
                continue
            response = solution_ids(tok, trainer.train_problems[index])
            # Every other example uses the teacher's prompt: a tiny model must first learn to read a
            # reference solution in its context, the capability OPSD's teacher relies on.
            prompt = prompts.teacher if cfg.train.warmup_teacher_prompts and (step + i) % 2 else prompts.student
            pair = build_pair(prompt, prompt, response, stop_ids={response[-1]},
                              max_seq_len=cfg.data.max_seq_len, overlong="truncate_response")
            if pair is not None:
                pairs.append(pair)
        size = cfg.train.micro_batch_size
        batches = [collate_pairs(pairs[i:i + size], tok.pad_id) for i in range(0, len(pairs), size)]
        ctx.step = step
        metrics = train_step(ctx, ddp, optimizer, batches, pad_id=tok.pad_id, clip_grad=1.0, scheduler=scheduler)
        if rt.rank == 0 and (step % 20 == 0 or step == cfg.train.warmup_sft_steps - 1):
            print(f"[sft warm-up {step + 1}/{cfg.train.warmup_sft_steps}] loss={metrics['loss']:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    ckpt.save_model(ddp, cfg.model, out)
    if rt.rank == 0:
        print(f"[sft warm-up] base model cached at {out}", flush=True)


# ---- entry point ----------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """``(config file, dotted overrides, validate_only)``; ``--load DIR`` = resume DIR (required)."""
    config, rest, validate_only, i = None, [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__ + "\nOptions (--section.key value):\n" + help_text())
            sys.exit(0)
        if arg == "--validate-only":
            validate_only, i = True, i + 1
            continue
        if arg in ("--config", "--load") or arg.startswith(("--config=", "--load=")):
            if "=" not in arg and i + 1 >= len(argv):
                raise ConfigError(f"{arg}: missing value")
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            i += 1 if "=" in arg else 2
            if arg.startswith("--config"):
                config = value
            else:
                rest += ["--checkpoint.dir", value, "--checkpoint.resume", "required"]
            continue
        rest.append(arg)
        i += 1
    return config, rest, validate_only


def main(argv: list[str] | None = None) -> int:
    lifetime.die_with_parent(self_too="TORCHELASTIC_RUN_ID" in os.environ)
    trainer = None
    # Before the process group exists every rank checks the same files and would say the same thing:
    # rank 0 speaks for the job.
    first_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        config, overrides, validate_only = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(config or str(EMBEDDED_CONFIG), overrides)
        world_size = os.environ.get("WORLD_SIZE", None if validate_only else "1")
        plan = plan_run(cfg, None if world_size is None else int(world_size))
        if plan.resume_from is not None and paths.step_of(plan.resume_from) >= cfg.train.steps:
            _say(first_rank, f"nothing to do: {plan.resume_from} already reached train.steps={cfg.train.steps}")
            return 0
        if validate_only:
            _say(first_rank, f"config ok: resumes {plan.resume_from}" if plan.resume_from else
                 f"config ok: starts fresh (no checkpoint under {cfg.checkpoint.dir})")
            return 0
        trainer = Trainer(cfg, plan)
        results = trainer.fit()
        if "accuracy_after" in results:  # (not when stopped by a signal)
            problems = len(trainer.eval_problems or trainer.train_problems)
            trainer.log.message(accuracy_summary(cfg, results, trainer.step,
                                                 min(cfg.train.eval_problems or problems, problems)))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _say(first_rank or dist.is_initialized(), f"megatron_opsd.train: error: {one_line(exc)}", sys.stderr)
        return 2
    except (NonFiniteError, RewardError) as exc:
        print(f"megatron_opsd.train: stopped: {exc}; no checkpoint was written for it", file=sys.stderr,
              flush=True)
        return 3
    finally:
        if trainer is not None and hasattr(trainer, "log"):
            trainer.close()
        if dist.is_initialized():
            shutdown()
    return 0


def accuracy_summary(cfg: JobConfig, results: dict, step: int, problems: int) -> str:
    """The run's closing lines: held-out accuracy before and after training (``fit``'s results) and the
    files holding each evaluation's responses. A resumed run has no "before" (an earlier run made it)."""
    logs, method, after = Path(cfg.logging.dir), cfg.loss.mode.upper(), results["accuracy_after"]
    final = logs / f"eval_step_{step}.jsonl"
    if "accuracy_before" in results:
        before = results["accuracy_before"]
        line = (f"held-out accuracy on {problems} problems: {before:.3f} before {method} -> {after:.3f} after "
                f"{step} steps ({after - before:+.3f})")
        files = f"{logs / 'eval_step_0.jsonl'} (before), {final} (after)"
    else:
        line, files = f"held-out accuracy on {problems} problems after {step} steps of {method}: {after:.3f}", str(final)
    rule = "=" * len(line)
    return f"{rule}\n{line}\nresponses: {files}\n{rule}"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _say(enabled: bool, text: str, file=None) -> None:
    if enabled:
        print(text, file=file or sys.stdout, flush=True)


if __name__ == "__mp_main__":  # a multiprocessing child spawned by the trainer (dist_checkpointing)
    lifetime.die_with_parent(self_too=True)
if __name__ == "__main__":
    sys.exit(main())
