"""The daemon's journal: an append-only JSONL log of what happened to every file and every run.

The spool folders (``queue/waiting``, ``processing``, ``done``, ``failed``) say where a file *is*;
the journal says what is *known* about it: its content hash, when it arrived, which run it belongs
to, how it ended. Every state change is journalled before (or, for intake, right after) the rename
that performs it, so replaying the journal against the folders after a crash (kill -9 anywhere,
even between a rename and its journal line) tells the daemon exactly what to finish.

Events (one JSON object per line, ``event`` names it, ``time`` is when):

==============  ===========================================================================
event           fields
==============  ===========================================================================
started         pid                          (a daemon started)
queued          name, sha256, size, lines, arrived_at, source   (a file entered queue/waiting; lines
                since the run manifest, core/manifest.py)
duplicate       name, of                     (byte-identical to ``of``; put in done/, not trained)
batch           batch, files, attempt        (these files form run ``batch``; open until ended)
launch          batch, pid, attempt          (train.py started for the batch)
crash           batch, attempt, code, reason (train.py failed; the batch stays open)
done            batch, files, global_step, seconds, bytes, examples   (run finished; ends it)
failed          name, reason                 (file goes to queue/failed/)
requeue         batch, files, solo           (run ended unfinished; its files go back to waiting)
missing         name                         (a queued file vanished from the spool)
consolidated    path, global_step, source_checkpoint
==============  ===========================================================================

Lines are fsynced: the journal must survive a power cut as well as a killed process. A torn last
line (killed mid-write) is skipped by the reader and repaired by the next append.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.core.status import append_jsonl, iter_jsonl
from ultimate_trainer.core.times import now_iso

log = logging.getLogger(__name__)

@dataclass
class FileRecord:
    name: str
    sha256: str
    size: int
    arrived_at: str
    state: str = "queued"  # queued (waiting or processing: the folder tells) | done | failed | duplicate | missing
    reason: str | None = None
    finished_at: str | None = None
    global_step: int | None = None
    examples: int | None = None
    solo: bool = False  # split out of a batch that kept crashing: train it alone
    lines: int | None = None  # None in a journal written before the run manifest (core/manifest.py)


@dataclass
class BatchRecord:
    batch: str
    files: list[str]
    attempt: int = 1
    started_at: str = ""
    pid: int | None = None
    ended: bool = False
    crashes: int = 0


@dataclass
class RunRecord:
    """A finished run, for the throughput window."""

    finished_at: float
    seconds: float
    bytes: int
    examples: int


@dataclass
class JournalState:
    files: dict[str, FileRecord] = field(default_factory=dict)
    batches: dict[str, BatchRecord] = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)
    first_started: str | None = None
    done_since_consolidation: list[str] = field(default_factory=list)

    @property
    def open_batch(self) -> BatchRecord | None:
        for b in self.batches.values():
            if not b.ended:
                return b
        return None

    def trained_hashes(self) -> dict[str, str]:
        """sha256 -> name of every file that was trained or is queued to be (failed ones may be retried)."""
        return {r.sha256: r.name for r in self.files.values() if r.state in ("queued", "done")}


class Journal:
    """Append events; replay them into a JournalState."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state = JournalState()
        for rec in iter_jsonl(self.path):
            self._apply(rec)

    def append(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "time": now_iso(), **fields}
        append_jsonl(self.path, rec, fsync=True)
        self._apply(rec)

    # ------------------------------------------------------------------ replay
    def _apply(self, rec: dict[str, Any]) -> None:
        s = self.state
        ev = rec.get("event")
        try:
            if ev == "started":
                s.first_started = s.first_started or rec.get("time")
            elif ev == "queued":
                lines = rec.get("lines")
                s.files[rec["name"]] = FileRecord(rec["name"], rec["sha256"], int(rec["size"]),
                                                  rec.get("arrived_at") or rec["time"],
                                                  lines=lines if isinstance(lines, int) else None)
            elif ev == "duplicate":
                r = s.files.get(rec["name"])
                if r:
                    r.state, r.reason, r.finished_at = "duplicate", f"byte-identical to {rec.get('of')}", rec["time"]
            elif ev == "batch":
                s.batches[rec["batch"]] = BatchRecord(rec["batch"], list(rec["files"]), int(rec.get("attempt", 1)), rec["time"])
            elif ev == "launch":
                b = s.batches.get(rec["batch"])
                if b:
                    b.pid, b.attempt = rec.get("pid"), int(rec.get("attempt", b.attempt))
            elif ev == "crash":
                b = s.batches.get(rec["batch"])
                if b:
                    b.crashes += 1
            elif ev == "done":
                b = s.batches.get(rec["batch"])
                if b:
                    b.ended = True
                for item in rec.get("files", []):
                    r = s.files.get(item["name"])
                    if r:
                        r.state, r.finished_at = "done", rec["time"]
                        r.global_step, r.examples = rec.get("global_step"), item.get("examples")
                        s.done_since_consolidation.append(r.name)
                s.runs.append(RunRecord(float(rec.get("finished_ts", 0.0)), float(rec.get("seconds", 0.0)),
                                        int(rec.get("bytes", 0)), int(rec.get("examples") or 0)))
            elif ev == "failed":
                r = s.files.get(rec["name"])
                if r:
                    r.state, r.reason, r.finished_at = "failed", rec.get("reason"), rec["time"]
            elif ev == "requeue":
                b = s.batches.get(rec["batch"])
                if b:
                    b.ended = True
                for name in rec.get("files", []):
                    r = s.files.get(name)
                    if r and rec.get("solo"):
                        r.solo = True
            elif ev == "missing":
                r = s.files.get(rec["name"])
                if r:
                    r.state = "missing"
            elif ev == "consolidated":
                s.done_since_consolidation = []
        except (KeyError, TypeError, ValueError) as e:
            # A hand-edited or foreign line must not stop the daemon: skip it, say where.
            log.warning("%s: skipping journal line %r (%s)", self.path, rec, e)
