"""The OPSD step on mixtures of experts against a plain fp64 OPSD computation on the HF transformers model
(the dense check is opsd_hf_reference.py; same pairs, loss, tolerances). The aux loss is off in both
(router_aux_loss_coef = 0 here; HF adds none without output_router_logits): loss and every student
gradient, router and each expert included, must match.

usage: torchrun --nproc_per_node=1 moe_opsd_hf_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common import rank_print  # noqa: E402
from opsd_hf_reference import CLIP, TEMPERATURE, compare, make_pairs, reference  # noqa: E402
from megatron_opsd.data.batch import collate_pairs  # noqa: E402
from megatron_opsd.engine import wrap_ddp  # noqa: E402
from megatron_opsd.models.description import ModelConfig  # noqa: E402
from megatron_opsd.models.hf_mapping import hf_to_unsharded  # noqa: E402
from megatron_opsd.models.provider import build_model  # noqa: E402
from megatron_opsd.models.sharding import load_unsharded  # noqa: E402
from megatron_opsd.opsd import LossConfig, StepContext, Teacher  # noqa: E402
from megatron_opsd.opsd.step import run_schedule, zero_grads  # noqa: E402
from megatron_opsd.parallel import ParallelConfig, init_parallel  # noqa: E402
from tests.hf_fixtures import build_hf_model, checkpoint_tensors, to_checkpoint_names  # noqa: E402


def check(family: str, **overrides) -> None:
    hf_model = build_hf_model(family, router_aux_loss_coef=0.0, **overrides)
    hf_model.config._experts_implementation = "eager"  # the per-expert loop: the grouped kernel has no fp64
    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    pairs = make_pairs(cfg.vocab_size)
    runtime = init_parallel(ParallelConfig(), seed=0)
    chunks = build_model(cfg, runtime)
    tensors = checkpoint_tensors(hf_model)
    load_unsharded(chunks, dict(hf_to_unsharded(tensors.items(), cfg, names=set(tensors))), 0, 1,
                   tied=cfg.tie_word_embeddings)
    ddp = wrap_ddp(chunks, runtime)
    ctx = StepContext(runtime=runtime, loss=LossConfig(clip=CLIP, teacher="live"), temperature=TEMPERATURE,
                      vocab_size=cfg.vocab_size, teacher=Teacher(ddp))
    zero_grads(ddp, None)
    metrics = run_schedule(ctx, ddp, [collate_pairs(pairs[:3], 0), collate_pairs(pairs[3:], 0)], pad_id=0)
    ours = {name: p.main_grad for name, p in ddp[0].module.named_parameters()}

    ref_loss, ref_grads_hf = reference(hf_model, pairs)
    compare(family, cfg, metrics["loss"], ours, ref_loss,
            dict(hf_to_unsharded(to_checkpoint_names(ref_grads_hf, family).items(), cfg)))
    assert metrics["moe_aux_loss"] == 0.0 and any("local_experts.3" in n for n in ours)
    runtime.destroy()


def main() -> None:
    check("qwen3_moe")
    check("qwen2_moe", mlp_only_layers=[1])
    check("mixtral")
    rank_print("moe_opsd_hf_reference: all checks passed")


if __name__ == "__main__":
    main()
