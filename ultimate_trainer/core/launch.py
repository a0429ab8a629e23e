"""Starting a child process of ours, the one way: the package importable, and the child dies with its parent.

Every child (``train.py`` and the worker from the daemon, the consolidation, the torchrun agent,
the prefetch tokenizer) gets ``PYTHONPATH`` led by the repository, so ``python -m ultimate_trainer...``
works from wherever the parent runs, and ``PR_SET_PDEATHSIG``: the kernel sends it SIGTERM when its
parent dies, so no trainer outlives a killed daemon (it saves and exits, as for a stop).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Any

from ultimate_trainer.core.config import REPO_DIR

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux; elsewhere nothing).

    Called between fork and exec (``launch``), or first thing in a child whose parent has threads
    (the worker's prefetch child), where a ``preexec_fn`` is not safe.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment, ``PYTHONPATH`` led by the repository, plus ``extra``."""
    path = os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def launch(cmd: list[str], *, own_session: bool = True, pdeathsig: bool = True, env: dict[str, str] | None = None,
           **popen: Any) -> subprocess.Popen:
    """Start ``cmd`` as our child. ``own_session``: a terminal's Ctrl-C reaches the parent only, which
    forwards one SIGTERM. ``pdeathsig`` False for a parent with threads (the child calls ``die_with_parent``)."""
    return subprocess.Popen(cmd, env=env or child_env(), start_new_session=own_session,
                            preexec_fn=die_with_parent if pdeathsig else None, **popen)
