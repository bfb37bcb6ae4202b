"""TEST ONLY: ``megatron_opsd.train`` with the test-only context-parallel attention (tests/cp_attention.py),
so a CP run can be launched on CPU. usage: torchrun ... tests/e2e/cp_train.py --config ... (train's options)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_opsd import train  # noqa: E402
from tests.cp_attention import use_cp_test_attention  # noqa: E402

if __name__ == "__main__":
    use_cp_test_attention()
    sys.exit(train.main())
