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
from megatron_opsd.data import ContextBuilder, ProblemSampler, answers_match, extract_answer
from megatron_opsd.data import load_splits, load_tokenizer
from megatron_opsd.engine import build_optimizer, build_scheduler, wrap_ddp
from megatron_opsd.methods import StepInputs, method_for, sample_prompts
from megatron_opsd.methods.base import pair_micro_batches
from megatron_opsd.methods.grpo import RewardError, load_reward_function
from megatron_opsd.methods.sft import solution_ids, warm_up
from megatron_opsd.metrics_log import MetricsLogger, peak_memory_mib
from megatron_opsd.models.lora import attach_lora, load_peft_tensors, read_peft_adapter
from megatron_opsd.models.provider import build_model
from megatron_opsd.opsd import NonFiniteError, StepContext, check_teacher_isolated, train_step
from megatron_opsd.opsd.diagnostics import leak_markers, leakage_rate, teacher_advantage
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
        dp = cfg.parallel.data_parallel_size(world_size)
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
        self.method = method_for(cfg.loss)
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
        self.teacher = self.method.make_teacher(cfg, rt, self.ddp, plan.teacher_weights)
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
            if cfg.train.eval_teacher_context:
                results["teacher_context_accuracy_before"] = self.evaluate(context="teacher")["accuracy"]
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
        final = self.evaluate()
        results.update(accuracy_after=final["accuracy"], eval_problems=final["problems"])
        if not cfg.checkpoint.save_every or self.step % cfg.checkpoint.save_every:
            self.save()
        self.log.message(json.dumps(results))
        return results

    def train_one_step(self) -> dict:
        cfg, start, method = self.cfg, time.perf_counter(), self.method
        inputs = self._step_inputs()
        prompts, keys = sample_prompts(self.sampler, self.contexts, self.step, cfg.rollout.samples_per_prompt)
        rollout = method.rollout(inputs, prompts, keys)                   # the responses (sft: the solutions)
        rollout_s = time.perf_counter() - start
        batches, method_metrics = method.micro_batches(inputs, prompts, rollout)  # contexts (+ rewards)
        ctx = StepContext(runtime=self.runtime, loss=cfg.loss, temperature=self._loss_temperature(),
                          vocab_size=cfg.model.vocab_size, teacher=self.teacher, step=self.step + 1,
                          detailed_metrics=cfg.logging.detailed_metrics, token_budget=cfg.rollout.max_new_tokens,
                          method=method)
        diagnostics = self._diagnostics(ctx, inputs, prompts, rollout)           # before the update
        for _ in range(cfg.train.updates_per_rollout):  # the old log-probs stay the rollout's
            metrics = train_step(ctx, self.ddp, self.optimizer, batches, pad_id=self.tokenizer.pad_id,
                                 clip_grad=cfg.optim.clip_grad, scheduler=self.scheduler)  # teacher+student, update
        metrics.update(method_metrics)
        metrics.update(diagnostics)
        metrics.update(self._rollout_metrics(rollout, rollout_s, start))
        return metrics

    def evaluate(self, context: str = "student") -> dict:
        """Held-out accuracy and mean response length; every response goes to
        ``logging.dir/eval_step_N.jsonl`` (rank 0 writes what all data-parallel ranks generated).
        ``context="teacher"``: decoded from the teacher's prompt (problem + reference solution) instead,
        logged as kind ``eval_teacher_context`` and written to ``eval_teacher_context_step_N.jsonl``."""
        cfg, rt = self.cfg, self.runtime
        kind = "eval" if context == "student" else "eval_teacher_context"
        problems = self.eval_problems or self.train_problems
        count = len(problems) if not cfg.train.eval_problems else min(cfg.train.eval_problems, len(problems))
        mine = list(range(rt.dp_rank, count, rt.dp))
        prompts = [self.eval_contexts.prompt_ids(i) for i in mine]
        kept = [(i, p) for i, p in zip(mine, prompts) if p is not None]
        sampling = self._sampling(greedy=cfg.train.eval_greedy,
                                  max_new_tokens=cfg.train.eval_max_new_tokens or cfg.rollout.max_new_tokens)
        rollout = self.rollout.generate([getattr(p, context) for _, p in kept], sampling,
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
            write_jsonl(Path(cfg.logging.dir) / f"{kind}_step_{self.step}.jsonl", records)
            if metrics["dropped_long_prompt"]:
                self.log.message(f"evaluation: {metrics['dropped_long_prompt']} of {count} problems dropped: "
                                 f"their prompt exceeds data.max_prompt_len={cfg.data.max_prompt_len}")
        self.log.log(kind, self.step, metrics)
        return metrics

    # ---- phases' helpers ----------------------------------------------------------------------
    def _step_inputs(self) -> StepInputs:
        return StepInputs(self.contexts, self.train_problems, self.tokenizer, self.runtime,
                          self.cfg.train.micro_batch_size, step=self.step + 1,
                          token_budget=self.cfg.train.max_tokens_per_micro_batch,
                          generate=lambda prompts, keys: same_on_cp_ranks(
                              self.rollout.generate(prompts, self._sampling(), keys), self.runtime),
                          samples_per_prompt=self.cfg.rollout.samples_per_prompt, reward_fn=self.plan.reward_fn)

    def _rollout_metrics(self, rollout: Rollout, rollout_s: float, start: float) -> dict:
        lengths = torch.tensor([sum(map(len, rollout.response_ids)), len(rollout.response_ids),
                                sum(map(len, rollout.response_ids)) if self.method.generates else 0],
                               dtype=torch.float64, device=self.runtime.device)
        dist.all_reduce(lengths, group=self.runtime.dp_group)
        stats = self.contexts.stats
        return dict(response_length=(lengths[0] / lengths[1].clamp(min=1)).item(), rollout_s=rollout_s,
                    generated_tokens=int(lengths[2].item()),
                    step_s=time.perf_counter() - start, peak_memory_mib=peak_memory_mib(self.runtime.device),
                    dropped_pairs=stats.num_dropped_overlong + stats.num_dropped_long_prompt,
                    truncated_pairs=stats.num_truncated)

    def _diagnostics(self, ctx: StepContext, inputs: StepInputs, prompts, rollout) -> dict:
        """The leakage rate of this step's responses and, every ``logging.teacher_advantage_every`` steps
        with an OPSD-style teacher, its advantage on the step's reference solutions (opsd.diagnostics)."""
        cfg, rt, tok = self.cfg, self.runtime, self.tokenizer
        if not self.method.generates:  # the "responses" are the reference solutions
            return {}
        texts = [tok.decode(ids) for ids in rollout.response_ids]
        out = {"leakage_rate": leakage_rate(texts, leak_markers(cfg.data.resolved_teacher_template),
                                            group=rt.dp_group, device=rt.device)}
        every = cfg.logging.teacher_advantage_every
        if self.teacher is None or not self.method.teacher_sees_solution or not every or (self.step + 1) % every:
            return out
        unique = list({index: ids for ids, index in prompts}.items())  # one per problem (n samples share it)
        out.update(teacher_advantage(
            ctx, self.ddp, [ids for _, ids in unique],
            [solution_ids(tok, self.train_problems[index]) for index, _ in unique], stop_ids=tok.stop_ids,
            max_seq_len=cfg.data.max_seq_len,
            micro_batches=lambda pairs: pair_micro_batches(inputs, pairs, prompts, with_teacher=True),
            pad_id=tok.pad_id))
        return out

    def _sampling(self, *, greedy: bool = False, max_new_tokens: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, greedy=greedy,
                              max_new_tokens=max_new_tokens or r.max_new_tokens,
                              stop_ids=tuple(sorted(self.tokenizer.stop_ids)), seed=self.cfg.seed)

    def _loss_temperature(self) -> float:
        return self.cfg.loss.temperature or self.cfg.rollout.temperature

    def _initial_weights(self) -> None:
        cfg = self.cfg
        if self.plan.weights is not None:
            ckpt.load_weights(self.chunks, self.plan.weights)
        elif cfg.train.warmup_sft_steps:
            base = embedded_base_dir(cfg)
            if not (base / ckpt.MODEL_JSON).is_file():
                warm_up(cfg, self.runtime, self.chunks, self.tokenizer, self.train_problems, base)
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


def same_on_cp_ranks(rollout: Rollout, runtime) -> Rollout:
    """CP rank 0's rollout on every CP rank. They decode the same prompts separately (decoding is not
    split over CP), so their samples agree only as far as their logits agree bit for bit, which the
    collectives of two TP groups need not promise on GPUs; the contexts the CP ranks then split must be
    one and the same."""
    if runtime.cp == 1:
        return rollout
    box = [rollout]
    dist.broadcast_object_list(box, src=dist.get_global_rank(runtime.cp_group, 0), group=runtime.cp_group)
    return box[0]


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
    key = json.dumps([to_dict(cfg.model), to_dict(cfg.model_build), cfg.data.train_path, cfg.data.tokenizer_path,
                      cfg.seed, cfg.train.warmup_sft_steps, cfg.train.warmup_lr, cfg.train.prompts_per_step,
                      cfg.train.warmup_teacher_fraction, cfg.data.student_template, cfg.data.teacher_template],
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.checkpoint.dir).parent / f"base-sft-{digest}"



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
            trainer.log.message(accuracy_summary(cfg, results, trainer.step))
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


def accuracy_summary(cfg: JobConfig, results: dict, step: int) -> str:
    """The run's closing lines: held-out accuracy before and after training (``fit``'s results) on the
    problems evaluated (those whose prompt fits ``data.max_prompt_len``) and the files holding each
    evaluation's responses. A resumed run has no "before" (an earlier run made it)."""
    logs, method, after = Path(cfg.logging.dir), cfg.loss.mode.upper(), results["accuracy_after"]
    problems = results["eval_problems"]
    final = logs / f"eval_step_{step}.jsonl"
    if "accuracy_before" in results:
        before = results["accuracy_before"]
        line = (f"held-out accuracy on {problems} problems: {before:.3f} before {method} -> {after:.3f} after "
                f"{step} steps ({after - before:+.3f})")
        files = f"{logs / 'eval_step_0.jsonl'} (before), {final} (after)"
        if "teacher_context_accuracy_before" in results:
            line += f"; before, from the teacher's prompt: {results['teacher_context_accuracy_before']:.3f}"
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
