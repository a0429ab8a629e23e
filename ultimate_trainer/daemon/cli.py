"""``daemon.py``'s command line, and the commands that run outside the loop (``--stop``, ``--prune-checkpoints``,
``--rollback-consolidation``)."""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.config import Config, add_arguments
from ultimate_trainer.daemon.loop import LOCK_FILE, STOP_FILE, Daemon, TrainerCmd
from ultimate_trainer.core.checkpoints import ROLLBACK_RECORD, list_complete
from ultimate_trainer.core.status import read_json
from ultimate_trainer.daemon.consolidation import rollback
from ultimate_trainer.daemon.worker_client import WorkerCmd
from ultimate_trainer.daemon.snapshot import consolidation_history
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core.logs import setup_logging

log = logging.getLogger(__name__)


def daemon_running(cfg: Config) -> bool:
    """Whether a daemon holds the lock of this queue."""
    try:
        fd = os.open(cfg.path("queue") / LOCK_FILE, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


WAIT_POLL_SECONDS = 0.5


def request_stop_file(cfg: Config, wait: bool = False) -> int:
    """``daemon.py --stop [--wait]``: ask a running daemon to stop gracefully (it polls for the file).

    With ``wait``, return only once the daemon has exited (its queue lock is free): its run saved a
    checkpoint and its servers stopped. systemd's ``ExecStop=`` uses this, so the unit is stopped
    only when nothing is left to save; a caller's own time limit (``TimeoutStopSec=``) bounds it.
    """
    if not daemon_running(cfg):
        print("no daemon is running here")
        return Exit.CRASH
    (cfg.path("root") / STOP_FILE).touch()
    print(f"asked the daemon to stop ({cfg.path('root') / STOP_FILE}); it saves a checkpoint first", flush=True)
    if wait:
        while daemon_running(cfg):
            time.sleep(WAIT_POLL_SECONDS)
        print("the daemon has stopped")
    return Exit.OK


def prune_checkpoints(cfg: Config, keep: int) -> list[Path]:
    """Delete old complete checkpoints, keeping the newest ``keep`` (at least 1) and every consolidation's source.

    The only place anything is deleted, and only on the user's explicit command. Incomplete folders
    are left alone (a save may be in progress).
    """
    ckpts = list_complete(cfg.path("checkpoints"))
    needed = {h.get("source_checkpoint") for h in consolidation_history(cfg.path("models") / "consolidated")}
    keep_names = {c.name for c in ckpts[-max(keep, 1):]} | needed
    removed = []
    for c in ckpts:
        if c.name in keep_names:
            continue
        shutil.rmtree(c.path)
        log.info("deleted %s", c.path)
        removed.append(c.path)
    return removed


def rollback_consolidation(cfg: Config) -> int:
    """``daemon.py --rollback-consolidation``: un-adopt the newest consolidation (never while a daemon runs)."""
    if daemon_running(cfg):
        print("a daemon is running here: stop it first (daemon.py --stop), then roll back", file=sys.stderr)
        return Exit.CRASH
    try:
        dest = rollback(cfg)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return Exit.CRASH
    print(f"rolled back: {dest.name} moved to {dest}; training continues on the previous base, "
          f"global step {read_json(dest / ROLLBACK_RECORD)['global_step_at_rollback']} onwards")
    return Exit.OK


def main(argv: list[str] | None = None, trainer_cmd: TrainerCmd | None = None,
         worker_cmd: WorkerCmd | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train continuously on whatever lands in inbox/ (docs/DAEMON.md).")
    add_arguments(ap)
    ap.add_argument("--once", action="store_true", help="process everything in the inbox, then exit")
    ap.add_argument("--consolidate-now", action="store_true", help="merge the adapter into the base at the first idle moment")
    ap.add_argument("--stop", action="store_true", help="ask the running daemon to stop gracefully, then exit")
    ap.add_argument("--wait", action="store_true",
                    help="with --stop: return only once the daemon has saved and exited")
    ap.add_argument("--prune-checkpoints", type=int, metavar="KEEP", default=None,
                    help="delete all but the newest KEEP checkpoints (never one a consolidation needs), then exit")
    ap.add_argument("--rollback-consolidation", action="store_true",
                    help="un-adopt the newest consolidated model (moved aside, not deleted): training continues "
                         "on the previous base, the global step going on; then exit")
    args = ap.parse_args(argv)
    setup_logging()
    if args.wait and not args.stop:
        ap.error("--wait goes with --stop")
    cfg = config_or_none(args)
    if cfg is None:
        return Exit.CONFIG
    if args.stop:
        return request_stop_file(cfg, wait=args.wait)
    if args.rollback_consolidation:
        return rollback_consolidation(cfg)
    if args.prune_checkpoints is not None:
        removed = prune_checkpoints(cfg, args.prune_checkpoints)
        print(f"deleted {len(removed)} checkpoint(s)")
        return Exit.OK
    daemon = Daemon(cfg, args.config, args.overrides, once=args.once, consolidate_now=args.consolidate_now,
                    trainer_cmd=trainer_cmd, worker_cmd=worker_cmd)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        daemon.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return daemon.run()
