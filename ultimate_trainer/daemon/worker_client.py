"""The daemon's side of the trainer worker (trainer/worker.py): start it, hand it a run, wait, stop it.

The worker is a child like ``train.py`` (own session, SIGTERM when the daemon dies, waited on by the
same ``ChildRunner``, so stop, disk pauses and kill -9 are handled the same way), but it outlives a
run: ``launch`` starts it only when none is running, then writes the run's request
(core/worker_files.py); ``wait`` returns the run's exit code from its result file, or the worker's
exit status when it died without one (a kill -9 reads as ``killed by signal 9``, as for
``train.py``). The pid recorded for the run is the worker's, and ``training_status.json`` carries
it too, so the daemon's outcome rules (exit code + finished status + newest checkpoint) stay as
they are.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path
from typing import Callable

from ultimate_trainer.core import worker_files
from ultimate_trainer.core.manifest import FileEntry, Manifest
from ultimate_trainer.daemon.runner import ChildRunner, send_signal

log = logging.getLogger(__name__)

# (worker dir, the --config/--set arguments) -> argv of the worker child
WorkerCmd = Callable[[Path, list[str]], list[str]]
EXIT_WAIT_SECONDS = 60.0  # a worker that announced its end gets this long to exit before it is killed
STOP_WAIT_SECONDS = 120.0  # a worker asked to stop: time to finish a step and save (as terminate_pid gives)


class WorkerClient:
    def __init__(self, worker_dir: Path, cmd: list[str], runner: ChildRunner):
        self.dir, self.cmd, self.runner = Path(worker_dir), cmd, runner
        self.proc: subprocess.Popen | None = None
        self.seq: str | None = None
        self.started = 0  # worker processes started, for logs and tests

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive() else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> subprocess.Popen:
        """A running worker: this one, or a new one (which loads the model while no run waits for it)."""
        if not self.alive():
            worker_files.clear(self.dir)  # requests of a dead worker must not be taken by the next
            self.proc = self.runner.launch(self.cmd)
            self.started += 1
            log.info("started trainer worker pid %d", self.proc.pid)
        assert self.proc is not None
        return self.proc

    def launch(self, manifest: Manifest, next_files: list[FileEntry] | None = None) -> subprocess.Popen:
        """Hand the run ``manifest`` describes to the worker, starting a worker first when none is running.

        ``next_files``: those of the run queued after it, which the worker may tokenize ahead (a hint).
        """
        self.runner.adopt(self.start())
        self.seq = worker_files.write_request(self.dir, manifest, next_files).seq
        return self.runner.proc  # type: ignore[return-value]

    def wait(self) -> int:
        """The run's exit code (negative: the worker was killed by that signal before answering)."""
        proc, seq = self.proc, self.seq
        assert proc is not None and seq is not None

        def answered() -> int | None:
            result = worker_files.read_result(self.dir, seq)
            return None if result is None else result["code"]

        code = self.runner.wait(done=answered)
        result = worker_files.read_result(self.dir, seq)
        if result is None:
            self.proc = None  # it died without answering: the next run starts a new one
            return code
        if result.get("exiting"):
            log.info("trainer worker pid %d ends: %s", proc.pid, result.get("why"))
            self._reap(proc)
        return result["code"]

    def close(self) -> None:
        """Stop a running worker (SIGTERM: a run in progress saves first), e.g. before a consolidation."""
        if self.alive():
            assert self.proc is not None
            log.info("stopping trainer worker pid %d", self.proc.pid)
            send_signal(self.proc.pid, signal.SIGTERM)
            self._reap(self.proc, STOP_WAIT_SECONDS)
        self.proc = None

    def _reap(self, proc: subprocess.Popen, timeout: float = EXIT_WAIT_SECONDS) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("trainer worker pid %d did not exit after its last result; killing it", proc.pid)
            proc.kill()
            proc.wait()
        if proc is self.proc:
            self.proc = None
