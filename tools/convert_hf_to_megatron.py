"""See `python tools/convert_hf_to_megatron.py --help` and megatron_opsd/conversion/."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # dist_checkpointing re-imports __main__ in a spawned process: keep the guard
    from megatron_opsd.conversion.cli import hf_to_megatron_main, run

    run(hf_to_megatron_main)
