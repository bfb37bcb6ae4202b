"""Converted checkpoints at every layout, in one 4-process launch (gloo).

For each family (checkpoints converted by conversion_single.py into WORKDIR/meg/<family>), at each
layout TP x PP in {1,2}x{1,2}, TP=4 (4 query heads over 2 KV groups: TP > groups) and PP2 x VPP2:
  * load through megatron-core (``checkpoint.load_model``); fp32 logits (TP shards gathered here) vs
    transformers' eager model on the same tokens: within ATOL_TP1 at TP1/PP1, ATOL_LAYOUT elsewhere;
    vocab padding (250 -> 252 at TP=4) never enters the comparison (first V columns only);
  * save again from that layout (``checkpoint.save_model``) into WORKDIR/resaved/<family>_<layout>
    (conversion_single.py export-resaved then checks the HF export of each is bit-exact);
  * cross-layout: load the checkpoint the previous layout wrote: logits *equal* (torch.equal) to this
    layout's logits from the converter's checkpoint (the weights must be bit-identical).

Layouts are the outer loop: every re-initialisation of megatron's parallel state leaves ~50 gloo
threads per process behind, so the worker initialises each layout once for all families.

usage: torchrun --nproc_per_node=4 conversion_layouts.py WORKDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.distributed.workers.common import rank_print  # noqa: E402
from tests.hf_fixtures import FAMILIES, load_hf_model  # noqa: E402

ATOL_TP1 = 1e-5
# Sharded matmuls and all-reduces sum in another order than HF's unsharded ones: a few fp32 ulps of
# the largest partial sums (logits are O(1-3) here); measured <= 3e-6. 2e-5 leaves headroom.
ATOL_LAYOUT = 2e-5
# Each layout also loads the checkpoint the previous one wrote.
LAYOUTS = [(4, 1, None), (2, 2, None), (1, 1, None), (1, 2, None), (2, 1, None), (2, 2, 2)]
SEQ, BATCH = 48, 2


def layout_name(tp: int, pp: int, vpp: int | None) -> str:
    return f"tp{tp}_pp{pp}" + (f"_vpp{vpp}" if vpp else "")


def logits_at_layout(cfg, checkpoint: Path, tokens, runtime, save_to: Path | None = None) -> torch.Tensor:
    """Full-vocabulary logits [B, L, V] (on every rank) of ``checkpoint`` loaded at this layout."""
    from megatron_opsd.checkpoint import load_model, save_model
    from megatron_opsd.conversion.verify import megatron_logits
    from megatron_opsd.models.provider import build_model

    chunks = build_model(cfg, runtime)  # randomly initialised: loading must overwrite every weight
    load_model(chunks, checkpoint)
    for chunk in chunks:  # (megatron-core refuses MoE *training* at TP > 1 without sequence parallelism)
        chunk.eval()
    logits = megatron_logits(chunks, runtime, tokens)
    # Share the last stage's logits with every rank (for the comparisons below).
    full = torch.zeros(BATCH, SEQ, cfg.vocab_size)
    flag = torch.zeros(1)
    if runtime.is_last_stage and runtime.tp_rank == 0 and runtime.dp_rank == 0:
        full, flag = logits[..., :cfg.vocab_size].contiguous(), torch.ones(1)
    dist.all_reduce(full)
    dist.all_reduce(flag)
    assert flag.item() == 1
    if save_to is not None:
        save_model(chunks, cfg, save_to)
    return full


def main() -> None:
    from megatron_opsd.checkpoint import read_model_json
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    work = Path(sys.argv[1])
    cases = {}
    for family in FAMILIES:
        cfg = read_model_json(work / "meg" / family)
        tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            reference = load_hf_model(work / "hf" / family)(input_ids=tokens, use_cache=False).logits
        cases[family] = (cfg, tokens, reference)

    previous = None
    for tp, pp, vpp in LAYOUTS:
        name = layout_name(tp, pp, vpp)
        runtime = init_parallel(ParallelConfig(tp=tp, pp=pp, vpp=vpp), seed=17)
        for family, (cfg, tokens, reference) in cases.items():
            logits = logits_at_layout(cfg, work / "meg" / family, tokens, runtime,
                                      save_to=work / "resaved" / f"{family}_{name}")
            err = (logits - reference).abs().max().item()
            atol = ATOL_TP1 if (tp, pp) == (1, 1) else ATOL_LAYOUT
            assert err <= atol, f"{family} {name}: max|dlogit| vs HF {err:.3e} > {atol}"
            rank_print(f"{family:<8} {name:<12} max|dlogit| vs HF={err:.2e} (atol {atol:g})")
            if previous:
                # Written at the previous layout, loaded at this one: identical weights, identical logits.
                again = logits_at_layout(cfg, work / "resaved" / f"{family}_{previous}", tokens, runtime)
                diff = (again - logits).abs().max().item()
                assert torch.equal(again, logits), f"{family}: written {previous}, loaded {name}: differ by {diff}"
                rank_print(f"{family:<8} written {previous} -> loaded {name}: logits equal")
        runtime.destroy()
        previous = name
    from megatron.core import dist_checkpointing

    # The TP=4 checkpoints really carry padding rows (250 -> 252), which the HF export must drop.
    stored = dist_checkpointing.load_tensors_metadata(str(work / "resaved" / "llama_tp4_pp1"))
    assert stored["embedding.word_embeddings.weight"].global_shape[0] == 252
    assert stored["output_layer.weight"].global_shape[0] == 252
    rank_print("conversion layouts: all checks passed")


if __name__ == "__main__":
    main()
