"""Our full OPSD step (rollout + train step) side by side with TRL's ``SDFTTrainer``, same model and sizes.

    python benchmarks/vs_trl.py --trl-python /path/to/trl-venv/bin/python           # ~25 min on 2 cores
    python benchmarks/vs_trl.py --trl-python /path/to/trl-venv/bin/python --quick   # tiny smoke run
    python benchmarks/vs_trl.py --ours-only                                         # our side alone

TRL runs in its own environment (``benchmarks/requirements-vs-trl.txt``: TRL 1.16 on the CPU torch);
this script never imports it outside that environment's child process.

The model: a random Llama-shaped HF model (V=151,936, hidden 256, 4 layers, 4 heads / 2 KV, intermediate
704, untied) saved once with a word-level tokenizer whose words are the token ids (``w123`` is id 123, so a
prompt of N words is N tokens on both sides); our side loads it through our converter
(``convert_hf_to_megatron``, one checkpoint per dtype). Every case samples ``B`` prompts of 128 tokens;
the teacher prompt is the prompt plus 256 tokens of privileged context; responses are exactly ``R``
tokens on both sides (no stop ids for ours, ``min_new_tokens = max_new_tokens`` for TRL); sampling T=1.1,
top-p 0.95, top-k 20; forward KL over the full vocabulary at temperature 1.1, live teacher (the current
weights on the teacher context), AdamW lr 1e-5, gradient clip 1.0.

  ours  MegatronRolloutEngine.generate + train_step (one micro-batch of B pairs; loss.clip off, fused
        projection); fp32, or ``model_build.dtype: bf16`` (bf16 weights, fp32 main weights and Adam);
        ``model_build.recompute: full`` (``--recompute``), as TRL's default gradient checkpointing.
  TRL   SDFTTrainer(distillation_mode="full_logits", distillation_alpha=0, teacher_model_kind="live",
        num_generations=1), transformers generate; otherwise TRL's defaults (gradient checkpointing on);
        fp32, or bf16=True (CPU autocast over fp32 weights), TRL's own default precision.

Each side and precision runs in a fresh process (its environment's python, OMP_NUM_THREADS=--threads),
one warm-up step then ``--repeats`` timed steps (``--long-repeats`` at the B=4 cases); times are medians:
step = rollout + train (TRL: its trainer's step, from step begin to step end), rollout = generation alone. Peak = the child's max RSS. Our peak is split into the interpreter (RSS after
importing torch, megatron-core and our package), weights, fp32 gradient buffers, optimizer state (fp32 main weights where they are a copy, Adam's
two moments) and the rest (activations, KV cache, allocator slack).

TRL at long responses would need more memory than the machine has (its [B, R, V] logits, kept in several
copies): its peak is fitted as a + b * (B * R) on the cases it ran (the main case and ``--fit-responses``
at ``--long-batch``) and a case whose estimate exceeds the budget (``--trl-budget-gib``, default 90% of
MemAvailable when the case comes up) is reported "does not fit (~X GiB)" instead of being run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
RESULT = "RESULT "
SAMPLING = dict(temperature=1.1, top_p=0.95, top_k=20)
LR, CLIP = 1e-5, 1.0
QUICK = dict(vocab=2000, hidden=64, layers=2, ffn=176, prompt=16, teacher_extra=16, batch=4, response=16,
             long_batch=2, long_responses="48,64", fit_responses="8,16", repeats=1, long_repeats=1)


@dataclass(frozen=True)
class Case:
    batch: int
    response: int
    role: str  # "main" (the targets' sizes), "fit" (TRL memory points), "long" (TRL by estimate)

    @property
    def tokens(self) -> int:
        return self.batch * self.response

    @property
    def name(self) -> str:
        return f"B={self.batch}, R={self.response}"


# ---- pure parts (tests/unit/test_vs_trl_benchmark.py) -------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", sys.executable),
                   help="python of the environment TRL is installed in (default: $TRL_PYTHON, else this one)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--prompt", type=int, default=128, help="student prompt tokens")
    p.add_argument("--teacher-extra", type=int, default=256, help="privileged-context tokens")
    p.add_argument("--batch", type=int, default=8, help="prompts per step, main case")
    p.add_argument("--response", type=int, default=256, help="response tokens, main case")
    p.add_argument("--long-batch", type=int, default=4)
    p.add_argument("--long-responses", default="1024,2048", help="response lengths at --long-batch")
    p.add_argument("--fit-responses", default="128,256",
                   help="response lengths at --long-batch that TRL runs to fit its memory formula")
    p.add_argument("--precisions", default="fp32,best", help="fp32 and/or best (bf16 on both sides)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up, main case")
    p.add_argument("--long-repeats", type=int, default=1, help="timed steps after the warm-up, fit and long cases")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recompute", choices=["full", "selective", "none"], default="full",
                   help="our activation recompute (model_build.recompute; default full: TRL's default "
                        "gradient checkpointing recomputes its layers too)")
    p.add_argument("--trl-budget-gib", type=float, default=None,
                   help="TRL runs a case only if its estimated peak fits (default: 90%% of MemAvailable)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (model, checkpoints)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one timed step (smoke run)")
    p.add_argument("--ours-only", action="store_true",
                   help="run our side alone: the main and long cases, no TRL process and no TRL fit cases")
    p.add_argument("--child", help=argparse.SUPPRESS)
    if p.parse_known_args(argv)[0].quick:  # tiny defaults; options given explicitly still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    try:
        args.long_responses = _lengths(args.long_responses)
        args.fit_responses = _lengths(args.fit_responses)
        args.precisions = [x for x in args.precisions.split(",") if x]
        if not args.precisions or set(args.precisions) - {"fp32", "best"}:
            raise ValueError(f"--precisions={','.join(args.precisions)!r}: choose from fp32, best")
        for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "ffn", "prompt", "teacher_extra",
                     "batch", "response", "long_batch", "repeats", "long_repeats", "threads"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
        if args.trl_budget_gib is not None and args.trl_budget_gib <= 0:
            raise ValueError(f"--trl-budget-gib={args.trl_budget_gib} must be > 0")
    except ValueError as exc:
        p.error(str(exc))
    return args


def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r}: give comma-separated token counts, e.g. 1024,2048") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{text!r}: token counts must be >= 1")
    return values


def cases(args) -> list[Case]:
    """The main case, TRL's memory-fit points, then the long cases (in running order)."""
    return ([Case(args.batch, args.response, "main")]
            + [Case(args.long_batch, r, "fit") for r in ([] if args.ours_only else args.fit_responses)]
            + [Case(args.long_batch, r, "long") for r in args.long_responses])


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x; ValueError with fewer than two distinct x."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        raise ValueError(f"a line needs two distinct x values, got {sorted(set(xs))}")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - b * mean_x, b


def trl_estimate(points: list[tuple[int, float]], tokens: int, budget_gib: float) -> tuple[float | None, bool]:
    """(estimated peak GiB at ``tokens`` response tokens, whether to run it). With fewer than two measured
    token counts there is no estimate, and the case is not run (it might not fit)."""
    try:
        a, b = fit_line(points)
    except ValueError:
        return None, False
    estimate = a + b * tokens
    return estimate, estimate <= budget_gib


def _ratio(ours: float | None, trl: float | None) -> str:
    return f"{ours / trl:.2f}" if ours is not None and trl else "-"


def _cell(ours: dict | None, trl: dict | None, key: str, digits: int) -> str:
    """'ours / TRL (ratio)'; a TRL side that did not run shows why."""
    def side(result):
        if result is None:
            return "-"
        if "error" in result:
            return "failed"
        return f"{result[key]:.{digits}f}"

    text = f"{side(ours)} / {side(trl)}"
    if ours and trl and "error" not in ours and "error" not in trl:
        text += f" ({_ratio(ours[key], trl[key])})"
    return text


def format_table(rows: list[dict]) -> str:
    """rows: {case, precision, ours, trl, trl_estimate_gib, trl_skipped}; ours/trl: a child's result,
    {"error": ...} or None (TRL: not run, because it does not fit, ``trl_estimate_gib`` its estimate, or
    for the reason ``trl_skipped``)."""
    lines = ["| case | precision (ours / TRL) | step s: ours / TRL (ratio) | rollout s | train s | "
             "peak RSS GiB |", "|---|---|---|---|---|---|"]
    for row in rows:
        ours, trl = row["ours"], row["trl"]
        cells = [_cell(ours, trl, key, digits) for key, digits in
                 (("step_s", 1), ("rollout_s", 1), ("train_s", 1), ("peak_gib", 2))]
        estimate = row.get("trl_estimate_gib")
        if trl is None:
            ours_ok = ours is not None and "error" not in ours
            ours_peak = f"{ours['peak_gib']:.2f}" if ours_ok else ("failed" if ours else "-")
            if estimate is None:
                cells[-1] = f"{ours_peak} / not run ({row.get('trl_skipped') or 'no estimate'})"
            else:
                ratio = f" (~{ours['peak_gib'] / estimate:.2f} vs estimate)" if ours_ok else ""
                cells[-1] = f"{ours_peak} / does not fit (~{estimate:.1f} GiB){ratio}"
        lines.append(f"| {row['case']} | {row['precision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_memory(rows: list[dict]) -> str:
    """Our peak split into the interpreter, weights, gradients, optimizer state and the rest."""
    lines = ["| case | precision | peak GiB | interpreter | weights | grads (fp32) | optimizer state | "
             "activations and rest |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ours = row["ours"]
        if not ours or "error" in ours:
            continue
        parts = [ours["peak_gib"], ours["interpreter_gib"], ours["weights_gib"], ours["grads_gib"],
                 ours["optimizer_gib"], ours["rest_gib"]]
        lines.append(f"| {row['case']} | {row['dtype']} | " + " | ".join(f"{x:.2f}" for x in parts) + " |")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        ours, trl = row["ours"], row["trl"]
        ok = ours and "error" not in ours
        if row["role"] == "main" and ok and trl and "error" not in trl:
            out.append(f"{row['case']}, {row['precision']}: step {ours['step_s'] / trl['step_s']:.2f}x TRL "
                       f"(target <= 0.25), peak {ours['peak_gib'] / trl['peak_gib']:.2f}x (target <= 0.2)")
        if row["role"] == "long" and ok and row["case"] == row.get("largest_case"):
            out.append(f"{row['case']}, ours {row['dtype']}: peak {ours['peak_gib']:.2f} GiB (target <= 5), "
                       f"step {ours['step_s']:.1f} s")
    main = [r for r in rows if r["role"] == "main" and r["ours"] and r["trl"]
            and "error" not in r["ours"] and "error" not in r["trl"]]
    if len(main) == 2:  # TRL's bf16 (autocast) may be its slower precision on a CPU: compare with its better one
        ours = main[-1]["ours"]
        step, peak = min(r["trl"]["step_s"] for r in main), min(r["trl"]["peak_gib"] for r in main)
        out.append(f"{main[-1]['case']}, ours {main[-1]['dtype']} vs TRL's faster and smaller precision: step "
                   f"{ours['step_s'] / step:.2f}x, peak {ours['peak_gib'] / peak:.2f}x")
    return out


# ---- children ---------------------------------------------------------------------------------------------

def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2 ** 20


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def setup_child(spec: dict) -> dict:
    """The HF model + word-level tokenizer, and our converted checkpoint per dtype."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    m = spec["model"]
    config = transformers.LlamaConfig(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["ffn"], num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"], tie_word_embeddings=False,
        max_position_embeddings=m["max_positions"], pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(spec["hf_dir"])
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, m["vocab"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(spec["hf_dir"])
    from megatron_opsd.conversion.hf_to_megatron import convert_hf_to_megatron

    for dtype, out in spec["megatron_dirs"].items():
        convert_hf_to_megatron(spec["hf_dir"], out, dtype=dtype, log=lambda *a: None)
    return {"ok": True}


def _tensor_bytes(tensors, exclude=frozenset()) -> int:
    seen, total = set(exclude), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def ours_child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from megatron_opsd.checkpoint import load_weights
    from megatron_opsd.checkpoint_paths import read_model_json
    from megatron_opsd.data.batch import collate_pairs
    from megatron_opsd.data.contexts import build_pair
    from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.opsd import LossConfig, StepContext, Teacher
    from megatron_opsd.opsd.step import train_step
    from megatron_opsd.parallel import ParallelConfig, init_parallel, shutdown
    from megatron_opsd.rollout import MegatronRolloutEngine, SampleKey, SamplingParams

    # our modules import megatron-core lazily: without these its ~0.13 GiB would count as activations
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401

    interpreter = _rss_gib()
    runtime = init_parallel(ParallelConfig(), seed=0)
    cfg = read_model_json(spec["megatron_dir"])
    chunks = build_model(cfg, runtime, ModelBuildConfig(dtype=spec["dtype"], init_weights=False,
                                                           recompute=spec.get("recompute", "none")))
    load_weights(chunks, spec["megatron_dir"])
    ddp = wrap_ddp(chunks, runtime)
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=LR, clip_grad=CLIP))
    engine = MegatronRolloutEngine(ddp, runtime, vocab_size=cfg.vocab_size, pad_id=0)
    loss = LossConfig(teacher="live", divergence="forward_kl", clip=None)
    teacher = Teacher(ddp)
    batch, response = spec["batch"], spec["response"]
    sampling = SamplingParams(max_new_tokens=response, seed=0, **SAMPLING)
    times = []
    for step in range(spec["steps"]):
        rows = spec["prompts"][step * batch:(step + 1) * batch]
        start = time.perf_counter()
        rollout = engine.generate([s for s, _ in rows], sampling, [SampleKey(step, i) for i in range(batch)])
        rolled = time.perf_counter()
        assert all(len(r) == response for r in rollout.response_ids)
        pairs = [build_pair(s, s + c, ids, stop_ids=set(), max_seq_len=10 ** 9, overlong="drop")
                 for (s, c), ids in zip(rows, rollout.response_ids)]
        ctx = StepContext(runtime=runtime, loss=loss, temperature=SAMPLING["temperature"],
                          vocab_size=cfg.vocab_size, teacher=teacher, step=step + 1, detailed_metrics=False)
        metrics = train_step(ctx, ddp, optimizer, [collate_pairs(pairs, 0)], pad_id=0, clip_grad=CLIP)
        times.append((time.perf_counter() - start, rolled - start))
    params = [p for c in chunks for p in c.parameters()]
    model_ptrs = frozenset(p.untyped_storage().data_ptr() for p in params)
    grads = [b.grad_data for d in ddp for b in [*d.buffers, *d.expert_parallel_buffers]]
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    state = [t for o in inner for s in o.state.values() for t in s.values() if torch.is_tensor(t)]
    main = [p for o in inner for g in o.param_groups for p in g["params"]]
    weights, grad_bytes = _tensor_bytes(params), _tensor_bytes(grads)
    optim = _tensor_bytes(state + main, exclude=model_ptrs | {g.untyped_storage().data_ptr() for g in grads})
    peak = _peak_gib()
    shutdown()
    return {**_timings(times[1:]), "peak_gib": peak, "interpreter_gib": interpreter, "weights_gib": weights / GIB,
            "grads_gib": grad_bytes / GIB, "optimizer_gib": optim / GIB,
            "rest_gib": peak - interpreter - (weights + grad_bytes + optim) / GIB, "loss": metrics["loss"]}


def _timings(times: list[tuple[float, float]]) -> dict:
    step = statistics.median(t for t, _ in times)
    rollout = statistics.median(r for _, r in times)
    return {"step_s": step, "rollout_s": rollout, "train_s": statistics.median(t - r for t, r in times)}


def trl_child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    interpreter = _rss_gib()
    batch, response = spec["batch"], spec["response"]
    data = Dataset.from_list([{"prompt": _words(s), "privileged_context": _words(c)} for s, c in spec["prompts"]])
    config = SDFTConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=1, max_steps=spec["steps"], learning_rate=LR, max_grad_norm=CLIP,
        max_prompt_length=None, max_completion_length=response, generation_kwargs={"min_new_tokens": response},
        distillation_mode="full_logits", distillation_alpha=0.0, teacher_model_kind="live",
        bf16=spec["dtype"] == "bf16", use_cpu=True, shuffle_dataset=False, seed=0, report_to="none",
        save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, dataloader_num_workers=0, **SAMPLING)
    steps, rollouts = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.start)

    trainer = SDFTTrainer(model=spec["hf_dir"], args=config, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(spec["hf_dir"]), callbacks=[Timer()])
    generate = trainer._generate

    def timed_generate(prompt_ids):
        start = time.perf_counter()
        out = generate(prompt_ids)
        rollouts.append(time.perf_counter() - start)
        lengths = sorted({len(ids) for ids in out[1]})
        if lengths != [response]:
            raise RuntimeError(f"TRL generated responses of {lengths} tokens, expected {response}")
        return out

    trainer._generate = timed_generate
    trainer.train()
    return {**_timings(list(zip(steps, rollouts))[1:]), "peak_gib": _peak_gib(), "interpreter_gib": interpreter}


def run_child(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    if spec["side"] != "ours":  # keep TRL's own logging out of the result line
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = {"setup": setup_child, "ours": ours_child, "trl": trl_child}[spec["side"]](spec)
    print(RESULT + json.dumps(result), flush=True)


# ---- the parent ---------------------------------------------------------------------------------------------

def _free_port(low: int = 30010, high: int = 30099) -> int:
    for port in range(low, high + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {low}-{high}")


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2 ** 20


def spawn(python: str, spec: dict, tmp: Path, threads: int) -> dict:
    path = tmp / f"spec-{spec['side']}-{spec.get('dtype', '')}-{spec.get('batch', '')}-{spec.get('response', '')}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if spec["side"] == "trl":  # TRL's environment must not see our package
        env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    start = time.perf_counter()
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--child", str(path)], capture_output=True,
                          text=True, env=env, cwd=tmp)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    label = f"{spec['side']} {spec.get('dtype', '')} B={spec.get('batch', '-')} R={spec.get('response', '-')}"
    if proc.returncode != 0 or not lines:
        print(f"[vs_trl] {label} failed (exit {proc.returncode}):\n{proc.stdout[-1500:]}{proc.stderr[-3000:]}",
              file=sys.stderr, flush=True)
        return {"error": f"exit {proc.returncode}"}
    result = json.loads(lines[-1][len(RESULT):])
    print(f"[vs_trl] {label}: {json.dumps(result)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
          flush=True)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child([args.child])
        return
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="vstrl-"))
    dtypes = {"fp32": ("fp32", "fp32"), "best": ("bf16", "bf16")}
    needed = sorted({dtypes[p][0] for p in args.precisions})
    the_cases = cases(args)
    longest = max(c.response for c in the_cases)
    model = dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                 ffn=args.ffn, max_positions=args.prompt + args.teacher_extra + longest + 8)
    base = dict(hf_dir=str(tmp / "hf"), threads=args.threads)
    megatron_dirs = {d: str(tmp / f"megatron-{d}") for d in needed}
    try:
        if "error" in spawn(sys.executable, {**base, "side": "setup", "model": model,
                                             "megatron_dirs": megatron_dirs}, tmp, args.threads):
            sys.exit("vs_trl: building or converting the model failed (see above)")
        rng = random.Random(0)
        rows, points = [], {p: [] for p in args.precisions}
        largest = max((c for c in the_cases if c.role == "long"), key=lambda c: c.tokens, default=None)
        for case in the_cases:
            steps = 1 + (args.repeats if case.role == "main" else args.long_repeats)
            prompts = [(rng.sample(range(3, args.vocab), args.prompt),
                        rng.sample(range(3, args.vocab), args.teacher_extra)) for _ in range(steps * case.batch)]
            spec = {**base, "batch": case.batch, "response": case.response, "steps": steps, "prompts": prompts,
                    "recompute": args.recompute}
            trl_fp32 = None
            for precision in args.precisions:
                ours_dtype, trl_dtype = dtypes[precision]
                ours = spawn(sys.executable, {**spec, "side": "ours", "dtype": ours_dtype,
                                              "megatron_dir": megatron_dirs[ours_dtype]}, tmp, args.threads)
                budget = args.trl_budget_gib or 0.9 * mem_available_gib()
                estimate, run = trl_estimate(points[precision], case.tokens, budget)
                trl, label = None, trl_dtype
                if (case.role != "long" or run) and not args.ours_only:
                    trl = spawn(args.trl_python, {**spec, "side": "trl", "dtype": trl_dtype,
                                                  "out_dir": str(tmp / "trl-out")}, tmp, args.threads)
                    if "error" in trl and precision == "best" and trl_fp32 is not None:
                        trl, label = trl_fp32, "fp32 (bf16 failed)"
                    if "error" not in trl:
                        points[precision].append((case.tokens, trl["peak_gib"]))
                        estimate = None
                elif not args.ours_only:
                    why = "no estimate" if estimate is None else f"estimated {estimate:.1f} GiB > {budget:.1f} GiB"
                    print(f"[vs_trl] TRL {trl_dtype} {case.name}: not run ({why})", file=sys.stderr, flush=True)
                if precision == "fp32":
                    trl_fp32 = trl
                rows.append({"case": case.name, "role": case.role, "precision": f"{ours_dtype} / {label}",
                             "dtype": ours_dtype, "ours": ours, "trl": trl, "trl_estimate_gib": estimate,
                             "trl_skipped": "--ours-only" if args.ours_only else None,
                             "largest_case": largest.name if largest else None})
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n# OPSD step vs TRL {'(quick) ' if args.quick else ''}on CPU, {args.threads} threads: random Llama "
          f"V={args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV, "
          f"ffn {args.ffn}; {args.prompt}-token prompts, teacher prompts +{args.teacher_extra}; R-token responses; "
          f"T=1.1 top-p 0.95 top-k 20; forward KL, live teacher; our recompute {args.recompute} (TRL: gradient "
          f"checkpointing); median of {args.repeats} steps "
          f"({args.long_repeats} at B={args.long_batch}) after a warm-up; load average "
          f"{os.getloadavg()[0]:.1f} at the end, {(time.time() - started) / 60:.0f} min\n")
    print(format_table(rows))
    for precision, pts in points.items():
        try:
            a, b = fit_line(pts)
            print(f"\nTRL peak ({dtypes[precision][1]}) ~ {a:.2f} GiB + {b * 1024:.3f} GiB per 1,024 response tokens "
                  f"(B*R), fitted on {len(pts)} runs")
        except ValueError:
            pass
    print("\nOur peak, decomposed (GiB):\n")
    print(format_memory(rows))
    print()
    for line in target_lines(rows):
        print(line)


if __name__ == "__main__":
    main()
