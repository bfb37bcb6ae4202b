"""Command lines of the conversion tools (``tools/*.py`` call these ``main`` functions)."""

from __future__ import annotations

import argparse
import sys
import warnings


def _dtype_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help=f"{what} dtype; auto keeps the source's")


def hf_to_megatron_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face checkpoint (Llama, Qwen2, Qwen3, Mistral; safetensors) to a "
                    "megatron-core distributed checkpoint that loads at any TP/PP/VPP layout.")
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--tp", type=int, default=1, help="intended tensor-parallel size (validated, recorded)")
    parser.add_argument("--pp", type=int, default=1, help="intended pipeline-parallel size (validated, recorded)")
    parser.add_argument("--vpp", type=int, default=None, help="intended virtual pipeline size")
    _dtype_arg(parser, "checkpoint")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="longest training sequence: refused if it exceeds a sliding window")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)

    from megatron_opsd.conversion.hf_to_megatron import convert_hf_to_megatron

    convert_hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, dtype=args.dtype,
                           max_seq_len=args.max_seq_len, force=args.force)
    return 0


def megatron_to_hf_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a megatron_opsd checkpoint (converted model or training checkpoint; a "
                    "directory with model.json) to a Hugging Face safetensors checkpoint.")
    parser.add_argument("--megatron-dir", required=True, help="dist checkpoint directory holding model.json")
    parser.add_argument("--out", required=True, help="output HF directory (must not exist or be empty)")
    _dtype_arg(parser, "exported")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file (e.g. 5GB, 500MB); above it: shards + index")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="take tokenizer files from here (default: the checkpoint's own, else the "
                             "tokenizer directory or base model named by the run's saved config)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="export weights and config only (an HF directory AutoTokenizer cannot load)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--adapter-only", action="store_true",
                        help="a LoRA run: write its adapters as a PEFT directory for the base model (default: "
                             "the merged model)")
    args = parser.parse_args(argv)

    from megatron_opsd.checkpoint_paths import resolve_weights
    from megatron_opsd.conversion.megatron_to_hf import convert_megatron_to_hf

    args.megatron_dir = str(resolve_weights(args.megatron_dir, "--megatron-dir"))

    convert_megatron_to_hf(args.megatron_dir, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                           tokenizer_dir=args.tokenizer_dir, with_tokenizer=not args.no_tokenizer,
                           force=args.force, adapter_only=args.adapter_only)
    return 0


def gguf_to_hf_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write an ordinary Hugging Face directory (safetensors, config.json, generation config, "
                    "tokenizer with its chat template) from a GGUF file of a supported family (Llama, "
                    "Qwen2, Qwen3, Mistral); quantized tensors are dequantized.")
    parser.add_argument("--gguf", required=True, help="the .gguf file (only read)")
    parser.add_argument("--out", required=True, help="output HF directory (must not exist or be empty)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights dtype; auto: fp16/bf16 when the GGUF stores its matrices so, else fp32")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    args = parser.parse_args(argv)

    from megatron_opsd.conversion.gguf_to_hf import convert_gguf_to_hf

    convert_gguf_to_hf(args.gguf, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare logits of an HF model and a converted megatron checkpoint on the same random "
                    "tokens (fp32; HF eager attention). Run under torchrun for TP/PP > 1. Exits 1 when "
                    "max |dlogit| exceeds --atol.")
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--megatron-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="max |dlogit| allowed (fp32: exact conversions differ by summation order only)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the metrics to this file (rank 0)")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from megatron_opsd.checkpoint_paths import resolve_weights
    from megatron_opsd.conversion.verify import verify, write_report

    args.megatron_dir = str(resolve_weights(args.megatron_dir, "--megatron-dir"))

    comparison, passed = verify(args.hf_dir, args.megatron_dir, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                                atol=args.atol,
                                batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    if args.json and dist.get_rank() == 0:
        write_report(args.json, comparison, passed, args.atol)
    return 0 if passed else 1


def run(main) -> None:
    """Entry point wrapper: errors in user input print one line instead of a traceback."""
    # megatron-core warns at import on every machine without TE/apex: noise above the one line.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        code = main()
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
