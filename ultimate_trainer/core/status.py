"""The files in ``status/``: the only contract between the trainer, the daemon and the monitors.

Each file has exactly one writer (see docs/STATUS.md for the schema of every file):

==========================  ==================  ===========================================
file                        writer              what
==========================  ==================  ===========================================
training_status.json        train.py            the live state of the current/last run
daemon_status.json          daemon.py           queue, throughput, ETA, consolidation, disk
consolidation_status.json   consolidation child the merge under way (stage, progress, ETA) or the last one
memory_status.json          memory_stats_api    latest RAM/GPU sample and OOM risk
history/steps.jsonl         train.py            one line per logged optimizer step (append)
history/evals.jsonl         train.py            one line per evaluation (append)
history/examples.jsonl      train.py            one line per scored held-out answer (append)
history/anomalies.jsonl     train.py            one line per step the divergence guard skipped (append)
history/guard_window.json   train.py            the guard's last accepted steps, judged from by the next run
history/memory.jsonl        memory_stats_api    one RAM/GPU sample every 30 s (append)
reports/<file>.report.json  train.py            per input file: counts and bad lines
==========================  ==================  ===========================================

No file holds a non-finite number: JSON has no NaN or Infinity, and a browser's ``JSON.parse``
rejects the whole document for one of them. Writers pass every value through :func:`finite`
(a non-finite float becomes ``null``) and ``allow_nan=False``; readers (:func:`loads`) read the
``NaN``/``Infinity`` of files written before this rule as ``null``.

JSON files are replaced atomically (temp file beside the target, fsync, ``os.replace``), so a reader
sees the old or the new file, never half of one. History files are append-only JSONL; a process
killed mid-write can leave a last line without a newline, which readers skip.

This module must stay light: the web servers import it, and they never import torch or training code.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Iterator

from ultimate_trainer.core.spool import REPORT_SUFFIX

SCHEMA_VERSION = 1

TRAINING_STATUS = "training_status.json"
DAEMON_STATUS = "daemon_status.json"
CONSOLIDATION_STATUS = "consolidation_status.json"
MEMORY_STATUS = "memory_status.json"
STEPS_HISTORY = "history/steps.jsonl"
EVALS_HISTORY = "history/evals.jsonl"
EXAMPLES_HISTORY = "history/examples.jsonl"
ANOMALIES_HISTORY = "history/anomalies.jsonl"
PROBE_HISTORY = "history/probe.jsonl"
PROBE_BASELINE = "history/probe_baseline.json"
CONTROLLER_HISTORY = "history/controller.jsonl"  # the retention-aware controller's decisions
GUARD_WINDOW = "history/guard_window.json"  # the divergence guard's accepted steps, for the next run
REPORTS_DIR = "reports"

TRAINING_STATES = ("idle", "loading", "tokenizing", "training", "evaluating", "saving", "error")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix.

    ``mode``: the file's permission bits (default: the temp file's, owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-Infinity) replaced by None, in nested dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(data: Any, **kw: Any) -> str:
    """Strict JSON (``allow_nan=False``) of ``data`` made :func:`finite`; other types as ``str``."""
    return json.dumps(finite(data), allow_nan=False, ensure_ascii=False, default=str, **kw)


def _no_constant(name: str) -> None:
    return None  # NaN, Infinity, -Infinity in an old file: unknown


def loads(text: str | bytes) -> Any:
    """JSON, with the non-standard ``NaN``/``Infinity`` of old files read as None."""
    return json.loads(text, parse_constant=_no_constant)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, empty, half-written or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def append_jsonl(path: str | Path, record: dict[str, Any], *, fsync: bool = False) -> None:
    """Append one record as one line. A torn last line (process killed mid-write) is repaired first.

    ``fsync=True`` also survives a power cut (the daemon's journal); history lines don't need it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = dumps(record) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode("utf-8"))
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every complete, parseable object line of ``path``; torn or corrupt lines are skipped."""
    try:
        f = open(path, "rb")
    except OSError:
        return
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def tail_jsonl(path: str | Path, n: int) -> list[dict[str, Any]]:
    """The last ``n`` records of ``path`` (reads the whole file; history files are small per line)."""
    return list(deque(iter_jsonl(path), maxlen=n)) if n > 0 else []


def count_lines(path: str | Path) -> int:
    """How many records ``path`` holds (0 when it does not exist)."""
    return sum(1 for _ in iter_jsonl(path))


def report_path(status_dir: str | Path, input_file: str | Path) -> Path:
    """Where train.py writes the report of ``input_file``: ``reports/<name>.report.json``."""
    return Path(status_dir) / REPORTS_DIR / f"{Path(input_file).name}{REPORT_SUFFIX}"


def bad_entry_text(file_name: str, entry: dict[str, Any]) -> str:
    """One ``bad`` entry of a report as ``name:3: reason`` (a JSONL line) or ``name:item 3: reason`` (an
    item of a JSON array file)."""
    where = f"item {entry.get('item')}" if "item" in entry else str(entry.get("line"))
    return f"{file_name}:{where}: {entry.get('reason')}"


def pid_alive(pid: Any) -> bool:
    """True when ``pid`` names a running process (used to tell a stale status file from a live one)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

