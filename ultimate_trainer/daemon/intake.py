"""Intake: what the user dropped into ``inbox/`` becomes journalled files in the spool, then batches.

Owns the inbox scanner, the spool folders and their journal (``inbox.py``, ``journal.py``). The
daemon asks it to ``scan`` (take every complete file), to cut the next ``batch`` from the waiting
files, and how many files are still ``pending`` in the inbox (being copied).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from ultimate_trainer.core.config import DaemonConfig
from ultimate_trainer.core.manifest import FileEntry, Manifest, digest, done_sources
from ultimate_trainer.core.spool import DONE, PROCESSING, WAITING
from ultimate_trainer.daemon.inbox import Inbox, Spool
from ultimate_trainer.daemon.journal import BatchRecord, JournalState

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, inbox_dir: Path, queue_dir: Path, settings: DaemonConfig):
        self.d = settings
        self.inbox = Inbox(inbox_dir, settings.file_stable_seconds)
        self.spool = Spool(queue_dir)
        self.pending = 0  # files in the inbox not taken yet (still changing, or no final newline)

    @property
    def journal_state(self) -> JournalState:
        return self.spool.journal.state

    def scan(self) -> None:
        """Take every complete inbox file into ``queue/waiting`` (hashed, journalled)."""
        try:
            res = self.inbox.scan()
        except OSError as e:
            log.error("%s: cannot scan (%s)", self.inbox.root, e)
            return
        self.pending = len(res.pending)
        for p in res.ready:
            try:
                self.spool.take(p, self.d.skip_duplicates)
            except OSError as e:  # one unreadable file must not stop the others
                log.error("%s: cannot take (%s); left in the inbox", p, e)

    def has_waiting(self) -> bool:
        return bool(self.spool.names_in(WAITING))

    def batch(self) -> BatchRecord:
        """Open the next batch: the oldest waiting files, up to ``batch_max_files`` / ``batch_max_mb``.

        A file split out of a crashing batch (``solo``) is trained alone.
        """
        names = self.peek()
        batch = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.spool.start_batch(batch, names)
        return self.journal_state.batches[batch]

    def peek_entries(self) -> list[FileEntry]:
        """``peek``'s files in ``queue/waiting``, described from the journal (the worker's tokenize-ahead hint)."""
        st = self.journal_state
        return [FileEntry((self.spool.folder(WAITING) / n).resolve(), st.files[n].sha256, st.files[n].size,
                          st.files[n].lines) for n in self.peek()]

    def peek(self) -> list[str]:
        """The names ``batch()`` would take now, without taking them (the worker's tokenize-ahead hint)."""
        st = self.journal_state
        names: list[str] = []
        total = 0
        limit = self.d.batch_max_mb * 1e6
        waiting = sorted(self.spool.names_in(WAITING),
                         key=lambda n: (st.files[n].arrived_at, n) if n in st.files else ("", n))
        for n in waiting:
            rec = st.files.get(n)
            if rec is None or rec.state != "queued":
                continue
            if rec.solo:
                if names:
                    continue
                names = [n]
                break
            if names and (len(names) >= self.d.batch_max_files or total + rec.size > limit):
                break
            names.append(n)
            total += rec.size
        return names

    def manifest(self, names: list[str], status_dir: Path) -> Manifest:
        """The run of ``names`` (in ``queue/processing``), described from the journal: the trainer's manifest.

        Only a file the journal has no line count for (journalled before the manifest) is read again here.
        """
        st = self.journal_state
        files = []
        for n in names:
            rec, path = st.files[n], (self.spool.folder(PROCESSING) / n).resolve()
            files.append(FileEntry(path, rec.sha256, rec.size, rec.lines) if rec.lines is not None else digest(path))
        known = {r.name: (r.sha256, r.size, r.lines) for r in st.files.values()}
        return Manifest(files, done_sources(self.spool.folder(DONE), known, status_dir))
