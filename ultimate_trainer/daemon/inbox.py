"""The spool: inbox flattening, stable-file intake, and the moves through ``queue/``.

A file's life, one folder per state (Maildir style: a state change is a rename, a file is never
modified after it is moved, nothing is ever deleted)::

    inbox/**/x.jsonl  -> inbox/x.jsonl          flattened (name collisions get _1, _2, ...)
                      -> queue/waiting/x.jsonl  taken once complete (journal: queued + sha256)
                      -> queue/processing/      while a training run holds it
                      -> queue/done/            with x.jsonl.report.json (the trainer's report)
                       | queue/failed/          beside x.jsonl.error.txt (why)

Names are unique across the whole spool, so the trainer's per-name report never collides.
Taken: ``.jsonl`` files, and ``.json`` files that hold a JSON array of records (``[{...}, ...]``,
complete once it ends with ``]``) or JSON Lines (the first line is a whole object). Symlinks are never
followed; they, other files, other ``.json`` files and files still being written (a last line without
a newline, an array without its ``]``) are reported once and left where they are.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ultimate_trainer.core.manifest import digest
from ultimate_trainer.core.spool import DONE, FAILED, PROCESSING, REPORT_SUFFIX, SPOOL_STATES, WAITING, \
    is_data_file, is_temporary
from ultimate_trainer.daemon.journal import Journal
from ultimate_trainer.core.status import atomic_write_text, report_path
from ultimate_trainer.core.times import now_iso

log = logging.getLogger(__name__)

_FIRST_LINE_MAX = 1 << 20


def json_file_problem(path: Path) -> str | None:
    """Why a ``.json`` file is not (yet) taken, or None: an array must be closed, JSON Lines complete."""
    with open(path, "rb") as f:
        head = f.read(_FIRST_LINE_MAX).removeprefix(b"\xef\xbb\xbf").lstrip()
        if not head:
            return None  # empty: taken, and reported as such by the trainer
        if head[:1] == b"[":
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            return None if f.read().rstrip()[-1:] == b"]" else "JSON array not closed with ] (still being written?)"
    if head[:1] == b"{":
        first = head.split(b"\n", 1)[0]
        try:
            if isinstance(json.loads(first), dict):
                return None if ends_with_newline(path) else "last line has no newline (still being written?)"
        except ValueError:
            pass
    return ("a .json file must hold a JSON array of records ([{...}, ...]) or one JSON object per line; "
            f"this one starts with {head[:12].decode('utf-8', 'replace')!r}")


def ends_with_newline(path: Path) -> bool:
    """False when the last line is unterminated (a writer may still be appending). Empty files pass."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def unique_name(name: str, taken: Callable[[str], bool]) -> str:
    """``name`` or ``stem_1.jsonl``, ``stem_2.jsonl``, ... : the first that ``taken`` refuses."""
    if not taken(name):
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    i = 1
    while True:
        cand = f"{stem}_{i}.{ext}" if dot else f"{stem}_{i}"
        if not taken(cand):
            return cand
        i += 1


def move_no_overwrite(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; refuse to replace anything; copy+fsync+rename across filesystems."""
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst}: already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:  # queue/ on another filesystem than inbox/
            raise
    tmp = dst.with_name(f".{dst.name}.part")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.rename(tmp, dst)
    os.unlink(src)


class StabilityTracker:
    """Says when a file has kept the same size and mtime for ``stable_seconds``.

    Keyed by inode, so a file flattened from a subfolder to the inbox root keeps its history.
    ``clock`` is injectable so tests step time instead of sleeping.
    """

    def __init__(self, stable_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.stable_seconds = stable_seconds
        self.clock = clock
        self._seen: dict[tuple[int, int], tuple[int, int, float]] = {}

    def is_stable(self, st: os.stat_result) -> bool:
        key, sig, now = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns), self.clock()
        prev = self._seen.get(key)
        if prev is None or prev[:2] != sig:
            self._seen[key] = (*sig, now)
            return self.stable_seconds <= 0
        return now - prev[2] >= self.stable_seconds

    def forget_missing(self, alive: set[tuple[int, int]]) -> None:
        for k in list(self._seen):
            if k not in alive:
                del self._seen[k]


@dataclass
class ScanResult:
    ready: list[Path] = field(default_factory=list)       # complete data files at the inbox root
    pending: list[Path] = field(default_factory=list)     # still changing (or not yet watched long enough)
    incomplete: list[Path] = field(default_factory=list)  # stable, but the last line has no newline
    ignored: list[Path] = field(default_factory=list)     # symlinks, other files, .json that is no array


class Inbox:
    """Scans ``inbox/``: flattens JSONL files found at any depth, reports what it leaves alone."""

    def __init__(self, root: Path, stable_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.root = Path(root)
        self.tracker = StabilityTracker(stable_seconds, clock)
        self.clock = clock
        self._reported: set[str] = set()

    def _report_once(self, path: Path, why: str) -> None:
        key = f"{path}|{why}"
        if key not in self._reported:
            self._reported.add(key)
            log.warning("%s: %s; left alone", path, why)

    def scan(self) -> ScanResult:
        res = ScanResult()
        self.root.mkdir(parents=True, exist_ok=True)
        alive: set[tuple[int, int]] = set()
        subdirs: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            d = Path(dirpath)
            for dn in list(dirnames):
                p = d / dn
                if p.is_symlink():
                    self._report_once(p, "symlink (never followed out of the inbox)")
                    res.ignored.append(p)
                    dirnames.remove(dn)
                elif dn.startswith("."):
                    dirnames.remove(dn)  # a tool's hidden working folder: not ours
                else:
                    subdirs.append(p)
            for fn in sorted(filenames):
                p = d / fn
                if is_temporary(fn) or (d == self.root and fn == ".gitkeep"):
                    continue
                try:
                    st = p.lstat()
                except OSError:
                    continue  # vanished between listing and stat
                if p.is_symlink():
                    self._report_once(p, "symlink (never followed out of the inbox)")
                    res.ignored.append(p)
                    continue
                if not is_data_file(fn):
                    self._report_once(p, "not a .jsonl or .json file")
                    res.ignored.append(p)
                    continue
                alive.add((st.st_dev, st.st_ino))
                if not self.tracker.is_stable(st):
                    res.pending.append(p)
                    continue
                try:
                    if fn.endswith(".json"):
                        problem = json_file_problem(p)
                    else:
                        problem = None if ends_with_newline(p) else "last line has no newline (still being written?)"
                except OSError as e:
                    self._report_once(p, f"unreadable ({e.strerror})")
                    continue
                if problem is not None:
                    self._report_once(p, problem)
                    (res.incomplete if "still being written" in problem else res.ignored).append(p)
                    continue
                if d != self.root:
                    dst = self.root / unique_name(fn, lambda n: (self.root / n).exists() or (self.root / n).is_symlink())
                    try:
                        move_no_overwrite(p, dst)
                    except OSError as e:
                        self._report_once(p, f"cannot move to the inbox root ({e})")
                        continue
                    log.info("flattened %s -> %s", p, dst.name)
                    p = dst
                res.ready.append(p)
        self.tracker.forget_missing(alive)
        self._remove_empty(subdirs)
        res.ready.sort(key=lambda p: (_mtime(p), p.name))
        return res

    def _remove_empty(self, subdirs: list[Path]) -> None:
        # Deepest first, and only once quiet, so a copy still creating the tree is not disturbed.
        for d in sorted(subdirs, key=lambda p: len(p.parts), reverse=True):
            try:
                if any(d.iterdir()):
                    continue
                if time.time() - d.stat().st_mtime < self.tracker.stable_seconds:
                    continue
                d.rmdir()
                log.info("removed emptied folder %s", d)
            except OSError:
                pass


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


class Spool:
    """``queue/{waiting,processing,done,failed}`` and the journal that tells their story."""

    def __init__(self, queue_dir: Path):
        self.dir = Path(queue_dir)
        for s in SPOOL_STATES:
            (self.dir / s).mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.dir / "journal.jsonl")

    def folder(self, state: str) -> Path:
        return self.dir / state

    def where(self, name: str) -> str | None:
        for s in SPOOL_STATES:
            if (self.dir / s / name).exists():
                return s
        return None

    def names_in(self, state: str) -> list[str]:
        d = self.dir / state
        return sorted(p.name for p in d.iterdir() if is_data_file(p.name) and not is_temporary(p.name) and p.is_file())

    def _taken(self, name: str) -> bool:
        return name in self.journal.state.files or self.where(name) is not None

    # ------------------------------------------------------------------ intake
    def take(self, path: Path, skip_duplicates: bool) -> str:
        """Move a complete inbox file into the spool; return its spool name. Journalled after the move."""
        name = unique_name(path.name, self._taken)
        arrived = now_iso()
        dst = self.folder(WAITING) / name
        move_no_overwrite(path, dst)
        entry = digest(dst)  # the one hash of this file: the run's manifest carries it from here on
        trained = self.journal.state.trained_hashes()
        self.journal.append("queued", name=name, sha256=entry.sha256, size=entry.size, lines=entry.lines,
                            arrived_at=arrived, source=str(path))
        log.info("queued %s (%d bytes)%s", name, entry.size, "" if name == path.name else f" from {path.name}")
        if skip_duplicates and entry.sha256 in trained:
            self.mark_duplicate(name, trained[entry.sha256])
        return name

    def mark_duplicate(self, name: str, of: str) -> None:
        self.journal.append("duplicate", name=name, of=of)
        self._finish_duplicate(name, of)

    def _finish_duplicate(self, name: str, of: str) -> None:
        note = self.folder(DONE) / f"{name}.duplicate.txt"
        if not note.exists():
            atomic_write_text(note, f"{name}: byte-identical to {of}; not trained again (daemon.skip_duplicates)\n")
        self._move_to(name, DONE)
        log.info("%s: duplicate of %s, not retrained", name, of)

    def _move_to(self, name: str, state: str) -> None:
        here = self.where(name)
        if here is None or here == state:
            return
        move_no_overwrite(self.folder(here) / name, self.folder(state) / name)

    # ------------------------------------------------------------------ transitions
    def start_batch(self, batch: str, names: list[str], attempt: int = 1) -> None:
        self.journal.append("batch", batch=batch, files=names, attempt=attempt)
        for n in names:
            self._move_to(n, PROCESSING)

    def finish_done(self, name: str, report: Path | None) -> None:
        """After the ``done`` event: the report is copied beside the file, then the file moves."""
        if report is not None and report.exists():
            dst = self.folder(DONE) / f"{name}{REPORT_SUFFIX}"
            if not dst.exists():
                atomic_write_text(dst, report.read_text(encoding="utf-8"))
        self._move_to(name, DONE)

    def fail(self, name: str, reason: str) -> None:
        self.journal.append("failed", name=name, reason=reason)
        self._finish_failed(name, reason)
        log.error("%s: failed: %s", name, reason)

    def _finish_failed(self, name: str, reason: str) -> None:
        note = self.folder(FAILED) / f"{name}.error.txt"
        if not note.exists():
            atomic_write_text(note, f"{name}: {reason}\n")
        self._move_to(name, FAILED)

    def requeue(self, batch: str, names: list[str], solo: bool = False) -> None:
        self.journal.append("requeue", batch=batch, files=names, solo=solo)
        for n in names:
            self._move_to(n, WAITING)

    # ------------------------------------------------------------------ crash recovery
    def reconcile(self, status_dir: Path | None = None) -> None:
        """Make the folders agree with the journal after any crash. Idempotent."""
        st = self.journal.state
        for state in (WAITING, PROCESSING):
            for name in self.names_in(state):
                if name not in st.files:  # moved, then killed before the journal line
                    entry = digest(self.folder(state) / name)
                    self.journal.append("queued", name=name, sha256=entry.sha256, size=entry.size, lines=entry.lines,
                                        arrived_at=now_iso(), source="recovered")
                    log.info("%s: recovered into the journal", name)
        for rec in list(st.files.values()):
            here = self.where(rec.name)
            if rec.state == "done" and here in (WAITING, PROCESSING):
                rep = report_path(status_dir, rec.name) if status_dir else None
                self.finish_done(rec.name, rep)
            elif rec.state == "failed" and here in (WAITING, PROCESSING):
                self._finish_failed(rec.name, rec.reason or "unknown")
            elif rec.state == "duplicate" and here in (WAITING, PROCESSING):
                self._finish_duplicate(rec.name, (rec.reason or "").removeprefix("byte-identical to "))
            elif rec.state == "queued" and here is None:
                log.error("%s: queued file vanished from %s (removed by hand?)", rec.name, self.dir)
                self.journal.append("missing", name=rec.name)
        ob = st.open_batch
        in_batch = set(ob.files) if ob else set()
        for name in self.names_in(PROCESSING):
            if name not in in_batch:
                self._move_to(name, WAITING)
        if ob:
            for name in ob.files:
                if self.where(name) == WAITING:
                    self._move_to(name, PROCESSING)
