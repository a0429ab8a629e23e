"""The inbox daemon: takes what lands in ``inbox/``, feeds it to ``train.py``, loses nothing.

One loop (``Daemon.run``), one iteration (``tick``) per ``daemon.poll_interval``:

1. disk: under ``disk_critical_gb`` intake and training pause (files stay queued);
2. intake: flatten the inbox, move complete files to ``queue/waiting`` (journalled, hashed);
3. an open run left by a crash is relaunched on exactly the same files (train.py resumes it);
4. else a due consolidation runs (child process) while nothing trains;
5. else the waiting files are batched (``batch_max_files``/``batch_max_mb``) into one train.py run,
   so one model load serves many files.

The daemon is a few objects with one job each, composed here: ``Intake`` (inbox, spool, journal),
``ChildRunner`` (launch a child, wait, forward stop and disk signals, exit code -> ``Outcome``),
``Consolidations`` (when to merge, and the merge child), ``ChildSet`` (the web servers) and
the ``Snapshot`` that ``snapshot.build_status`` turns into ``daemon_status.json``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.config import REPO_DIR, Config
from ultimate_trainer.core.devices import several_processes
from ultimate_trainer.core.records import FileReport, TrainingStatus
from ultimate_trainer.core.status import DAEMON_STATUS, MEMORY_STATUS, TRAINING_STATUS, atomic_write_json, \
    pid_alive, read_json, report_path
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.daemon import schedule
from ultimate_trainer.daemon.children import ChildSet
from ultimate_trainer.daemon.consolidation import ConsolidateCmd, Consolidations
from ultimate_trainer.daemon.intake import Intake
from ultimate_trainer.daemon.journal import BatchRecord
from ultimate_trainer.daemon.notify import Notifier
from ultimate_trainer.daemon.runner import ChildRunner, Outcome, describe_exit, diverged_files, outcome, runs_files, \
    terminate_pid
from ultimate_trainer.daemon.snapshot import Snapshot, build_status, report_examples
from ultimate_trainer.daemon.worker_client import WorkerClient, WorkerCmd

log = logging.getLogger(__name__)

STOP_FILE = ".stop"
LOCK_FILE = "daemon.lock"
MANIFESTS = "manifests"  # under paths.work: the manifest of each train.py child's run (core/manifest.py)
STATUS_EVERY = 1.0  # seconds between daemon_status.json rewrites while waiting on a child

# (files, the --config/--set arguments to pass through) -> argv of the trainer child
TrainerCmd = Callable[[list[Path], list[str]], list[str]]


class SetupError(RuntimeError):
    """train.py cannot run at all (config or model): not the files' fault."""


def default_trainer_cmd(files: list[Path], cfg_args: list[str]) -> list[str]:
    return [sys.executable, str(REPO_DIR / "train.py"), *map(str, files), *cfg_args]


def default_worker_cmd(worker_dir: Path, cfg_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ultimate_trainer.trainer.worker", "--worker-dir", str(worker_dir), *cfg_args]


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = "config.json", overrides: list[str] | None = None, *,
                 once: bool = False, consolidate_now: bool = False, trainer_cmd: TrainerCmd | None = None,
                 consolidate_cmd: ConsolidateCmd | None = None, worker_cmd: WorkerCmd | None = None,
                 clock: Callable[[], float] = time.time, stop_event: threading.Event | None = None):
        self.cfg, self.d = cfg, cfg.daemon
        self.config_path = str(Path(config_path).resolve()) if config_path else None
        self.overrides = list(overrides or [])
        self.once = once
        self.trainer_cmd = trainer_cmd or default_trainer_cmd
        self.clock = clock
        self.stop_event = stop_event or threading.Event()
        self.root = cfg.path("root")
        self.status_dir = cfg.path("status")
        self.ckpt_dir = cfg.path("checkpoints")
        self.intake = Intake(cfg.path("inbox"), cfg.path("queue"), self.d)
        self.spool = self.intake.spool
        self.runner = ChildRunner(self.stop_event, self._watch_child)
        # daemon.worker: one long-lived trainer keeps the model loaded between runs (trainer/worker.py).
        # It is one process: several ranks (training.num_processes) go through train.py and torchrun.
        self.worker_dir = cfg.path("work") / "worker"
        use_worker = self.d.worker and not several_processes(cfg.training.num_processes)
        if self.d.worker and not use_worker:
            log.info("several training processes: each run is a train.py child (torchrun), not the worker")
        self.worker = WorkerClient(self.worker_dir, (worker_cmd or default_worker_cmd)(
            self.worker_dir, self._cfg_args()), self.runner) if use_worker else None
        self.consolidations = Consolidations(cfg, self.spool, self.runner, self._cfg_args(),
                                             now_requested=consolidate_now, clock=clock,
                                             consolidate_cmd=consolidate_cmd)
        self.monitors = ChildSet()
        n = cfg.notify
        self.notifier = Notifier(n.urls, n.min_interval_seconds, n.events, n.timeout_seconds)
        self.snap = Snapshot(started_ts=clock(), started_at=now_iso())
        self.failures = 0  # consecutive failed launches: drives the back-off
        self.exit_code = 0  # what --once returns when the queue is empty (1 after a failed consolidation)
        self._last_status = 0.0
        self._last_intake = 0.0
        self._lock_fd: int | None = None

    @property
    def state(self) -> str:
        return self.snap.state

    def _cfg_args(self) -> list[str]:
        args = ["--config", self.config_path] if self.config_path else []
        for o in self.overrides:
            args += ["--set", o]
        return args

    # ------------------------------------------------------------------ lifecycle
    def acquire_lock(self) -> None:
        path = self.spool.dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = path.read_text().strip() or "?"
            raise RuntimeError(f"another daemon is running on {self.spool.dir} (pid {other})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def request_stop(self, why: str) -> None:
        if not self.stop_event.is_set():
            log.info("stopping: %s", why)
        self.stop_event.set()

    def _check_stop_file(self) -> None:
        f = self.root / STOP_FILE
        if f.exists():
            try:
                f.unlink()
            except OSError:
                pass
            self.request_stop(f"{f} found")

    def run(self) -> int:
        """The main loop. Returns the process exit code."""
        try:
            self.acquire_lock()
        except RuntimeError as e:
            log.error("%s", e)
            return 1
        stale = self.root / STOP_FILE
        if stale.exists():
            log.info("removing a stale %s left from before this start", stale)
            stale.unlink(missing_ok=True)
        self.spool.journal.append("started", pid=os.getpid())
        code = 0
        try:
            self._recover()
            if self.worker is not None and not self.stop_event.is_set():
                self.worker.start()  # it loads the model while the inbox is scanned
            if self.d.start_monitors:
                self.monitors.start_monitors(self.cfg, self._cfg_args(), REPO_DIR)
            while not self.stop_event.is_set():
                busy_before = self.spool.journal.path.stat().st_size
                try:
                    result = self.tick()
                except OSError as e:
                    # Disk full, a folder made unwritable...: the spool is consistent again after a
                    # reconcile (every step is idempotent); wait and try again rather than die.
                    log.error("spool operation failed: %s; retrying after a back-off", e)
                    self.snap.last_error = f"{type(e).__name__}: {e}"
                    self._backoff()
                    try:
                        self.spool.reconcile(self.status_dir)
                    except OSError as e2:
                        log.error("reconcile failed too: %s", e2)
                    if self.once and self.failures >= self.d.max_attempts:
                        code = 1
                        break
                    continue
                if result is not None:
                    code = result
                    break
                if self.spool.journal.path.stat().st_size == busy_before:
                    self._sleep(self.d.poll_interval)  # nothing happened: wait for the inbox
        except Exception as e:  # the last line of defence: report, keep the spool consistent, exit non-zero
            log.exception("daemon failed")
            self.snap.last_error, self.snap.state, code = f"{type(e).__name__}: {e}", "error", 1
        finally:
            self.snap.state = "stopping" if self.snap.state != "error" else "error"
            self._write_status(force=True)
            self.monitors.stop_all()
            if self.worker is not None:
                self.worker.close()
            if self.snap.state != "error":
                self.snap.state = "stopped" if code == 0 else "error"
            self._write_status(force=True)
            self.notifier.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
        log.info("daemon exits with %d", code)
        return code

    def _sleep(self, seconds: float) -> None:
        end = self.clock() + seconds
        while not self.stop_event.is_set():
            self._check_stop_file()
            self._write_status()
            left = end - self.clock()
            if left <= 0:
                return
            self.stop_event.wait(min(left, 0.5))

    def _recover(self) -> None:
        self.spool.reconcile(self.status_dir)
        ob = self.spool.journal.state.open_batch
        if ob and ob.pid and pid_alive(ob.pid) and ob.pid != os.getpid() and (
                runs_files(ob.pid, ob.files) or runs_files(ob.pid, [str(self.worker_dir)])):
            log.warning("the trainer of run %s (pid %d) outlived the last daemon; asking it to save and stop",
                        ob.batch, ob.pid)
            terminate_pid(ob.pid)

    # ------------------------------------------------------------------ one iteration
    def tick(self) -> int | None:
        """One pass of the loop; returns an exit code when the daemon should end (``--once`` or setup error)."""
        self._check_stop_file()
        disk = self.snap.disk = schedule.disk_info(self.ckpt_dir, self.d.disk_warn_gb, self.d.disk_critical_gb)
        if disk["level"] == "critical":
            if self.snap.state != "paused_disk":
                log.error("free disk %.1f GB is under daemon.disk_critical_gb=%.1f: intake and training paused; "
                          "files stay queued", disk["free_gb"], self.d.disk_critical_gb)
            self.snap.state = "paused_disk"
            self.snap.last_error = f"disk critical: {disk['free_gb']:.1f} GB free"
            self._write_status(force=True)
            return 1 if self.once else None
        self._scan()
        st = self.spool.journal.state
        try:
            if st.open_batch is not None:
                self.run_batch(st.open_batch)
            elif self.consolidations.wanted():
                self._consolidate()
            elif self.intake.has_waiting():
                self.run_batch(self.intake.batch())
            else:
                self.snap.state = "idle"
        except SetupError as e:
            self.snap.last_error = str(e)
            if self.once:
                log.error("%s; files stay queued", e)
                return 1
            self._backoff()
            return None
        if self.stop_event.is_set():
            return 0
        self._write_status(force=True)
        if self.once and self._nothing_left():
            log.info("--once: everything in the inbox is processed")
            return self.exit_code
        return None

    def _nothing_left(self) -> bool:
        return (self.spool.journal.state.open_batch is None and not self.intake.has_waiting()
                and self.intake.pending == 0 and not self.consolidations.wanted())

    def _scan(self) -> None:
        self._last_intake = self.clock()
        self.intake.scan()
        self.snap.pending_inbox = self.intake.pending

    def _watch_child(self, signalled: bool) -> str | None:
        """While a child runs: stop file, disk, intake (so the queue and its ETA stay current), status."""
        self._check_stop_file()
        reason = None
        if not self.stop_event.is_set() and self.clock() - self._last_intake >= self.d.poll_interval:
            disk = self.snap.disk = schedule.disk_info(self.ckpt_dir, self.d.disk_warn_gb, self.d.disk_critical_gb)
            if disk["level"] == "critical":
                if not signalled:  # each further checkpoint would eat the last free space
                    log.error("free disk %.1f GB is critical: asking the trainer to save and pause", disk["free_gb"])
                    reason = "disk"
            else:
                self._scan()
        self._write_status()
        return reason

    # ------------------------------------------------------------------ a training run
    def run_batch(self, batch: BatchRecord) -> None:
        st = self.spool.journal.state
        names = [n for n in batch.files if n in st.files and st.files[n].state == "queued"]
        if not names:
            self.spool.requeue(batch.batch, [])
            return
        if batch.pid is not None and self._checkpoint_completes(names):  # trained before a kill; bookkeeping lost
            log.info("run %s was already complete in the newest checkpoint", batch.batch)
            self._finish(batch, names, seconds=0.0)
            return
        attempt = batch.crashes + 1
        manifest = self.intake.manifest(names, self.status_dir)  # the run, described once (core/manifest.py)
        log.info("training %d file(s) (run %s, attempt %d): %s", len(names), batch.batch, attempt, ", ".join(names))
        started = self.clock()
        if self.worker is not None:
            # The files queued after this run, for the worker to tokenize ahead (trainer/prefetch.py).
            following = self.intake.peek_entries()
            proc = self.worker.launch(manifest, following)
        else:
            path = manifest.write(self.cfg.path("work") / MANIFESTS / f"{batch.batch}.json")
            proc = self.runner.launch(self.trainer_cmd(manifest.paths, [*self._cfg_args(), "--manifest", str(path)]))
        self.snap.current = {"files": names, "started_at": now_iso(), "pid": proc.pid, "attempt": attempt,
                             "batch": batch.batch}
        self.spool.journal.append("launch", batch=batch.batch, pid=proc.pid, attempt=attempt)
        self.snap.state = "training"
        self._write_status(force=True)
        code = self.worker.wait() if self.worker is not None else self.runner.wait()
        if self.worker is None:
            path.unlink(missing_ok=True)
        self.snap.current = None
        seconds = self.clock() - started
        training = self._training()
        complete = (training is not None and training.finished(proc.pid, names)) or self._checkpoint_completes(names)
        stopped_for = "stop" if self.stop_event.is_set() else self.runner.stopped_for
        result = outcome(code, complete, stopped_for)
        if result is Outcome.DONE:
            self.failures = 0
            self._finish(batch, names, seconds)
        elif result is Outcome.STOPPED:
            log.info("run %s interrupted by the stop; it resumes at the next start", batch.batch)
        elif result is Outcome.PAUSED_DISK:
            log.info("run %s paused for disk space; it resumes when there is room", batch.batch)
        elif result is Outcome.UNUSABLE and self._fail_unusable(batch, names):
            self.failures = 0
        elif result is Outcome.DIVERGED:
            self._fail_diverged(batch, names, code, proc.pid)
        elif result is Outcome.SETUP_ERROR:
            raise SetupError(f"train.py {describe_exit(code)}: {self._trainer_error(proc.pid) or 'see its log'}")
        else:
            self._crashed(batch, names, code, proc.pid)

    def _checkpoint_completes(self, names: list[str]) -> bool:
        newest = ck.newest_complete(self.ckpt_dir)
        hashes = [self.spool.journal.state.files[n].sha256 for n in names]
        return newest is not None and ck.completes_files(newest.marker, hashes)

    def _finish(self, batch: BatchRecord, names: list[str], seconds: float) -> None:
        st = self.spool.journal.state
        newest = ck.newest_complete(self.ckpt_dir)
        training = None if newest else self._training()
        gstep = newest.global_step if newest else training.global_step if training else None
        files, examples = [], 0
        for n in names:
            ex = report_examples(self.status_dir, n)
            examples += ex or 0
            files.append({"name": n, "examples": ex})
        size = sum(st.files[n].size for n in names)
        self.spool.journal.append("done", batch=batch.batch, files=files, global_step=gstep, seconds=round(seconds, 3),
                                  bytes=size, examples=examples, finished_ts=self.clock())
        for n in names:
            self.spool.finish_done(n, report_path(self.status_dir, n))
        log.info("run %s done: %d file(s), %d examples, global step %s, %.1f s", batch.batch, len(names), examples,
                 gstep, seconds)

    def _fail_unusable(self, batch: BatchRecord, names: list[str]) -> bool:
        bad = {}
        for n in names:
            rep = FileReport.read(report_path(self.status_dir, n))
            if rep is not None and rep.usable is False:
                bad[n] = rep.error or "no usable example"
        if not bad:
            return False
        for n, why in bad.items():
            self.spool.fail(n, f"train.py: {why}")
        self.spool.requeue(batch.batch, [n for n in names if n not in bad])
        return True

    def _fail_diverged(self, batch: BatchRecord, names: list[str], code: int, pid: int) -> None:
        """The guard stopped the run: retrying the same data would diverge again. Its files fail."""
        blamed, reason = diverged_files(self._training(), pid, names)
        reason = f"train.py {reason or describe_exit(code)}"
        self.snap.last_error = reason
        for n in blamed:
            self.spool.fail(n, reason)
        self.spool.requeue(batch.batch, [n for n in names if n not in blamed])
        log.error("run %s: %s; failed: %s", batch.batch, reason, ", ".join(blamed))

    def _training(self) -> TrainingStatus | None:
        """The trainer's ``training_status.json``, read once where a decision needs it (core/records.py)."""
        return TrainingStatus.read(self.status_dir / TRAINING_STATUS)

    def _trainer_error(self, pid: int) -> str | None:
        ts = self._training()
        return ts.error if ts is not None and ts.pid == pid else None

    def _crashed(self, batch: BatchRecord, names: list[str], code: int, pid: int) -> None:
        why = self._trainer_error(pid) or describe_exit(code)
        if code == 0:
            why = "exited 0 before finishing its run"
        reason = f"train.py {why}"
        self.snap.last_error = reason
        self.spool.journal.append("crash", batch=batch.batch, attempt=batch.crashes + 1, code=code, reason=reason)
        log.error("run %s: %s (crash %d of %d)", batch.batch, reason, batch.crashes, self.d.max_attempts)
        if batch.crashes >= self.d.max_attempts:
            if len(names) > 1:
                log.warning("run %s keeps crashing: its files will be trained one by one to find the culprit",
                            batch.batch)
                self.spool.requeue(batch.batch, names, solo=True)
            else:
                self.spool.fail(names[0], f"{reason} ({batch.crashes} attempts)")
                self.spool.requeue(batch.batch, [])
        self._backoff()

    def _backoff(self) -> None:
        self.failures += 1
        delay = min(self.d.retry_initial_seconds * 2 ** (self.failures - 1), self.d.retry_max_seconds)
        self.snap.state = "backoff"
        log.info("backing off %.0f s before the next attempt", delay)
        self._write_status(force=True)
        self._sleep(delay)

    # ------------------------------------------------------------------ consolidation
    def _consolidate(self) -> None:
        if self.worker is not None:
            self.worker.close()  # its model is stale after the merge, and the merge needs the memory
        self.snap.state = "consolidating"
        self._write_status(force=True)
        error = self.consolidations.run(stopping=self.stop_event.is_set)
        if error:
            self.snap.last_error = error
            if self.once:
                self.consolidations.requested = False
                self.exit_code = 1
        self.snap.state = "idle"

    # ------------------------------------------------------------------ status
    def _write_status(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_status < STATUS_EVERY:
            return
        self._last_status = now
        self.snap.consolidation_running = self.consolidations.running
        self.snap.monitors = self.monitors.status(self.cfg)
        status = build_status(self.snap, self.spool, self.cfg, now)
        try:
            atomic_write_json(self.status_dir / DAEMON_STATUS, status)
        except OSError as e:  # a full disk must not stop the loop; the next write may succeed
            log.error("%s: cannot write (%s)", self.status_dir / DAEMON_STATUS, e)
        if self.notifier.enabled:  # news from every status file, sent in the background (daemon/notify.py)
            self.notifier.observe(status, read_json(self.status_dir / TRAINING_STATUS),
                                  read_json(self.status_dir / MEMORY_STATUS))
