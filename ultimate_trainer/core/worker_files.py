"""The files between the daemon and its trainer worker: one request per run, one result per run.

The worker (``python -m ultimate_trainer.trainer.worker --worker-dir DIR``) keeps the model loaded
and trains the runs the daemon asks for, one at a time::

    DIR/requests/<seq>.json   written by the daemon   {"seq", "files": [absolute paths], "next": [entries],
                                                       "manifest": core/manifest.py's JSON of the run}
    DIR/results/<seq>.json    written by the worker   {"seq", "code", "pid", "exiting", "why", "rss_mb", ...}

Both are written atomically (temp file, fsync, rename), each has one writer, and neither is
changed once in place. ``code`` is what ``train.py`` would have exited with for the same files
(core/exitcodes.py), so the daemon decides a run's outcome the same way for both. ``exiting`` says
the worker ends after this result (stopped, failed run, memory bound): the next run starts a new
one. A worker that dies without a result is reported by its exit status, as a killed ``train.py``.
``seq`` orders requests: names sort in the order they were made. ``next`` is a hint: the files of the
run queued after this one (as they were when it was written), which the worker may tokenize ahead
(trainer/prefetch.py); it may be wrong or empty. Each is a manifest entry (``{"path", "sha256",
"size", "lines"}``, from the daemon's journal, so the prefetch hashes nothing) or, from an older
daemon, a path alone. ``manifest`` describes ``files`` (hashes, sizes, lines)
and the replay sources; a request without one (an older daemon) gets it built by the worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.core.manifest import FileEntry, Manifest
from ultimate_trainer.core.status import atomic_write_json, read_json

REQUESTS, RESULTS = "requests", "results"


@dataclass
class Request:
    seq: str
    files: list[Path]
    next: list[FileEntry] = field(default_factory=list)  # sha256 "" when only the path is known
    manifest: Manifest | None = None


def new_seq() -> str:
    """A request name that sorts after every earlier one (nanoseconds since the epoch, zero-padded)."""
    return f"{time.time_ns():020d}"


def clear(worker_dir: Path) -> None:
    """Remove the requests and results of an earlier worker (only while none runs)."""
    for sub in (REQUESTS, RESULTS):
        folder = Path(worker_dir) / sub
        folder.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            f.unlink(missing_ok=True)


def _hint(f: FileEntry | Path | str) -> FileEntry:
    """A ``next`` file as an entry: a path alone has no hash yet (the prefetch child then makes one)."""
    if isinstance(f, FileEntry):
        return FileEntry(f.path.resolve(), f.sha256, f.size, f.lines)
    return FileEntry(Path(f).resolve(), "", 0, None)


def write_request(worker_dir: Path, run: Manifest | list[Path],
                  next_files: list[FileEntry] | list[Path] | None = None) -> Request:
    """A request for the run ``run`` describes: its manifest (the daemon's), or its files alone (the
    worker then builds the manifest, as ``train.py FILE ...`` does); ``next_files``, the hint."""
    manifest = run if isinstance(run, Manifest) else None
    files = manifest.paths if manifest is not None else list(run)  # type: ignore[arg-type]
    req = Request(new_seq(), [Path(f).resolve() for f in files], [_hint(f) for f in next_files or []], manifest)
    atomic_write_json(Path(worker_dir) / REQUESTS / f"{req.seq}.json",
                      {"seq": req.seq, "files": list(map(str, req.files)), "next": [e.to_json() for e in req.next],
                       **({"manifest": manifest.to_json()} if manifest is not None else {})})
    return req


def next_request(worker_dir: Path) -> Request | None:
    """The oldest request that has no result yet; None when there is none."""
    folder = Path(worker_dir) / REQUESTS
    done = Path(worker_dir) / RESULTS
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if (done / path.name).exists():
            continue
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            continue  # atomic writes make this a file from something else: ignore it
        hint, manifest = data.get("next"), data.get("manifest")
        return Request(str(data.get("seq") or path.stem), [Path(f) for f in data["files"]],
                       [_read_hint(h) for h in hint if isinstance(h, (str, dict))] if isinstance(hint, list) else [],
                       Manifest.from_json(manifest) if isinstance(manifest, dict) else None)
    return None


def _read_hint(h: str | dict[str, Any]) -> FileEntry:
    if isinstance(h, str):  # an older daemon's: the path alone
        return FileEntry(Path(h), "", 0, None)
    try:
        return FileEntry.from_json(h)
    except (KeyError, TypeError, ValueError):
        return FileEntry(Path(str(h.get("path", ""))), "", 0, None)


def write_result(worker_dir: Path, seq: str, **fields: Any) -> None:
    atomic_write_json(Path(worker_dir) / RESULTS / f"{seq}.json", {"seq": seq, **fields})


def read_result(worker_dir: Path, seq: str) -> dict[str, Any] | None:
    data = read_json(Path(worker_dir) / RESULTS / f"{seq}.json")
    return data if isinstance(data, dict) and isinstance(data.get("code"), int) else None
