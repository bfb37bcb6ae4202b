"""The OPSD job: ``torchrun ... -m megatron_opsd.train --config FILE [--dotted.overrides ...]``.

With no ``--config`` it runs the embedded default (a tiny Llama-shaped model on the shipped arithmetic
data, TP=2 on CPU): an SFT warm-up makes a base model (cached), then OPSD, with held-out accuracy
before and after. ``--load DIR`` resumes from the latest checkpoint under DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opsd import checkpoint as ckpt
from megatron_opsd.config import JobConfig, help_text, load_config
from megatron_opsd.config_io import ConfigError, to_dict
from megatron_opsd.conversion.files import DEFAULT_TOKENIZER_PATH, find_tokenizer_dir, model_tokenizer
from megatron_opsd.data import ContextBuilder, ProblemSampler, answers_match, collate_pairs, extract_boxed
from megatron_opsd.data import load_splits, load_tokenizer
from megatron_opsd.data.contexts import OPSDPair, build_pair
from megatron_opsd.engine import build_optimizer, build_scheduler, wrap_ddp
from megatron_opsd.metrics_log import MetricsLogger, peak_memory_mib
from megatron_opsd.models.provider import build_model
from megatron_opsd.opsd import EMATeacher, FrozenTeacher, LossConfig, StepContext, Teacher
from megatron_opsd.opsd import NonFiniteError, check_teacher_isolated, train_step
from megatron_opsd.parallel import init_parallel, shutdown
from megatron_opsd.rollout import MegatronRolloutEngine
from megatron_opsd.rollout.types import SampleKey, SamplingParams

EMBEDDED_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "embedded_tiny_llama_tp2.yaml"


class Trainer:
    """Builds the run from a ``JobConfig`` and runs the loop (``fit``)."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        # Everything a user can get wrong is checked before anything is built or written.
        if cfg.train.load:
            model_dir = _resolve_load(cfg.train.load)
            cfg.model = ckpt.read_model_json(model_dir)
            # The tokenizer stored with the model unless the user set one; a set one must match it.
            user_path = None if cfg.data.tokenizer_path == DEFAULT_TOKENIZER_PATH else cfg.data.tokenizer_path
            self.tokenizer = model_tokenizer(user_path, find_tokenizer_dir(model_dir) or model_dir,
                                             cfg.model.vocab_size) or load_tokenizer(cfg.data.tokenizer_path)
            cfg.data.tokenizer_path = self.tokenizer.path
        else:
            self.tokenizer = load_tokenizer(cfg.data.tokenizer_path)
        self.tokenizer.check_model_vocab(cfg.model.vocab_size)
        self.train_problems, self.eval_problems = load_splits(cfg.data)
        self.contexts = ContextBuilder(cfg.data, self.tokenizer, self.train_problems)
        self.eval_contexts = ContextBuilder(cfg.data, self.tokenizer, self.eval_problems or self.train_problems)

        self.runtime = rt = init_parallel(cfg.parallel, cfg.seed)
        if cfg.train.prompts_per_step % rt.dp:
            raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} is not divisible by the "
                              f"data-parallel size {rt.dp}: make it a multiple of {rt.dp}")
        self.is_logger = rt.rank == 0
        self.chunks = build_model(cfg.model, rt, cfg.model_build)
        self.step = 0
        self.sampler = ProblemSampler(len(self.train_problems), cfg.train.prompts_per_step, cfg.seed,
                                      rank=rt.dp_rank, world_size=rt.dp)
        latest = ckpt.latest_checkpoint(cfg.checkpoint.dir) if cfg.checkpoint.resume else None
        if latest is None:
            self._initial_weights()
        self.ddp = wrap_ddp(self.chunks, rt)
        self.optimizer = build_optimizer(self.ddp, rt, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.teacher = self._make_teacher()
        check_teacher_isolated(self.teacher, self.ddp)
        self.rollout = MegatronRolloutEngine(self.ddp, rt, vocab_size=cfg.model.vocab_size,
                                             pad_id=self.tokenizer.pad_id,
                                             max_batch_size=cfg.rollout.max_batch_size,
                                             kv_cache=cfg.rollout.kv_cache)
        if latest is not None:
            self._resume(latest)
        self.log = MetricsLogger(cfg.logging.dir, enabled=self.is_logger, tensorboard=cfg.logging.tensorboard,
                                 wandb_project=cfg.logging.wandb_project, progress_bar=cfg.logging.progress_bar,
                                 total_steps=cfg.train.steps, start_step=self.step, config=to_dict(cfg))
        if latest is not None:
            self.log.message(f"resumed from {latest} at step {self.step}")
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
        rollout = self.rollout.generate([p.student for p, _ in prompts], self._sampling(),
                                        keys)                                     # rollout
        rollout_s = time.perf_counter() - start
        pairs = [self.contexts.build(p, ids) for (p, _), ids in zip(prompts, rollout.response_ids)]
        batches = self._micro_batches([p for p in pairs if p is not None], prompts)  # contexts
        ctx = StepContext(runtime=self.runtime, loss=cfg.loss, temperature=self._loss_temperature(),
                          vocab_size=cfg.model.vocab_size, teacher=self.teacher, step=self.step,
                          detailed_metrics=cfg.logging.detailed_metrics)
        metrics = train_step(ctx, self.ddp, self.optimizer, batches, pad_id=self.tokenizer.pad_id,
                             clip_grad=cfg.optim.clip_grad, scheduler=self.scheduler)  # teacher+student
        lengths = torch.tensor([sum(map(len, rollout.response_ids)), len(rollout.response_ids)],
                               dtype=torch.float64, device=self.runtime.device)
        dist.all_reduce(lengths, group=self.runtime.dp_group)
        metrics.update(response_length=(lengths[0] / lengths[1].clamp(min=1)).item(), rollout_s=rollout_s,
                       step_s=time.perf_counter() - start, peak_memory_mib=peak_memory_mib(self.runtime.device),
                       dropped_pairs=self.contexts.stats.num_dropped_overlong + self.contexts.stats.num_dropped_long_prompt,
                       truncated_pairs=self.contexts.stats.num_truncated)
        return metrics

    def evaluate(self) -> dict:
        """Held-out accuracy (last \\boxed{} vs the reference answer) and mean response length."""
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
        correct = sum(answers_match(extract_boxed(self.tokenizer.decode(ids)), problems[i].answer)
                      for (i, _), ids in zip(kept, rollout.response_ids))
        totals = torch.tensor([correct, len(kept), sum(map(len, rollout.response_ids))], dtype=torch.float64,
                              device=rt.device)
        dist.all_reduce(totals, group=rt.dp_group)
        metrics = {"accuracy": (totals[0] / totals[1].clamp(min=1)).item(), "problems": int(totals[1]),
                   "response_length": (totals[2] / totals[1].clamp(min=1)).item()}
        self.log.log("eval", self.step, metrics) if hasattr(self, "log") else None
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

    def _sampling(self, *, greedy: bool = False, max_new_tokens: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, greedy=greedy,
                              max_new_tokens=max_new_tokens or r.max_new_tokens,
                              stop_ids=tuple(sorted(self.tokenizer.stop_ids)), seed=self.cfg.seed)

    def _loss_temperature(self) -> float:
        return self.cfg.loss.temperature or self.cfg.rollout.temperature

    def _make_teacher(self) -> Teacher | None:
        loss, rt = self.cfg.loss, self.runtime
        if loss.mode == "sft":
            return None
        if loss.mode == "opd":
            teacher_chunks = build_model(ckpt.read_model_json(_resolve_load(loss.opd_teacher_load)), rt,
                                         self.cfg.model_build)
            ckpt.load_weights(teacher_chunks, loss.opd_teacher_load)
            return FrozenTeacher(teacher_chunks)
        if loss.teacher == "live":
            return Teacher(self.ddp)
        if loss.teacher == "ema":
            return EMATeacher.copy_of(self.ddp, self.cfg.model, rt, self.cfg.model_build, loss.ema_decay)
        return FrozenTeacher.copy_of(self.ddp, self.cfg.model, rt, self.cfg.model_build)

    def _initial_weights(self) -> None:
        cfg = self.cfg
        if cfg.train.load:
            ckpt.load_weights(self.chunks, cfg.train.load)
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
                    "config": to_dict(self.cfg)})
        self.log.message(f"saved {path}")
        return path

    def _resume(self, path: Path) -> None:
        teacher = self.teacher.state_dict_to_save() if self.teacher is not None else None
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


def _resolve_load(path: str) -> Path:
    path = Path(path)
    if (path / ckpt.LATEST).is_file():
        return ckpt.latest_checkpoint(path)
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
    end_of_turn = min(tok.stop_ids - {tok.eos_id}, default=tok.eos_id)
    ctx = StepContext(runtime=rt, loss=LossConfig(mode="sft"), temperature=1.0,
                      vocab_size=cfg.model.vocab_size, teacher=None, detailed_metrics=False)
    start = time.perf_counter()
    for step in range(cfg.train.warmup_sft_steps):
        pairs = []
        for i, index in enumerate(sampler.next_batch()):
            prompts = trainer.contexts.prompt_ids(index)
            if prompts is None:
                continue
            response = tok.encode(trainer.train_problems[index].solution) + [end_of_turn]
            # Every other example uses the teacher's prompt: a tiny model must first learn to read a
            # reference solution in its context, the capability OPSD's teacher relies on.
            prompt = prompts.teacher if cfg.train.warmup_teacher_prompts and (step + i) % 2 else prompts.student
            pair = build_pair(prompt, prompt, response, stop_ids={end_of_turn},
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
def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    config, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__ + "\nOptions (--section.key value):\n" + help_text())
            sys.exit(0)
        if arg == "--config" or arg.startswith("--config="):
            config = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            i += 1 if "=" in arg else 2
            continue
        if arg == "--load" or arg.startswith("--load="):
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            rest += ["--checkpoint.dir", value, "--checkpoint.resume", "true"]
            i += 1 if "=" in arg else 2
            continue
        rest.append(arg)
        i += 1
    return config, rest


def main(argv: list[str] | None = None) -> int:
    config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    trainer = None
    try:
        cfg = load_config(config or str(EMBEDDED_CONFIG), overrides)
        trainer = Trainer(cfg)
        trainer.fit()
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"megatron_opsd.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteError as exc:
        print(f"megatron_opsd.train: stopped: {exc}; no checkpoint was written for it", file=sys.stderr,
              flush=True)
        return 3
    finally:
        if trainer is not None and hasattr(trainer, "log"):
            trainer.close()
        if dist.is_initialized():
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
