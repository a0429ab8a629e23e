"""The spool's names, shared by the daemon that moves files through it and whoever lists it.

One folder per state under ``paths.queue`` (daemon/inbox.py moves the files; docs/DAEMON.md)::

    waiting -> processing -> done | failed

A data file is a ``.jsonl`` file, or a ``.json`` file (a JSON array of records, or JSON Lines);
names that copy tools use while writing are never taken.
"""

from __future__ import annotations

from pathlib import Path

WAITING, PROCESSING, DONE, FAILED = "waiting", "processing", "done", "failed"
SPOOL_STATES = (WAITING, PROCESSING, DONE, FAILED)
DATA_SUFFIXES = (".jsonl", ".json")
TEMP_SUFFIXES = (".tmp", ".part", "~")
REPORT_SUFFIX = ".report.json"  # the trainer's report, under status/reports and copied beside a done file


def is_temporary(name: str) -> bool:
    """Names that copy tools use while writing: never taken."""
    return name.startswith(".") or name.endswith(TEMP_SUFFIXES)


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_SUFFIXES)


def newest_first(folder: Path) -> list[Path]:
    """The data files of a spool folder (``queue/done``: what was trained), newest first; [] when none."""
    try:
        found = [p for p in Path(folder).iterdir() if p.is_file() and is_data_file(p.name)]
    except OSError:
        return []
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
