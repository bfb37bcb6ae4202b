"""Rollout throughput on CPU: our KV-cached engine vs HF ``generate`` (KV cache) vs a no-cache loop.

    python benchmarks/rollout.py                 # the issue's sizes: ~134M Llama, batch 8, 128 + 256
    python benchmarks/rollout.py --quick         # a small smoke run
    python benchmarks/rollout.py --dtype bf16    # both sides' weights, activations and KV cache in bf16
    python benchmarks/rollout.py --profile 40    # also: where our decode step spends its time (torch.profiler)

One process, TP=1, fp32 (or ``--dtype bf16``: weights, activations and KV cache in bf16; our sampler
works in fp32 on the logits, our CPU attention in fp32), the same random Llama-shaped weights in both
implementations (HF's init, mapped into megatron-core through the HF name map), random prompt ids, the
paper's sampling settings
(T 1.1, top-k 20, top-p 0.95; ``--greedy`` for argmax) and no stop ids, so every row generates exactly
the requested number of tokens. tokens/s = batch x new tokens / wall time of the whole call (prefill
included). Rows:
  ours (KV cache)      MegatronRolloutEngine: megatron-core StaticInferenceContext + sharded sampler,
                       linears on oneDNN-prepacked weights (``rollout/packed_linear.py``)
  ours, unpacked       the same with ``packed_weights=False`` (torch's default CPU matmul kernels)
  ours, mode kept      the same with ``leave_placement_mode=False``: every decode step under
                       ``cpu_compat``'s placement mode (a Python handler on every torch call)
  HF generate          transformers LlamaForCausalLM.generate (sdpa attention, DynamicCache), run without
                       the torch-function mode our CPU patches keep active (``cpu_compat``)
  no-cache recompute   MegatronRolloutEngine(kv_cache=False): the full sequence every step (only
                       ``--no-cache-new-tokens`` tokens: its cost grows with length, so this
                       overstates its speed at the full length)
Times are the minimum over ``--repeats`` rounds that alternate the implementations, after an untimed
warm-up of 4 tokens each. The machine is shared, so the table also gives CPU seconds (process time, all
threads): less sensitive than wall time to other jobs on the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def _without_torch_function_modes():
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    with contextlib.ExitStack() as stack:
        for _ in _get_current_function_mode_stack():
            stack.enter_context(_pop_mode_temporarily())
        yield


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--no-cache-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the table, profile STEPS decode steps of ours (from decode step 8) with torch.profiler")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab = 128, 2, 4, 4, 256, 1000
        args.batch, args.prompt_len, args.new_tokens, args.no_cache_new_tokens = 2, 16, 16, 8
    return args


def build(args):
    import torch
    import transformers

    from megatron_opsd.models.description import ModelConfig
    from megatron_opsd.models.hf_mapping import hf_to_unsharded
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.models.sharding import load_unsharded
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 8, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    runtime = init_parallel(ParallelConfig(), seed=0)
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    chunks = build_model(cfg, runtime, ModelBuildConfig(init_weights=False, dtype=args.dtype))
    load_unsharded(chunks, dict(hf_to_unsharded(hf.state_dict().items(), cfg)), 0, 1)
    if args.dtype == "bf16":
        hf = hf.to(torch.bfloat16)
    return hf, chunks, runtime, cfg


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from megatron_opsd.rollout import MegatronRolloutEngine, SampleKey, SamplingParams

    hf, chunks, runtime, cfg = build(args)
    num_params = sum(p.numel() for p in hf.parameters())
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=gen)
    keys = [SampleKey(0, i, 0) for i in range(args.batch)]
    sampling = dict(greedy=True) if args.greedy else dict(temperature=1.1, top_k=20, top_p=0.95)

    def ours(new_tokens, kv_cache=True, packed_weights=True, leave_placement_mode=True):
        engine = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size, kv_cache=kv_cache,
                                       packed_weights=packed_weights, leave_placement_mode=leave_placement_mode)
        out = engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=new_tokens, **sampling), keys)
        assert all(len(r) == new_tokens for r in out.response_ids)

    def hf_generate(new_tokens):
        kwargs = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=1.1, top_k=20, top_p=0.95)
        # HF runs without megatron_opsd.cpu_compat's placement mode: a Python handler on every torch call,
        # which megatron-core needs on CPU and HF does not (it would tax HF's many small calls)
        with torch.no_grad(), _without_torch_function_modes():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, use_cache=True, **kwargs)
        assert out.shape[1] == args.prompt_len + new_tokens

    runs = {"ours (KV cache)": (lambda: ours(args.new_tokens), args.new_tokens),
            "ours, unpacked weights": (lambda: ours(args.new_tokens, packed_weights=False), args.new_tokens),
            "ours, placement mode kept": (lambda: ours(args.new_tokens, leave_placement_mode=False), args.new_tokens),
            "HF generate (KV cache)": (lambda: hf_generate(args.new_tokens), args.new_tokens),
            "no-cache recompute (ours)": (lambda: ours(args.no_cache_new_tokens, kv_cache=False),
                                          args.no_cache_new_tokens)}
    ours(4), ours(4, packed_weights=False), ours(4, leave_placement_mode=False), hf_generate(4)  # warm-up
    ours(4, kv_cache=False)
    best = {name: float("inf") for name in runs}
    best_cpu = dict(best)
    for _ in range(args.repeats):
        for name, (fn, _) in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
            best_cpu[name] = min(best_cpu[name], time.process_time() - start_cpu)
            print(f"  {name}: {best[name]:.1f}s wall, {best_cpu[name]:.1f}s CPU", flush=True)

    print(f"\nRollout throughput, CPU, {args.threads} threads, {args.dtype}, TP=1: random Llama "
          f"(hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV, ffn {args.ffn}, "
          f"vocab {args.vocab}; {num_params / 1e6:.0f}M params), batch {args.batch}, {args.prompt_len}-token prompts, "
          f"{'greedy' if args.greedy else 'T=1.1 top-k 20 top-p 0.95'}; best of {args.repeats}")
    hf_name = "HF generate (KV cache)"
    ref = args.batch * args.new_tokens / best[hf_name]
    ref_cpu = args.batch * args.new_tokens / best_cpu[hf_name]
    print("\n| implementation | new tokens | wall s | tokens/s | vs HF | CPU s | tokens/CPU-s | vs HF (CPU) |"
          "\n|---|---|---|---|---|---|---|---|")
    for name, (_, new_tokens) in runs.items():
        rate, rate_cpu = args.batch * new_tokens / best[name], args.batch * new_tokens / best_cpu[name]
        print(f"| {name} | {new_tokens} | {best[name]:.1f} | {rate:.1f} | {rate / ref:.2f}x | {best_cpu[name]:.1f} | "
              f"{rate_cpu:.1f} | {rate_cpu / ref_cpu:.2f}x |")
    if args.profile:
        profile_decode(chunks, runtime, cfg, prompts, keys, sampling, args.profile)
    runtime.destroy()


def profile_decode(chunks, runtime, cfg, prompts, keys, sampling, steps: int, first: int = 8) -> None:
    """Self CPU time per decode step by operator (the main thread's view: an op's time includes its other
    threads' work), over decode steps ``first`` .. ``first + steps - 1`` of one rollout of ours."""
    import torch
    from torch.profiler import profile

    from megatron_opsd.rollout import MegatronRolloutEngine, SamplingParams

    engine = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size)
    prof, seen, wall = profile(), [], {}
    forward = engine._forward

    def counting_forward(tokens_bs, *rest):  # decode forwards only: one new token per row
        if tokens_bs.shape[1] == 1:
            seen.append(1)
            if len(seen) == first:
                prof.__enter__()
                wall["start"] = time.perf_counter()
            elif len(seen) == first + steps:
                wall["s"] = time.perf_counter() - wall["start"]
                prof.__exit__(None, None, None)
        return forward(tokens_bs, *rest)

    engine._forward = counting_forward
    engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=first + steps + 1, **sampling), keys)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    print(f"\nOur decode steps {first}-{first + steps - 1} under torch.profiler: {wall['s'] / steps * 1e3:.1f} ms wall "
          f"per step (profiler overhead included), {total_ms:.1f} ms of op self time, "
          f"{sum(e.count for e in events) / steps:.0f} op calls per step\n")
    print("| op | calls / step | self ms / step | share |\n|---|---|---|---|")
    for e in events[:12]:
        ms = e.self_cpu_time_total / 1e3 / steps
        print(f"| {e.key} | {e.count / steps:.0f} | {ms:.2f} | {ms / total_ms:.0%} |")
    rest = sum(e.self_cpu_time_total for e in events[12:]) / 1e3 / steps
    print(f"| {len(events) - 12} other ops | {sum(e.count for e in events[12:]) / steps:.0f} | {rest:.2f} | "
          f"{rest / total_ms:.0%} |")


if __name__ == "__main__":
    main()
