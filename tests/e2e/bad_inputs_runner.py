"""Runs many ``megatron_opsd.train`` command lines in one interpreter (tests/e2e/test_bad_inputs.py).

    python tests/e2e/bad_inputs_runner.py CASES.json RESULTS.json

Each case: ``{"name", "argv", "env"}``; its result: ``{"rc", "stdout", "stderr"}`` as a user would see
them from ``python -m megatron_opsd.train ARGV`` (an escaping exception is recorded as a traceback
with rc 1, like the interpreter would).
"""

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_opsd.train import main  # noqa: E402


def run_case(case: dict) -> dict:
    saved = {key: os.environ.get(key) for key in case["env"]}
    os.environ.update(case["env"])
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(case["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                rc = 1
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps({case["name"]: run_case(case) for case in cases}))
