"""Multi-process test harness: launch a worker script under torchrun (gloo on CPU).

A launch costs seconds (interpreter start plus ``import megatron.core`` in every process), so a
worker script runs many checks per launch and asserts itself; a non-zero exit fails the test with
the workers' output attached.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_cmd(script: str | Path, nprocs: int, *args: str, nnodes: int = 1, node_rank: int = 0,
                 port: int | None = None) -> list[str]:
    """The torchrun command line for ``script`` with ``nprocs`` processes per node."""
    port = port or free_port()
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nprocs}",
        "--master_addr=127.0.0.1", f"--master_port={port}",
        str(script), *map(str, args),
    ]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this one's, without the rendezvous variables that an
    in-process runtime (tests/unit's ``runtime`` fixture) leaves in ``os.environ`` (a child reusing its
    MASTER_PORT fails with EADDRINUSE while that runtime lives); ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    if extra:
        env.update(extra)
    return env


def run_torchrun(script: str | Path, nprocs: int, *args: str, timeout: float = 900,
                 env: dict[str, str] | None = None) -> str:
    """Run ``script`` under torchrun; return its output, or fail with the output on a non-zero exit."""
    proc = subprocess.run(
        torchrun_cmd(script, nprocs, *args), cwd=REPO_ROOT, env=worker_env(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {Path(script).name} {' '.join(map(str, args))} (nprocs={nprocs}) "
            f"exited {proc.returncode}:\n{proc.stdout[-20000:]}"
        )
    return proc.stdout
