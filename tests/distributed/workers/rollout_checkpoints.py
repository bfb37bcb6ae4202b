"""Build the checkpoints tools/generate.py is tested on (one process, no torchrun).

usage: python rollout_checkpoints.py HF_DIR CONVERTED_DIR TRAINING_ROOT
  HF_DIR         the tiny HF llama (vocab 402, the fixture tokenizer's size) with its tokenizer
  CONVERTED_DIR  tools/convert_hf_to_megatron.py's output for it
  TRAINING_ROOT  a training-checkpoint root (step_0000003/ + latest) holding the same weights
"""

from __future__ import annotations

import sys

from rollout_common import tiny_hf_vocab  # noqa: F401  (sets sys.path)
from megatron_opsd.checkpoint import load_weights, read_model_json, save_training
from megatron_opsd.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_opsd.models.provider import build_model
from megatron_opsd.parallel import ParallelConfig, init_parallel
from tests.hf_fixtures import save_hf_model


def main() -> None:
    hf_dir, converted, training_root = sys.argv[1:4]
    save_hf_model("llama", hf_dir, vocab_size=tiny_hf_vocab())
    convert_hf_to_megatron(hf_dir, converted)
    cfg = read_model_json(converted)
    runtime = init_parallel(ParallelConfig(), seed=5)
    chunks = build_model(cfg, runtime)
    load_weights(chunks, converted)
    save_training(training_root, 3, chunks=chunks, optimizer=None, teacher_chunks=None, runtime=runtime,
                  model=cfg, common={}, keep_last=0)
    runtime.destroy()
    print("checkpoints written", flush=True)


if __name__ == "__main__":
    main()
