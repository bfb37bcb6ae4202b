"""``tools/generate.py``: sample responses from a checkpoint for a JSONL file of prompts (torchrun).

Input lines: ``{"prompt": "text"}`` (rendered with the tokenizer's chat template unless ``--raw``) or
``{"prompt_ids": [ids]}``; other fields (e.g. ``id``) are copied to the output. Output lines, in input
order (``--num-samples`` lines per prompt): ``index``, ``sample``, ``prompt_ids``, ``response_ids``,
``response`` (text; null without a tokenizer), ``logprobs`` (under the sampling distribution),
``model_logprobs`` (raw model, T = 1) and ``finish_reason``.

The world is split into TP x PP x DP; each data-parallel rank samples every dp-th request and rank 0
writes the file (atomically). Sample (i, s) is seeded by (--seed, --step, prompt index i, sample s), so
the output does not depend on the layout or on --batch-size.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sample responses with the rollout engine (KV cache, TP/PP/DP) from a converted or "
                    "training checkpoint. Launch with torchrun; world size = tp * pp * dp.")
    parser.add_argument("--load", required=True,
                        help="checkpoint: a converted model directory, a training step directory, or a "
                             "training root (its 'latest' step is used)")
    parser.add_argument("--prompts", required=True, help="JSONL with 'prompt' (text) or 'prompt_ids' per line")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-p/top-k)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer directory or sentencepiece .model (default: the tokenizer "
                             "stored with the model; one given here must match it)")
    parser.add_argument("--raw", action="store_true", help="encode 'prompt' text as is (no chat template)")
    parser.add_argument("--enable-thinking", action="store_true",
                        help="render prompts with thinking on (templates that support it)")
    parser.add_argument("--stop-ids", type=int, nargs="*", default=None,
                        help="token ids that end a response (default: the tokenizer's EOS/end-of-turn ids)")
    parser.add_argument("--num-samples", type=int, default=1, help="responses per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=0, help="the step coordinate of the sample keys")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per forward (default: all)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples={args.num_samples} must be >= 1")
    return args


def read_prompts(path: str | Path, tokenizer, *, raw: bool, enable_thinking: bool,
                 vocab_size: int) -> list[tuple[dict, list[int]]]:
    """(record, prompt ids) per line of ``path``; a bad line is refused naming ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    out = []
    # Lines are split on "\n" only: JSON strings may hold other Unicode line separators.
    for n, raw_line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{n}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' or 'prompt_ids'")
        if "prompt_ids" in record:
            ids = record["prompt_ids"]
            if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
                raise ValueError(f"{path}:{n}: 'prompt_ids' must be a non-empty list of integers")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{path}:{n}: 'prompt_ids' holds {bad[:4]}, outside the model's vocabulary "
                                 f"[0, {vocab_size})")
        elif "prompt" in record:
            text = record["prompt"]
            if not isinstance(text, str) or not text:
                raise ValueError(f"{path}:{n}: 'prompt' must be a non-empty string")
            if tokenizer is None:
                raise ValueError(f"{path}:{n} has a text 'prompt' but no tokenizer was found: pass --tokenizer")
            ids = tokenizer.encode(text) if raw else tokenizer.render_prompt(text, enable_thinking=enable_thinking)
        else:
            raise ValueError(f"{path}:{n}: each line needs 'prompt' (text) or 'prompt_ids' (token ids)")
        out.append((record, ids))
    if not out:
        raise ValueError(f"--prompts {path} holds no prompts")
    return out


def check_output_path(out: str | Path, inputs: list[Path]) -> Path:
    """Refuse an ``--out`` that is, or lies inside, one of the ``inputs`` (files or directories)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: name a file")
    resolved = out.resolve()
    for item in inputs:
        item = item.resolve()
        if resolved == item or item.is_dir() and resolved.is_relative_to(item):
            raise ValueError(f"--out {out} would write into the input {item}: choose another output file")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch.distributed as dist

    from megatron_opsd.checkpoint import load_weights, read_model_json, resolve_weights
    from megatron_opsd.conversion.files import find_tokenizer_dir, model_tokenizer
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel
    from megatron_opsd.rollout import MegatronRolloutEngine, SampleKey, SamplingParams

    step_dir = resolve_weights(args.load, "--load")
    cfg = read_model_json(step_dir)
    inputs = [Path(args.prompts), Path(args.load), step_dir] + ([Path(args.tokenizer)] if args.tokenizer else [])
    check_output_path(args.out, inputs)
    # The model's own tokenizer by default; one given with --tokenizer must match it.
    tokenizer = model_tokenizer(args.tokenizer, find_tokenizer_dir(step_dir) or step_dir, cfg.vocab_size)
    requests = read_prompts(args.prompts, tokenizer, raw=args.raw, enable_thinking=args.enable_thinking,
                            vocab_size=cfg.vocab_size)
    stop_ids = args.stop_ids if args.stop_ids is not None else sorted(tokenizer.stop_ids) if tokenizer else []
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              greedy=args.greedy, max_new_tokens=args.max_new_tokens, stop_ids=tuple(stop_ids),
                              seed=args.seed)

    runtime = init_parallel(ParallelConfig(tp=args.tp, pp=args.pp), seed=args.seed)
    chunks = build_model(cfg, runtime, ModelBuildConfig(dtype=args.dtype, init_weights=False))
    load_weights(chunks, step_dir, "--load", runtime=runtime)  # (a LoRA checkpoint: base + its adapters)
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id < cfg.vocab_size else 0
    engine = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size, pad_id=pad_id,
                                   max_batch_size=args.batch_size)

    jobs = [(i, s) for i in range(len(requests)) for s in range(args.num_samples)]
    mine = jobs[runtime.dp_rank::runtime.dp]
    rollout = engine.generate([requests[i][1] for i, _ in mine], sampling,
                              [SampleKey(args.step, i, s) for i, s in mine])
    lines = {}
    for (i, s), ids, lp, mlp, reason in zip(mine, rollout.response_ids, rollout.sampling_logprobs,
                                            rollout.model_logprobs, rollout.finish_reasons):
        record, prompt_ids = requests[i]
        extra = {k: v for k, v in record.items() if k not in ("prompt_ids",)}
        lines[(i, s)] = json.dumps({**extra, "index": i, "sample": s, "prompt_ids": prompt_ids, "response_ids": ids,
                                    "response": tokenizer.decode(ids) if tokenizer is not None else None,
                                    "logprobs": lp, "model_logprobs": mlp, "finish_reason": reason})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lines)
    if dist.get_rank() == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        assert len(merged) == len(jobs), f"internal: {len(merged)} of {len(jobs)} responses gathered"
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(merged[job] + "\n" for job in jobs))
        os.replace(tmp, out)
        print(f"wrote {len(jobs)} responses to {out} (tp={runtime.tp} pp={runtime.pp} dp={runtime.dp})", flush=True)
    runtime.destroy()
    dist.destroy_process_group()
    return 0
