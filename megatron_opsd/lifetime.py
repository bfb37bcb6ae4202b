"""Processes die with their parent (Linux).

megatron-core's dist_checkpointing forks writer processes during a save (and starts a
multiprocessing manager for their results: spawned on GPU, forked on CPU, see
``cpu_compat._patch_checkpoint_results_queue``); a forked child inherits the trainer's SIGTERM/SIGINT
handlers (which only set a flag), so after ``kill -9`` of the trainer these lived on as orphans
holding the trainer's memory. ``die_with_parent`` makes every process forked afterwards get SIGKILL
when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and restores the default signal handlers in it.
A *spawned* multiprocessing child re-imports the parent's main module as ``__mp_main__``;
``megatron_opsd.train`` then calls ``die_with_parent(self_too=True)``. With ``self_too`` (workers
started by torchrun) the calling process itself also dies with its parent, the launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_installed = False


def _set_parent_death_signal(expected_parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != expected_parent:  # the parent died before prctl took effect
        os._exit(1)


def _after_fork_in_child(parent: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    _set_parent_death_signal(parent)


def die_with_parent(*, self_too: bool = False) -> None:
    global _installed
    if not sys.platform.startswith("linux"):
        return
    if self_too:
        _set_parent_death_signal(os.getppid())
    if not _installed:
        parent = [os.getpid()]
        os.register_at_fork(before=lambda: parent.__setitem__(0, os.getpid()),
                            after_in_child=lambda: _after_fork_in_child(parent[0]))
        _installed = True
