"""HF <-> megatron conversion of mixtures of experts (Qwen3-MoE, Qwen2-MoE, Mixtral).

usage: python moe_conversion.py convert WORKDIR           (one process; writes WORKDIR/hf, meg, back)
       torchrun --nproc_per_node=4 moe_conversion.py layouts WORKDIR
       python moe_conversion.py export-resaved WORKDIR    (after layouts)

``convert`` (per family; qwen2_moe with layer 1 dense (mlp_only_layers) so mixed layers are covered):
  * HF -> megatron -> HF through the command line: every tensor bit-exact (router, every expert, the
    shared expert and its gate), transformers reloads the export with identical logits;
  * TP1 fp32 logits of the checkpoint vs transformers within ATOL;
  * a "swapped expert" checkpoint: experts 0 and 1 of layer 0 exchanged in the HF files before converting
    (the router still sends tokens to the old places), for the verifier to catch.
``layouts`` (4 processes): at EP2 (x DP2), EP4, EP2 x PP2, TP2 x EP2 (ETP2), TP2 x EP2 x ETP1 the
  checkpoint loads through megatron-core (resharding experts over EP ranks) and its fp32 logits match
  transformers within ATOL; each checkpoint is re-saved from TP2 x EP2; the verifier passes the good
  checkpoint and fails the swapped one at EP2 x PP2.
``export-resaved``: the re-saved checkpoints export bit-exact to the original HF files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.distributed.workers.common import rank_print  # noqa: E402
from tests.distributed.workers.conversion_layouts import logits_at_layout  # noqa: E402
from tests.distributed.workers.conversion_single import (assert_bit_exact, hf_logits, hf_tensors,  # noqa: E402
                                                         megatron_tp1_logits, tokens_for)

# Same weights in fp32; routing reproduces HF's up to the order of softmax and top-k, and sharded sums
# add in another order (measured <= 3e-6 at every layout).
ATOL = 2e-5
CASES = {"qwen3_moe": {}, "qwen2_moe": {"mlp_only_layers": [1]}, "mixtral": {}}
# (tp, pp, ep, etp)
LAYOUTS = [(1, 1, 2, 1), (1, 1, 4, 1), (1, 2, 2, 1), (2, 1, 2, 2), (2, 1, 2, 1)]
RESAVE_FROM = (2, 1, 2, 2)
VERIFY_AT = (1, 2, 2, 1)


def layout_name(tp, pp, ep, etp) -> str:
    return f"tp{tp}_pp{pp}_ep{ep}_etp{etp}"


def swap_experts(hf: Path, out: Path) -> None:
    """A copy of ``hf`` whose layer-0 experts 0 and 1 trade places (every projection)."""
    from safetensors.torch import save_file

    from megatron_opsd.conversion.files import copy_tokenizer_files

    tensors = hf_tensors(hf)
    swapped = {}
    for name, tensor in tensors.items():
        for a, b in ((".experts.0.", ".experts.1."), (".experts.1.", ".experts.0.")):
            if name.startswith("model.layers.0.") and a in name:
                name = name.replace(a, b)
                break
        swapped[name] = tensor
    assert swapped.keys() == tensors.keys()
    out.mkdir(parents=True)
    save_file(swapped, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((hf / "config.json").read_text())
    copy_tokenizer_files(hf, out)


def convert(work: Path) -> None:
    from megatron_opsd.conversion.cli import hf_to_megatron_main, megatron_to_hf_main
    from megatron_opsd.models.description import ModelConfig
    from tests.hf_fixtures import save_hf_model

    for family, overrides in CASES.items():
        hf, meg, back = work / "hf" / family, work / "meg" / family, work / "back" / family
        save_hf_model(family, hf, **overrides)
        hf_to_megatron_main(["--hf-dir", str(hf), "--out", str(meg)])
        cfg = ModelConfig.from_hf(hf)
        tokens = tokens_for(cfg.vocab_size)
        reference = hf_logits(hf, tokens)
        err = (megatron_tp1_logits(meg, tokens) - reference).abs().max().item()
        assert err <= ATOL, f"{family}: TP1 logits differ from HF by {err}"
        megatron_to_hf_main(["--megatron-dir", str(meg), "--out", str(back), "--max-shard-size", "60KB"])
        count = assert_bit_exact(hf, back, family, tied=cfg.tie_word_embeddings)
        assert any(".experts.3." in n for n in hf_tensors(back)), f"{family}: experts missing from the export"
        assert torch.equal(hf_logits(back, tokens), reference), f"{family}: exported model's logits differ"
        print(f"{family:<9} hf->megatron->hf bit-exact ({count} tensors); TP1 max|dlogit| vs HF={err:.2e}",
              flush=True)
        swap_experts(hf, work / "hf_swapped" / family)
        hf_to_megatron_main(["--hf-dir", str(work / "hf_swapped" / family),
                             "--out", str(work / "meg_swapped" / family)])
    print("moe convert: all checks passed", flush=True)


def layouts(work: Path) -> None:
    from megatron_opsd.checkpoint import read_model_json
    from megatron_opsd.conversion.verify import verify
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    cases = {}
    for family in CASES:
        cfg = read_model_json(work / "meg" / family)
        tokens = tokens_for(cfg.vocab_size)
        cases[family] = (cfg, tokens, hf_logits(work / "hf" / family, tokens))
    for layout in LAYOUTS:
        tp, pp, ep, etp = layout
        name = layout_name(*layout)
        runtime = init_parallel(ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp), seed=17)
        for family, (cfg, tokens, reference) in cases.items():
            save_to = work / "resaved" / family if layout == RESAVE_FROM else None
            logits = logits_at_layout(cfg, work / "meg" / family, tokens, runtime, save_to=save_to)
            err = (logits - reference).abs().max().item()
            assert err <= ATOL, f"{family} {name}: max|dlogit| vs HF {err:.3e} > {ATOL}"
            rank_print(f"{family:<9} {name:<16} max|dlogit| vs HF={err:.2e}")
        runtime.destroy()
    tp, pp, ep, etp = VERIFY_AT
    for family in CASES:
        hf = work / "hf" / family
        _, good = verify(hf, work / "meg" / family, tp=tp, pp=pp, ep=ep, etp=etp, atol=ATOL, seq_len=48,
                         log=rank_print)
        bad_cmp, bad = verify(hf, work / "meg_swapped" / family, tp=tp, pp=pp, ep=ep, etp=etp, atol=ATOL,
                              seq_len=48, log=rank_print)
        assert good and not bad, f"{family}: verifier good={good} swapped={bad}"
        rank_print(f"{family:<9} verifier at {layout_name(*VERIFY_AT)}: passes, swapped expert caught "
                   f"(max|dlogit|={bad_cmp.max_abs_diff:.2e})")
    rank_print("moe layouts: all checks passed")


def export_resaved(work: Path) -> None:
    from megatron_opsd.conversion.cli import megatron_to_hf_main
    from megatron_opsd.models.description import ModelConfig

    for family in CASES:
        out = work / "resaved_hf" / family
        megatron_to_hf_main(["--megatron-dir", str(work / "resaved" / family), "--out", str(out), "--no-tokenizer"])
        count = assert_bit_exact(work / "hf" / family, out, family,
                                 tied=ModelConfig.from_hf(work / "hf" / family).tie_word_embeddings)
        print(f"{family:<9} saved at {layout_name(*RESAVE_FROM)} -> HF bit-exact ({count} tensors)", flush=True)
    print("moe export-resaved: all checks passed", flush=True)


def main() -> None:
    command, work = sys.argv[1], Path(sys.argv[2])
    {"convert": convert, "layouts": layouts, "export-resaved": export_resaved}[command](work)


if __name__ == "__main__":
    main()
