"""``GET /api/state``: the status files merged into the one document the page polls.

Every input may be missing, empty or half-written (``status.read_json`` gives None): the page then
shows "waiting for the trainer" for that part instead of an error. Ages are computed here, against
this machine's clock, so a browser on another clock still sees the right "updated 3 s ago".
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ultimate_trainer.web import sampler as stats
from ultimate_trainer.core import status
from ultimate_trainer.core.records import FileReport, TrainingStatus
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.web.history import History
from ultimate_trainer.web.skills import SkillTracker
from ultimate_trainer.core.times import epoch_seconds

log = logging.getLogger(__name__)

MEMORY_STALE_SECONDS = 15.0  # memory_status.json older than this: the stats API is not running
MAX_REPORTS = 20             # newest file reports with problems shown on the page
MAX_BAD_LINES = 10           # bad lines shown per report
RECENT_EXAMPLES = 20


def _age(doc: dict[str, Any] | None, now: float) -> float | None:
    t = epoch_seconds((doc or {}).get("updated_at"))
    return None if t is None else round(max(0.0, now - t), 1)


def _problem_reports(status_dir: Path) -> list[dict[str, Any]]:
    """Newest reports of files that had bad lines, warnings or nothing usable, each cut to a few lines."""
    try:
        entries = [e for e in os.scandir(status_dir / status.REPORTS_DIR) if e.name.endswith(".report.json")]
    except OSError:
        return []
    def mtime(e: os.DirEntry) -> float:
        try:
            return e.stat().st_mtime
        except OSError:  # removed since the listing
            return 0.0

    entries.sort(key=mtime, reverse=True)
    out = []
    for e in entries[: MAX_REPORTS * 5]:
        rep = FileReport.read(e.path)
        if rep is None or (rep.usable and not rep.bad_lines and not rep.warnings):
            continue
        name = Path(rep.file or e.name).name
        bad = [b for b in rep.bad if isinstance(b, dict)][:MAX_BAD_LINES]
        warnings = [w for w in rep.warnings if isinstance(w, str)][:MAX_BAD_LINES]
        out.append({"file": name, "usable": rep.usable, "error": rep.error,
                    "bad_lines": rep.bad_lines, "examples": rep.examples,
                    "bad": [status.bad_entry_text(name, b) for b in bad],
                    "warnings": [f"{name}: {w}" for w in warnings]})
        if len(out) >= MAX_REPORTS:
            break
    return out


def verdict(training: dict[str, Any] | None) -> dict[str, Any] | None:
    """The page's one-word verdict on learning: the accuracy trend, unless the model is forgetting.

    Held-out accuracy can improve while the base's general knowledge goes: then the verdict is
    ``forgetting`` (retention under ``eval.retention_warn``, or falling), never ``improving``.
    """
    if not training:
        return None
    acc = training.get("accuracy") if isinstance(training.get("accuracy"), dict) else {}
    ret = training.get("retention") if isinstance(training.get("retention"), dict) else {}
    ratio = ret.get("ratio")
    if ret.get("forgetting") or (ret.get("trend") == "falling" and acc.get("trend") == "improving"):
        return {"label": "forgetting", "reason": f"retention {ratio:.0%} of the base's probe score"
                if isinstance(ratio, (int, float)) else "retention is falling"}
    return {"label": acc.get("trend"), "reason": None} if acc.get("trend") else None


def build_state(status_dir: str | Path, history: History, refresh_seconds: float,
                skills: SkillTracker | None = None, workbench_port: int | None = None) -> dict[str, Any]:
    sd = Path(status_dir)
    now = time.time()
    training = status.read_json(sd / status.TRAINING_STATUS)  # the page gets the file's object, annotated
    record = TrainingStatus.from_json(training, sd / status.TRAINING_STATUS)  # what is decided here reads this
    daemon = status.read_json(sd / status.DAEMON_STATUS)
    memory = status.read_json(sd / status.MEMORY_STATUS)
    merge = status.read_json(sd / status.CONSOLIDATION_STATUS)

    if training is not None and record is not None:
        alive = status.pid_alive(record.pid)
        state = None if "state" in record.missing else record.state
        training["alive"] = alive
        training["stale"] = state not in ("idle", "error", None) and not alive
        training["age_seconds"] = _age(training, now)
        if not isinstance(training.get("recent_examples"), list):  # written before the field: the history has them
            training["recent_examples"] = status.tail_jsonl(sd / status.EXAMPLES_HISTORY, RECENT_EXAMPLES)
    if daemon is not None:
        daemon["alive"] = status.pid_alive(daemon.get("pid"))
        daemon["age_seconds"] = _age(daemon, now)
    if merge is not None:  # the merge child's own file: fresher than the daemon's copy, and there without a daemon
        merge["alive"] = status.pid_alive(merge.get("pid"))
        merge["running"] = merge.get("state") == "running" and merge["alive"]
        merge["age_seconds"] = _age(merge, now)
    memory_fresh = None
    if memory is not None:
        memory["age_seconds"] = _age(memory, now)
        memory["stale"] = memory["age_seconds"] is None or memory["age_seconds"] > MEMORY_STALE_SECONDS
        memory_fresh = None if memory["stale"] else memory

    hist = history.summary()
    return {
        "schema_version": status.SCHEMA_VERSION,
        "now": now_iso(),
        "refresh_seconds": refresh_seconds,
        "waiting": training is None,
        "training": training,
        "daemon": daemon,
        "memory": memory,
        "consolidation": merge,
        # The page's health light: from fresh memory figures plus the trainer's and daemon's states.
        "health": stats.health(memory_fresh, record, daemon),
        "verdict": verdict(training),
        "loss_trend": hist["loss_trend"],
        "last_val_loss": hist["last_val_loss"],
        "history_counts": {"steps": hist["steps"], "evals": hist["evals"]},
        "reports": _problem_reports(sd),
        "skills": skills.snapshot() if skills is not None else None,  # web/skills.py
        "workbench_port": workbench_port,
    }
