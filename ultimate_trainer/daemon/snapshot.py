"""``status/daemon_status.json``: what the daemon knows, in the shape the monitor page reads.

The schema is documented in docs/STATUS.md (section ``daemon_status.json``); fields may be added,
never renamed. Built from the journal, the spool folders, the trainer's reports and the daemon's
in-memory ``Snapshot`` (the loop's state, the only part of the daemon this module sees); it is a
view, never the source of truth (that is the journal + folders).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.daemon import schedule
from ultimate_trainer.core.checkpoints import list_consolidations, list_refused
from ultimate_trainer.core.records import FileReport, TrainingStatus
from ultimate_trainer.core.spool import PROCESSING, WAITING
from ultimate_trainer.core.status import (CONSOLIDATION_STATUS, SCHEMA_VERSION, TRAINING_STATUS, pid_alive, read_json,
                                          report_path)
from ultimate_trainer.core.times import iso, now_iso, parse_iso
from ultimate_trainer.core.config import Config
from ultimate_trainer.daemon.inbox import Spool

RECENT_DONE = 20
FAILED_SHOWN = 50


@dataclass
class Snapshot:
    """The daemon's in-memory state, as the loop updates it."""

    started_ts: float
    started_at: str
    state: str = "starting"
    last_error: str | None = None
    current: dict[str, Any] | None = None  # the run in progress: files, started_at, pid, attempt, batch
    pending_inbox: int = 0
    disk: dict[str, Any] = field(default_factory=dict)
    consolidation_running: bool = False
    monitors: dict[str, Any] = field(default_factory=dict)


def consolidation_history(consolidated_dir: Path) -> list[dict[str, Any]]:
    """Manifests of the complete consolidations, oldest first, each with its ``path``."""
    return [{**c.manifest, "path": str(c.path)} for c in list_consolidations(consolidated_dir.parent)]


def retention_since_original(hist: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the gate measured of the base in use: its probe retention since the original base, and the best."""
    measured = [(h, (h.get("gate") or {}).get("retention_since_original")) for h in hist]
    measured = [(h, r) for h, r in measured if isinstance(r, (int, float))]
    if not measured:
        return None
    return {"ratio": measured[-1][1], "global_step": measured[-1][0].get("global_step"),
            "best": max(r for _, r in measured), "consolidations": len(measured)}


def merge_progress(status_dir: Path) -> dict[str, Any] | None:
    """The running merge's ``progress`` (its consolidation_status.json, trainer/consolidation/merge.py), with
    its ``stage``; None when no merge child is running."""
    doc = read_json(status_dir / CONSOLIDATION_STATUS)
    if not doc or doc.get("state") != "running" or not pid_alive(doc.get("pid")):
        return None
    progress = doc.get("progress")
    return {**progress, "stage": doc.get("stage")} if isinstance(progress, dict) else None


def last_refused(cfg: Config) -> dict[str, Any] | None:
    """The newest candidate the consolidation gate refused: ``path``, ``global_step``, ``reason``, ``created_at``."""
    refused = list_refused(cfg.path("models"))
    if not refused:
        return None
    m = refused[-1].manifest
    return {"path": str(refused[-1].path), "global_step": m.get("global_step"),
            "reason": (m.get("gate") or {}).get("reason"), "created_at": m.get("created_at")}


def report_examples(status_dir: Path, name: str) -> int | None:
    """Usable examples of the file's report (core/records.py FileReport); None until it is read."""
    rep = FileReport.read(report_path(status_dir, name))
    return rep.examples if rep is not None and isinstance(rep.examples, int) else None


def build_status(snap: Snapshot, spool: Spool, cfg: Config, now_ts: float) -> dict[str, Any]:
    st = spool.journal.state
    status_dir = cfg.path("status")
    training = set(snap.current["files"]) if snap.current else set()
    queue = []
    for state in (PROCESSING, WAITING):
        for n in spool.names_in(state):
            rec = st.files.get(n)
            if rec is None or rec.state != "queued":
                continue
            queue.append({"name": n, "size_bytes": rec.size, "state": "training" if n in training else "waiting",
                          "arrived_at": rec.arrived_at, "examples": report_examples(status_dir, n)})
    queue.sort(key=lambda q: (q["state"] != "training", q["arrived_at"], q["name"]))
    qbytes = sum(q["size_bytes"] for q in queue)

    tp = schedule.throughput(st.runs, cfg.daemon.throughput_window_hours, now_ts)
    remaining = float(qbytes)
    if snap.current:
        ts = TrainingStatus.read(status_dir / TRAINING_STATUS)
        if ts is not None and ts.pid == snap.current["pid"] and ts.run_total_steps > 0:
            run_bytes = sum(q["size_bytes"] for q in queue if q["state"] == "training")
            remaining -= run_bytes * min(ts.run_step / ts.run_total_steps, 1.0)
    eta = schedule.queue_eta(remaining, tp["mb_per_hour"]) if queue else None
    eta_at = iso(dt.datetime.fromtimestamp(now_ts).astimezone() + dt.timedelta(seconds=eta)) if eta is not None else None

    done = sorted((r for r in st.files.values() if r.state == "done"), key=lambda r: r.finished_at or "")
    failed = sorted((r for r in st.files.values() if r.state == "failed"), key=lambda r: r.finished_at or "")

    hist = consolidation_history(cfg.path("models") / "consolidated")
    hour = cfg.daemon.consolidation_hour
    last_at = parse_iso(hist[-1].get("created_at")) if hist else None
    now_dt = dt.datetime.fromtimestamp(now_ts).astimezone()
    due = schedule.consolidation_due(hour, last_at, parse_iso(st.first_started), now_dt)
    current = None
    if snap.current:
        current = {k: snap.current[k] for k in ("files", "started_at", "pid", "attempt")}
        current["run"] = snap.current.get("batch")

    return {
        "schema_version": SCHEMA_VERSION,
        "state": snap.state,
        "pid": os.getpid(),
        "started_at": snap.started_at,
        "updated_at": now_iso(),
        "uptime_seconds": round(now_ts - snap.started_ts, 1),
        "queue": queue,
        "queue_files": len(queue),
        "queue_bytes": qbytes,
        "current_run": current,
        "throughput": tp,
        "queue_eta_seconds": None if eta is None else round(eta, 1),
        "queue_eta_at": eta_at,
        "done_files": len(done),
        "recent_done": [{"name": r.name, "finished_at": r.finished_at, "examples": r.examples,
                         "global_step": r.global_step} for r in done[-RECENT_DONE:]],
        "failed_files": len(failed),
        "failed": [{"name": r.name, "reason": r.reason, "failed_at": r.finished_at} for r in failed[-FAILED_SHOWN:]],
        "last_error": snap.last_error,
        "inbox_pending": snap.pending_inbox,
        "consolidation": {
            "enabled": hour is not None,
            "hour": hour,
            "last_at": iso(last_at),
            "last_path": hist[-1]["path"] if hist else None,
            "next_at": iso(schedule.next_consolidation(hour, due, now_dt)),
            "running": snap.consolidation_running,
            "progress": merge_progress(status_dir) if snap.consolidation_running else None,
            "history": [{"path": h["path"], "global_step": h.get("global_step"), "created_at": h.get("created_at")}
                        for h in hist[-RECENT_DONE:]],
            "last_refused": last_refused(cfg),
            "retention_since_original": retention_since_original(hist),
        },
        "disk": snap.disk,
        "monitors": snap.monitors,
    }
