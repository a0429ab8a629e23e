"""When the daemon merges the adapter into the base, and how it runs the merge (a child process).

A consolidation is wanted when nothing is open in the spool, the newest checkpoint ends a run and
is newer than the last consolidation, and either ``--consolidate-now`` was given or a
``daemon.consolidation_hour`` boundary passed since the last one (or since the daemon was first
started: a boundary missed while it was down counts). A failed merge is retried after
``daemon.retry_max_seconds``. The merge itself is ``python -m ultimate_trainer.trainer.consolidation``.

The merge child may refuse its candidate (the gate, trainer/consolidation/gate.py; exit code 6): the refusal is
journalled, ``daemon_status.json`` shows it in ``consolidation.last_refused``, and no merge is
wanted again until training has gone past the refused candidate's step. ``rollback`` undoes the
newest adopted consolidation (``daemon.py --rollback-consolidation``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.config import Config
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.spool import DONE, newest_first
from ultimate_trainer.core.status import atomic_write_json
from ultimate_trainer.core.times import now_iso, parse_iso
from ultimate_trainer.daemon import schedule
from ultimate_trainer.daemon.inbox import Spool
from ultimate_trainer.daemon.runner import ChildRunner
from ultimate_trainer.daemon.snapshot import consolidation_history

log = logging.getLogger(__name__)

# files.json (the files trained since the last merge, for the manifest) -> argv of the merge child
ConsolidateCmd = Callable[[Path], list[str]]


class Consolidations:
    def __init__(self, cfg: Config, spool: Spool, runner: ChildRunner, cfg_args: list[str], *, now_requested: bool,
                 clock: Callable[[], float], consolidate_cmd: ConsolidateCmd | None = None):
        self.cfg, self.spool, self.runner, self.clock = cfg, spool, runner, clock
        self.cfg_args = cfg_args
        self.requested = now_requested  # --consolidate-now: at the first idle moment
        self.cmd = consolidate_cmd or self._default_cmd
        self.retry_ts = 0.0
        self.running = False
        self.failed = False  # the last attempt failed (--once exits 1)

    def _default_cmd(self, files_json: Path) -> list[str]:
        return [sys.executable, "-m", "ultimate_trainer.trainer.consolidation", *self.cfg_args,
                "--files-json", str(files_json)]

    def wanted(self) -> bool:
        st = self.spool.journal.state
        if st.open_batch is not None or self.clock() < self.retry_ts:
            return False
        ckpts = ck.current_checkpoints(self.cfg.path("checkpoints"), self.cfg.path("models"))
        if not ckpts or not ckpts[-1].marker.run_complete:
            return False
        hist = consolidation_history(self.cfg.path("models") / "consolidated")
        refused = ck.list_refused(self.cfg.path("models"))
        if (hist and hist[-1].get("global_step", -1) >= ckpts[-1].global_step) or (
                refused and refused[-1].global_step >= ckpts[-1].global_step):  # refused: wait for more training
            self.requested = False
            return False
        if self.requested:
            return True
        last = parse_iso(hist[-1]["created_at"]) if hist else None
        return schedule.consolidation_due(self.cfg.daemon.consolidation_hour, last, parse_iso(st.first_started),
                                          dt.datetime.now().astimezone())

    def run(self, stopping: Callable[[], bool]) -> str | None:
        """Run the merge child to its end. Returns an error line, or None when it succeeded (or was stopped)."""
        st = self.spool.journal.state
        files_json = self.spool.dir / "consolidation-files.json"
        atomic_write_json(files_json, {"files": list(st.done_since_consolidation),
                                       "trained": [str(p) for p in newest_first(self.spool.folder(DONE))]})
        log.info("consolidating: merging the adapter into the base")
        self.running = True
        try:
            self.runner.launch(self.cmd(files_json))
            code = self.runner.wait()
        finally:
            self.running = False
        hist = consolidation_history(self.cfg.path("models") / "consolidated")
        refused = ck.list_refused(self.cfg.path("models"))
        if code == Exit.REFUSED and refused:
            m = refused[-1].manifest
            reason = (m.get("gate") or {}).get("reason")
            self.spool.journal.append("consolidation_refused", path=str(refused[-1].path),
                                      global_step=m.get("global_step"), reason=reason)
            self.requested = self.failed = False
            log.warning("consolidation refused, training continues on the current base: %s", reason)
            return None
        if code == 0 and hist:
            m = hist[-1]
            self.spool.journal.append("consolidated", path=m.get("path"), global_step=m.get("global_step"),
                                      source_checkpoint=m.get("source_checkpoint"))
            self.requested = self.failed = False
            log.info("consolidated into %s (global step %s)", m.get("path"), m.get("global_step"))
            return None
        if stopping():
            return None
        retry = self.cfg.daemon.retry_max_seconds
        self.retry_ts = self.clock() + retry
        self.failed = True
        error = f"consolidation failed (exit {code}); retrying in {retry:.0f} s"
        log.error("%s", error)
        return error


def rollback(cfg: Config) -> Path:
    """Un-adopt the newest consolidation: move it to ``models/consolidated/.rolled-back/`` (nothing is deleted).

    Training then continues on the previous base (the consolidation before it, or ``base_model``)
    with a fresh adapter, from the highest global step reached so far (recorded beside it), so the
    global step never goes back. Raises ``ValueError`` when there is nothing to roll back.
    """
    newest = ck.newest_consolidation(cfg.path("models"))
    if newest is None:
        raise ValueError(f"no adopted consolidation in {cfg.path('models') / 'consolidated'}: nothing to roll back")
    ckpts = ck.list_complete(cfg.path("checkpoints"))
    step = max([newest.global_step, ck.rolled_back_step(cfg.path("models"))] + [c.global_step for c in ckpts])
    dest_root = newest.path.parent / ck.ROLLED_BACK_DIR
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / newest.path.name
    i = 1
    while dest.exists():
        dest, i = dest_root / f"{newest.path.name}-{i}", i + 1
    # The record first: cut short before the move, the step floor already holds (the step cannot go
    # back) and running the command again finishes the move.
    dest.mkdir()
    atomic_write_json(dest / ck.ROLLBACK_RECORD, {"schema_version": 1, "consolidation": newest.path.name,
                                                   "global_step_at_rollback": step, "rolled_back_at": now_iso()})
    os.rename(newest.path, dest / "model")
    log.info("rolled back %s (moved to %s); training continues on the previous base from global step %d",
             newest.path.name, dest, step)
    return dest
