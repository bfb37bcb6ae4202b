"""Shared-prefix rollout: prefill time per group of n samples, shared (one prefill per prompt, KV cache
replicated) vs independent (each sample prefills its own copy of the prompt).

    python benchmarks/shared_prefill.py              # Llama-shaped ~40M, 4 prompts x n=8, 256-token prompts
    python benchmarks/shared_prefill.py --quick

One process, TP=1, fp32, random weights and prompt ids, the paper's sampling settings. Prefill time is
the engine's own measurement of the first forward (``stats["prefill_s"]``); the whole call (prefill +
``--new-tokens`` decode steps) is timed too. Minimum over ``--repeats`` alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.prompt_len, args.new_tokens = 128, 2, 1000, 64, 4
    import torch

    from megatron_opsd.models.description import ModelConfig
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel
    from megatron_opsd.rollout import MegatronRolloutEngine, SampleKey, SamplingParams

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    cfg = ModelConfig(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      max_position_embeddings=args.prompt_len + args.new_tokens + 8)
    runtime = init_parallel(ParallelConfig(), seed=0)
    chunks = build_model(cfg, runtime)
    gen = torch.Generator().manual_seed(0)
    distinct = [torch.randint(0, args.vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    prompts = [q for q in distinct for _ in range(args.n)]
    keys = [SampleKey(prompt_id=i // args.n, sample_idx=i % args.n) for i in range(len(prompts))]
    params = SamplingParams(temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=args.new_tokens, seed=1)
    MegatronRolloutEngine(chunks, runtime, vocab_size=args.vocab).generate(  # untimed warm-up
        prompts[:2], SamplingParams(max_new_tokens=2), keys[:2])
    best = {}
    for _ in range(args.repeats):
        for shared in (True, False):
            eng = MegatronRolloutEngine(chunks, runtime, vocab_size=args.vocab, shared_prefill=shared)
            start = time.perf_counter()
            out = eng.generate(prompts, params, keys)
            total = time.perf_counter() - start
            prev = best.get(shared)
            if prev is None or eng.stats["prefill_s"] < prev[0]:
                best[shared] = (eng.stats["prefill_s"], total, eng.stats["prefill_rows"], out.response_ids)
    assert best[True][3] == best[False][3], "shared prefill changed the samples"
    print(f"{args.prompts} prompts x n={args.n}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, {args.threads} threads")
    print(f"{'':<12} {'prefilled rows':>14} {'prefill s/group':>16} {'whole call s':>13}")
    for shared in (True, False):
        prefill, total, rows, _ = best[shared]
        print(f"{'shared' if shared else 'independent':<12} {rows:>14} {prefill / args.prompts:>16.4f} {total:>13.3f}")
    print(f"prefill speed-up per group: {best[False][0] / best[True][0]:.1f}x (samples identical)")
    runtime.destroy()


if __name__ == "__main__":
    main()
