"""Sample responses from a checkpoint: see `python tools/generate.py --help` and megatron_opsd/rollout/cli.py.

    torchrun --nproc_per_node=4 tools/generate.py --load ckpt --prompts prompts.jsonl --out out.jsonl \
        --temperature 1.1 --top-p 0.95 --top-k 20 --tp 2 --pp 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # dist_checkpointing may re-import __main__ in a spawned process: keep the guard
    from megatron_opsd.conversion.cli import run
    from megatron_opsd.rollout.cli import main

    run(main)
