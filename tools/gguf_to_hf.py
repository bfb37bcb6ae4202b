"""See `python tools/gguf_to_hf.py --help` and megatron_opsd/conversion/gguf_to_hf.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megatron_opsd.conversion.cli import gguf_to_hf_main, run

    run(gguf_to_hf_main)
