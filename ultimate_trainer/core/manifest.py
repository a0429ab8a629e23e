"""A run's manifest: what it trains and what it may replay, described once, at the boundary, and handed down.

The daemon writes it from its journal into the worker's request (core/worker_files.py) or the
``--manifest`` file of a ``train.py`` child; ``train.py FILE ...`` run by hand builds it from the files
and ``queue/done``. Below that boundary nothing reads ``queue/`` and nothing hashes a run's file
again: the report's sha256, the prefetch cache key, the run id and the sizes of replay and
rehearsal all come from here.

JSON (``Manifest.to_json``)::

    {"files":  [{"path", "sha256", "size", "lines"}, ...],   the run's files, in the order given
     "replay": [{"path", "sha256", "size", "lines"}, ...]}   files trained before (queue/done), by name

``lines`` counts newline-ended lines and a last line without one (a JSON array file counts its
physical lines too); it is null for a replay source whose count nobody recorded (journals written
before the manifest existed): replay counts it then.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ultimate_trainer.core import status
from ultimate_trainer.core.config import Config
from ultimate_trainer.core.records import FileReport
from ultimate_trainer.core.spool import DONE, DATA_SUFFIXES

log = logging.getLogger(__name__)

# The settings that decide a run's example order: a change of any makes another run (another id).
DATA_ORDER_KEYS = ("batch_size", "gradient_accumulation_steps", "epochs_per_file", "seed", "max_seq_length")


@dataclass(frozen=True)
class FileEntry:
    path: Path
    sha256: str
    size: int
    lines: int | None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileEntry:
        lines = d.get("lines")
        return cls(Path(d["path"]), str(d["sha256"]), int(d["size"]), int(lines) if isinstance(lines, int) else None)


def digest(path: str | Path) -> FileEntry:
    """One streaming pass over ``path``: SHA-256 of its bytes, size, lines (a last line without newline counts)."""
    h, lines, size, last = hashlib.sha256(), 0, 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            lines += block.count(b"\n")
            size += len(block)
            last = block[-1:]
    return FileEntry(Path(path), h.hexdigest(), size, lines + (last != b"\n"))


@dataclass
class Manifest:
    files: list[FileEntry]
    replay: list[FileEntry] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]

    @property
    def sha256s(self) -> list[str]:
        return [f.sha256 for f in self.files]

    @property
    def lines(self) -> int:
        """Lines of the run's files in all: what its replay and rehearsal are sized by."""
        return sum(f.lines or 0 for f in self.files)

    def entry(self, path: str | Path) -> FileEntry | None:
        p = Path(path)
        return next((f for f in self.files if f.path == p), None)

    def to_json(self) -> dict[str, Any]:
        return {"files": [f.to_json() for f in self.files], "replay": [f.to_json() for f in self.replay]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        return cls([FileEntry.from_json(f) for f in d.get("files") or []],
                   [FileEntry.from_json(f) for f in d.get("replay") or []])

    def write(self, path: Path) -> Path:
        status.atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls.from_json(data)

    def run_id(self, cfg: Config, layout: str, step_scale: int) -> str:
        return run_id(self.sha256s, cfg, layout, step_scale)


def run_id(file_sha256s: list[str], cfg: Config, layout: str, step_scale: int) -> str:
    """Same files (by content) + same data-order settings = same run, so a crash can be continued.

    ``layout`` is data/packing.py's (grouped, rows, flat); ``step_scale`` > 1 when the ranks could not
    split the accumulation (trainer/distributed.py): each makes another plan, so another run.
    """
    key: dict[str, Any] = {"files": sorted(file_sha256s), **{k: getattr(cfg.training, k) for k in DATA_ORDER_KEYS}}
    if layout == "rows":
        key["packed"] = True  # rows, not examples, make a step: another plan
    elif layout == "flat":
        key["packed"] = "flat"  # the plan's own order, not length-grouped: another plan
    if step_scale != 1:
        key["step_scale"] = step_scale  # a step of world_size x the configured examples: another plan
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def done_sources(done_dir: Path, known: dict[str, tuple[str, int, int | None]] | None = None,
                 status_dir: Path | None = None) -> list[FileEntry]:
    """The replay sources: every data file in ``queue/done``, by name.

    ``known`` maps a name to the (sha256, size, lines) recorded for it (the daemon's journal); a file's
    report (``status/reports``) fills in what the journal lacks; only a file nothing describes (a
    journal from before the manifest, a file put there by hand) is hashed here.
    """
    out: list[FileEntry] = []
    try:
        names = sorted(p for p in Path(done_dir).iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    except OSError:
        return out
    for p in names:
        try:
            size_now = p.stat().st_size
            sha, size, lines = (known or {}).get(p.name, (None, None, None))
            if size != size_now:
                sha, lines = None, None
            if lines is None and status_dir is not None:
                rep = FileReport.read(status.report_path(status_dir, p.name))
                if rep is not None and rep.sha256 is not None and "lines" not in rep.missing and rep.unit == "line" \
                        and rep.size_bytes == size_now and "size_bytes" not in rep.missing \
                        and sha in (None, rep.sha256):
                    sha, lines = rep.sha256, rep.lines
            out.append(FileEntry(p, sha, size_now, lines) if sha and lines is not None else digest(p))
        except OSError as e:
            log.warning("replay: %s: cannot read (%s); left out", p.name, e.strerror or e)
    return out


def for_files(files: Iterable[Path], cfg: Config) -> Manifest:
    """The manifest of a run started by hand (``train.py FILE ...``): its files hashed here, once, and
    the daemon's ``queue/done`` (if any) as the replay sources. Unreadable files are left for ``prepare``
    to report."""
    entries = []
    for p in files:
        try:
            entries.append(digest(p))
        except OSError:
            entries.append(FileEntry(Path(p), "", 0, None))
    replay = done_sources(cfg.path("queue") / DONE, status_dir=cfg.path("status")) \
        if cfg.training.replay_fraction > 0 else []
    return Manifest(entries, replay)
