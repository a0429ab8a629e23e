"""The daemon's children that do the work (``train.py``, the consolidation): launch, wait, outcome.

A child runs in its own session, so a terminal Ctrl-C reaches the daemon only, which forwards one
SIGTERM (the trainer saves a checkpoint and exits 0). If the daemon itself dies, the kernel sends
the child SIGTERM (PR_SET_PDEATHSIG). While it waits, the runner keeps calling ``watch``: the
daemon's chance to scan the inbox, check the disk and rewrite its status; a reason returned by
``watch`` (a nearly full disk) is forwarded as that same one SIGTERM.

``outcome`` turns what the child said (exit code, whether its run is complete, why it was asked
to stop) into what the daemon does next, with the exit codes of ``core.exitcodes``.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable

from ultimate_trainer.core.exitcodes import SETUP_ERRORS, Exit
from ultimate_trainer.core.launch import launch
from ultimate_trainer.core.records import TrainingStatus
from ultimate_trainer.core.status import pid_alive

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
STOPPED_BY_SIGNAL = (Exit.OK, -signal.SIGTERM)  # exit codes of a child that obeyed the SIGTERM


class Outcome(enum.Enum):
    DONE = "done"                # the run is complete: its files go to done/
    STOPPED = "stopped"          # the daemon is stopping: the run resumes at the next start
    PAUSED_DISK = "paused_disk"  # asked to stop for disk space: resumes when there is room
    UNUSABLE = "unusable"        # a file has no usable example (exit 3): that file fails
    SETUP_ERROR = "setup_error"  # configuration or model (exit 2, 4): no file is to blame
    DIVERGED = "diverged"        # the divergence guard stopped the run (exit 5): its files fail, no retry
    CRASHED = "crashed"          # anything else: retry with a back-off, then isolate the file


def outcome(code: int, run_complete: bool, stopped_for: str | None) -> Outcome:
    if run_complete and code == Exit.OK:
        return Outcome.DONE
    if stopped_for == "stop" and code in STOPPED_BY_SIGNAL:
        return Outcome.STOPPED
    if stopped_for == "disk" and code in STOPPED_BY_SIGNAL:
        return Outcome.PAUSED_DISK
    if code == Exit.DATA:
        return Outcome.UNUSABLE
    if code == Exit.DIVERGED:
        return Outcome.DIVERGED
    if code in SETUP_ERRORS:
        return Outcome.SETUP_ERROR
    return Outcome.CRASHED


def diverged_files(training: TrainingStatus | dict[str, Any] | None, pid: int,
                   names: list[str]) -> tuple[list[str], str | None]:
    """After exit 5: the run's files the guard blamed (all of them when it named none) and its reason
    (``TrainingStatus.diverged_files``; the file's object is parsed first)."""
    ts = training if isinstance(training, TrainingStatus) else TrainingStatus.from_json(training)
    return (ts or TrainingStatus()).diverged_files(pid, names)


def describe_exit(code: int) -> str:
    """``exited 2 (configuration error)``, ``exited 1``, ``killed by signal 9``."""
    if code < 0:
        return f"killed by signal {-code}"
    known = SETUP_ERRORS | {Exit.DIVERGED}
    return f"exited {code} ({Exit(code).meaning})" if code in known else f"exited {code}"


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def terminate_pid(pid: int, timeout: float = 120.0) -> None:
    """SIGTERM, then SIGKILL if ``pid`` is still there after ``timeout`` seconds."""
    send_signal(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.2)
    if pid_alive(pid):
        log.warning("pid %d did not stop in %.0f s; killing it (its last complete checkpoint stays)", pid, timeout)
        send_signal(pid, signal.SIGKILL)


def runs_files(pid: int, names: list[str]) -> bool:
    """Whether ``pid`` is still our trainer (its command line names the run's files), not a reused pid."""
    import psutil

    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return False
    return any(n in cmdline for n in names)


class ChildRunner:
    """Runs one child at a time to its end, forwarding at most one SIGTERM."""

    def __init__(self, stop_event: threading.Event, watch: Callable[[bool], str | None]):
        self.stop_event = stop_event
        self.watch = watch  # called while waiting, with "already signalled"; returns a reason to stop the child
        self.proc: subprocess.Popen | None = None
        self.stopped_for: str | None = None  # "stop" | a reason from watch, e.g. "disk"

    def launch(self, cmd: list[str]) -> subprocess.Popen:
        """Start the child (core/launch.py: own session, SIGTERM when the daemon dies, the package importable)."""
        self.stopped_for = None
        self.proc = launch(cmd, cwd=os.getcwd())
        return self.proc

    def adopt(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Wait on a child that is already running (the trainer worker, for its next run)."""
        self.stopped_for = None
        self.proc = proc
        return proc

    def wait(self, done: Callable[[], int | None] | None = None) -> int:
        """Wait for the child launched last; its exit code (negative: killed by that signal).

        ``done``: for a child that outlives its task (the worker), the task's exit code once it has
        one; the wait ends then, with the child still running.
        """
        proc = self.proc
        assert proc is not None
        try:
            while True:
                try:
                    return proc.wait(timeout=POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
                code = done() if done is not None else None
                if code is not None:
                    return code
                signalled = self.stopped_for is not None
                if self.stop_event.is_set() and not signalled:
                    log.info("asking pid %d to save a checkpoint and stop", proc.pid)
                    self._stop("stop")
                    continue
                reason = self.watch(signalled)
                if reason and not signalled:
                    self._stop(reason)
        finally:
            self.proc = None

    def _stop(self, why: str) -> None:
        assert self.proc is not None
        self.stopped_for = why
        send_signal(self.proc.pid, signal.SIGTERM)
