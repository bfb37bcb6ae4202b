"""Does merging LoRA adapters into the weights pay for a rollout? One table, one process (TP=1, CPU).

    python benchmarks/lora_rollout.py                 # the 134M model of benchmarks/rollout.py, r=64
    python benchmarks/lora_rollout.py --quick

Rows: sampling with the adapters applied on the fly (what the trainer does: the student samples with
its adapters), sampling with the adapters switched off (the speed of a merged model: identical weight
shapes), and the cost of merging for a rollout: W += (alpha / r) B A for every adapted projection and
the exact restore afterwards (the training step needs the unmerged base: a bf16 W + BA - BA is not W,
so the base must be copied aside, which is also measured as memory).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.ffn, args.vocab, args.new_tokens = 128, 2, 4, 256, 1000, 8
    torch.set_num_threads(args.threads)

    from megatron_opsd.models.description import ModelConfig
    from megatron_opsd.models.lora import LoRAConfig, adapter_items, adapters, adapters_set, attach_lora
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel
    from megatron_opsd.rollout import MegatronRolloutEngine, SampleKey, SamplingParams

    cfg = ModelConfig(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=4096)
    runtime = init_parallel(ParallelConfig(), seed=0)
    chunks = build_model(cfg, runtime)
    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
    attach_lora(chunks, cfg, lora, runtime, seed=0)
    with torch.no_grad():
        for _, module, name in adapter_items(chunks):
            getattr(module, name).normal_(0, 0.02)
    engine = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, cfg.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
    keys = [SampleKey(step=0, prompt_id=i) for i in range(args.batch)]
    sampling = SamplingParams(temperature=1.1, top_k=20, top_p=0.95, max_new_tokens=args.new_tokens)

    def rollout() -> float:
        start = time.perf_counter()
        engine.generate(prompts, sampling, keys)
        return time.perf_counter() - start

    def merge_and_restore() -> tuple[float, int]:
        """W += s B A for every adapted projection (fp32), then the exact W back from a copy."""
        start = time.perf_counter()
        saved, copied = [], 0
        with torch.no_grad():
            for _, linear_name, module in adapters(chunks):
                parent = next(m for m in chunks[0].modules() if getattr(m, f"{linear_name}_lora", None) is module)
                weight = getattr(parent, linear_name).weight
                saved.append((weight, weight.detach().clone()))
                copied += weight.numel() * weight.element_size()
                delta = {p: module.scaling * (getattr(module, f"{p}_B").float() @ getattr(module, f"{p}_A").float())
                         for p in module.projections}
                if module.kind == "column":  # the fused layout of the layer's output rows
                    x = torch.eye(weight.shape[1])
                    rows = module.layout({p: x @ d.t() for p, d in delta.items()})  # [in, out]
                    weight.add_(rows.t().to(weight.dtype))
                else:
                    weight.add_(delta[module.projections[0]].to(weight.dtype))
            for weight, copy in saved:
                weight.copy_(copy)
        return time.perf_counter() - start, copied

    rollout()  # warm-up
    on = min(rollout() for _ in range(2))
    with adapters_set(chunks, "off"):
        off = min(rollout() for _ in range(2))
    merge_s, copied = merge_and_restore()
    tokens = args.batch * args.new_tokens
    print(f"# rollout, TP=1 CPU ({args.threads} threads): {args.layers} layers, hidden {args.hidden}, "
          f"V={args.vocab}, LoRA r={args.rank} on all seven projections; batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens")
    print("| | time (s) | tokens/s | vs adapters on |")
    print("|---|---|---|---|")
    print(f"| adapters applied on the fly (ours) | {on:.2f} | {tokens / on:.1f} | 1.00 |")
    print(f"| merged weights (adapters off: same shapes) | {off:.2f} | {tokens / off:.1f} | {off / on:.2f} |")
    print(f"| merge + exact restore, once per rollout | {merge_s:.2f} | | {merge_s / on:.2f} |")
    print(f"\nmerging would save {on - off:.2f} s of sampling and cost {merge_s:.2f} s plus a copy of the adapted "
          f"weights ({copied / 2**20:.0f} MiB); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
