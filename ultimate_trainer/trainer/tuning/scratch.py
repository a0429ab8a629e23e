"""The search's scratch folder: ``<paths.work>/tune/<pid>-<process start time>/``, removed afterwards.

Everything a search writes while it runs (the token store of the files, the replay and rehearsal
draws, each candidate's Trainer folder) lives there; nothing goes to ``checkpoints/``, ``status/``
or ``queue/``. The folder's name says which process owns it, so a search that starts later removes
the folders of searches that died without cleaning up (a SIGKILL, a power cut) and leaves those of
searches still running alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d+)-(\d+)$")


def _started(pid: int) -> int | None:
    """The process's start time (whole ms since the epoch), or None when no such process runs."""
    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def owner_alive(name: str) -> bool:
    """Whether the process that made the folder ``name`` still runs (the same process, not a reused pid)."""
    m = _NAME.match(name)
    if not m:
        return True  # not ours: never removed
    started = _started(int(m.group(1)))
    return started is not None and abs(started - int(m.group(2))) <= 1


def sweep(tune_dir: Path) -> list[Path]:
    """Remove the scratch folders of searches that are no longer running; returns them."""
    removed = []
    if not tune_dir.is_dir():
        return removed
    for p in sorted(tune_dir.iterdir()):
        if p.is_dir() and not owner_alive(p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.info("removed the scratch folder of a search that did not finish: %s", p)
    return removed


def create(work_dir: Path) -> Path:
    """This process's scratch folder (stale ones swept first)."""
    tune_dir = work_dir / "tune"
    sweep(tune_dir)
    path = tune_dir / f"{os.getpid()}-{_started(os.getpid())}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.parent.rmdir()  # the tune/ folder too, when no other search uses it
    except OSError:
        pass
