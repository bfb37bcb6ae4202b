"""What a process pays before it does any work on CPU: megatron-core as it is against ``cpu_compat``'s two
start-up fixes, each measured in fresh processes.

    python benchmarks/startup.py              # best of 3 fresh processes per cell
    python benchmarks/startup.py --repeats 5

Rows (wall seconds inside the process, best of ``--repeats``):
  import megatron-core   ``import megatron.core.models.gpt, megatron.core.optimizer,
                         megatron.core.dist_checkpointing`` after ``import torch``. As is: megatron-core's
                         import-time ``torch.compile`` decorations import dynamo and inductor. With the fix:
                         after ``import megatron_opsd`` (``cpu_compat.defer_megatron_compile``).
  first checkpoint save  megatron's ``dist_checkpointing.save`` of one 4 MiB tensor in a one-rank gloo world
                         (``init_parallel``, which applies the CPU patches), the process's first save. As is:
                         megatron's writer-result queue, a Manager started with "spawn" (megatron's own
                         function put back after the patches); with the fix: a forked Manager
                         (``cpu_compat._patch_checkpoint_results_queue``).
  second save            the same save again in the same process (the queue exists by then).
Every figure is one process's own clock; the machine is shared, so compare the columns of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT = """
    import json, sys, time
    import torch
    if FIXED:
        import megatron_opsd  # defers megatron-core's torch.compile calls
    start = time.perf_counter()
    import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.dist_checkpointing
    print(json.dumps({"import megatron-core": time.perf_counter() - start,
                      "dynamo imported": "torch._dynamo" in sys.modules}))
"""

SAVE = """
    import json, tempfile, time
    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    megatrons_queue = filesystem_async._get_write_results_queue
    from megatron_opsd.parallel import ParallelConfig, init_parallel
    runtime = init_parallel(ParallelConfig(), seed=0)  # applies the CPU patches
    if not FIXED:
        filesystem_async._get_write_results_queue = megatrons_queue
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    weight = torch.randn(1024, 1024)
    times = []
    for _ in range(2):
        state = {"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}
        start = time.perf_counter()
        dist_checkpointing.save(state, tempfile.mkdtemp())
        times.append(time.perf_counter() - start)
    print(json.dumps({"first checkpoint save": times[0], "second save": times[1]}))
    runtime.destroy()
"""


def measure(code: str, fixed: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29741"))
    proc = subprocess.run([sys.executable, "-c", f"FIXED = {fixed}\n" + textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"a measuring process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    best: dict[tuple[str, bool], float] = {}
    dynamo: dict[bool, bool] = {}
    for _ in range(args.repeats):
        for fixed in (False, True):  # alternating, so the machine's drift hits both columns alike
            for code in (IMPORT, SAVE):
                for name, value in measure(code, fixed).items():
                    if name == "dynamo imported":
                        dynamo[fixed] = value
                    else:
                        best[name, fixed] = min(best.get((name, fixed), float("inf")), value)
    print(f"Process start-up on CPU, best of {args.repeats} fresh processes per cell (wall s inside the process)\n")
    print("| measure | megatron-core as is | with cpu_compat's fixes | saved |\n|---|---|---|---|")
    for name in ("import megatron-core", "first checkpoint save", "second save"):
        before, after = best[name, False], best[name, True]
        print(f"| {name} | {before:.2f} | {after:.2f} | {before - after:.2f} |")
    print(f"\ntorch._dynamo imported by the megatron-core import: as is {dynamo[False]}, with the fix {dynamo[True]}")


if __name__ == "__main__":
    main()
