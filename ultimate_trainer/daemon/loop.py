"""The inbox daemon: takes what lands in ``inbox/``, feeds it to ``train.py``, loses nothing.

One loop (``Daemon.run``), one iteration per ``daemon.poll_interval``:

1. disk: under ``disk_critical_gb`` intake and training pause (files stay queued);
2. intake: flatten the inbox, move complete files to ``queue/waiting`` (journalled, hashed);
3. an open run left by a crash is relaunched on exactly the same files (train.py resumes it);
4. else a due consolidation runs (child process) while nothing trains;
5. else the waiting files are batched (``batch_max_files``/``batch_max_mb``) into one train.py run,
   so one model load serves many files.

train.py is a child process in its own session: a crash or memory growth there never takes the
daemon down, and a terminal Ctrl-C reaches the daemon only, which forwards one SIGTERM (the trainer
saves a checkpoint and exits). If the daemon itself is killed, the trainer gets SIGTERM from the
kernel (PR_SET_PDEATHSIG) and the next start waits for it before relaunching the run.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ultimate_trainer.daemon import schedule
from ultimate_trainer.core.config import REPO_DIR, Config
from ultimate_trainer.daemon.inbox import Inbox, Spool
from ultimate_trainer.daemon.journal import BatchRecord
from ultimate_trainer.core.status import DAEMON_STATUS, TRAINING_STATUS, atomic_write_json, pid_alive, read_json, report_path
from ultimate_trainer.core.times import now_iso, parse_iso
from ultimate_trainer.daemon.children import ChildSet
from ultimate_trainer.core.checkpoints import list_complete
from ultimate_trainer.daemon.snapshot import build_status, consolidation_history

log = logging.getLogger(__name__)

CODE_DIR = REPO_DIR
STOP_FILE = ".stop"
LOCK_FILE = "daemon.lock"
STATUS_EVERY = 1.0  # seconds between daemon_status.json rewrites while waiting on a child
RECENT = 20

# (files, the --config/--set arguments to pass through) -> argv of the trainer child
TrainerCmd = Callable[[list[Path], list[str]], list[str]]


class SetupError(RuntimeError):
    """train.py cannot run at all (config or model): not the files' fault."""


def _pdeathsig() -> None:
    # Runs in the child between fork and exec: the kernel sends SIGTERM if the daemon dies.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = "config.json", overrides: list[str] | None = None, *,
                 once: bool = False, consolidate_now: bool = False, trainer_cmd: TrainerCmd | None = None,
                 consolidate_cmd: Callable[[Path], list[str]] | None = None,
                 clock: Callable[[], float] = time.time, stop_event: threading.Event | None = None):
        self.cfg, self.d = cfg, cfg.daemon
        self.config_path = str(Path(config_path).resolve()) if config_path else None
        self.overrides = list(overrides or [])
        self.once, self.force_consolidation = once, consolidate_now
        self.trainer_cmd = trainer_cmd or self._default_trainer_cmd
        self.consolidate_cmd = consolidate_cmd or self._default_consolidate_cmd
        self.clock = clock
        self.stop_event = stop_event or threading.Event()
        self.root = cfg.path("root")
        self.status_dir = cfg.path("status")
        self.ckpt_dir = cfg.path("checkpoints")
        self.consolidated_dir = cfg.path("models") / "consolidated"
        self.spool = Spool(cfg.path("queue"))
        self.inbox = Inbox(cfg.path("inbox"), self.d.file_stable_seconds)
        self.children = ChildSet()
        self.started_ts = clock()
        self.started_at = now_iso()
        self.state = "starting"
        self.last_error: str | None = None
        self.current: dict[str, Any] | None = None
        self.current_proc: subprocess.Popen | None = None
        self.failures = 0  # consecutive failed launches: drives the back-off
        self.consolidation_running = False
        self.consolidation_retry_ts = 0.0
        self.pending_inbox = 0
        self.disk: dict[str, Any] = {}
        self._last_status = 0.0
        self._last_intake = 0.0
        self._lock_fd: int | None = None
        self.disk_stopped = False  # the current run was asked to stop because the disk is nearly full
        self.exit_code = 0  # what --once returns when the queue is empty (1 after a failed consolidation)

    # ------------------------------------------------------------------ commands
    def _cfg_args(self) -> list[str]:
        args = ["--config", self.config_path] if self.config_path else []
        for o in self.overrides:
            args += ["--set", o]
        return args

    @staticmethod
    def _default_trainer_cmd(files: list[Path], cfg_args: list[str]) -> list[str]:
        return [sys.executable, str(CODE_DIR / "train.py"), *map(str, files), *cfg_args]

    def _default_consolidate_cmd(self, files_json: Path) -> list[str]:
        return [sys.executable, "-m", "ultimate_trainer.trainer.consolidate", *self._cfg_args(), "--files-json", str(files_json)]

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
            if self.d.start_monitors:
                self.children.start_monitors(self.cfg, self._cfg_args(), CODE_DIR)
            while not self.stop_event.is_set():
                busy_before = self.spool.journal.path.stat().st_size
                try:
                    result = self.tick()
                except OSError as e:
                    # Disk full, a folder made unwritable...: the spool is consistent again after a
                    # reconcile (every step is idempotent); wait and try again rather than die.
                    log.error("spool operation failed: %s; retrying after a back-off", e)
                    self.last_error = f"{type(e).__name__}: {e}"
                    self._backoff()
                    try:
                        self.spool.reconcile(self.status_dir / "reports")
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
            self.last_error, self.state, code = f"{type(e).__name__}: {e}", "error", 1
        finally:
            self.state = "stopping"
            self._write_status(force=True)
            self.children.stop_all()
            if self.state != "error":
                self.state = "stopped" if code == 0 else "error"
            self._write_status(force=True)
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

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        self.spool.reconcile(self.status_dir / "reports")
        ob = self.spool.journal.state.open_batch
        if ob and ob.pid and pid_alive(ob.pid) and ob.pid != os.getpid() and _runs_files(ob.pid, ob.files):
            log.warning("the trainer of run %s (pid %d) outlived the last daemon; asking it to save and stop", ob.batch, ob.pid)
            _terminate_pid(ob.pid)

    # ------------------------------------------------------------------ one iteration
    def tick(self) -> int | None:
        """One pass of the loop; returns an exit code when the daemon should end (``--once`` or setup error)."""
        self._check_stop_file()
        self.disk = schedule.disk_info(self.ckpt_dir, self.d.disk_warn_gb, self.d.disk_critical_gb)
        if self.disk["level"] == "critical":
            if self.state != "paused_disk":
                log.error("free disk %.1f GB is under daemon.disk_critical_gb=%.1f: intake and training paused; "
                          "files stay queued", self.disk["free_gb"], self.d.disk_critical_gb)
            self.state = "paused_disk"
            self.last_error = f"disk critical: {self.disk['free_gb']:.1f} GB free"
            self._write_status(force=True)
            return 1 if self.once else None
        self.intake()
        st = self.spool.journal.state
        try:
            if st.open_batch is not None:
                self.run_batch(st.open_batch)
            elif self._consolidation_wanted():
                self.consolidate()
            elif self.spool.names_in("waiting"):
                self.run_batch(self._new_batch())
            else:
                self.state = "idle"
        except SetupError as e:
            self.last_error = str(e)
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
        st = self.spool.journal.state
        return (st.open_batch is None and not self.spool.names_in("waiting") and self.pending_inbox == 0
                and not self._consolidation_wanted())

    def intake(self) -> None:
        self._last_intake = self.clock()
        try:
            res = self.inbox.scan()
        except OSError as e:
            log.error("%s: cannot scan (%s)", self.inbox.root, e)
            return
        self.pending_inbox = len(res.pending)
        for p in res.ready:
            try:
                self.spool.take(p, self.d.skip_duplicates)
            except OSError as e:  # one unreadable file must not stop the others
                log.error("%s: cannot take (%s); left in the inbox", p, e)

    def _new_batch(self) -> BatchRecord:
        st = self.spool.journal.state
        names, total = [], 0
        limit = self.d.batch_max_mb * 1e6
        for n in sorted(self.spool.names_in("waiting"), key=lambda n: (st.files[n].arrived_at, n) if n in st.files else ("", n)):
            rec = st.files.get(n)
            if rec is None or rec.state != "queued":
                continue
            if rec.solo:  # split out of a crashing batch: alone, or not at all
                if names:
                    continue
                names = [n]
                break
            if names and (len(names) >= self.d.batch_max_files or total + rec.size > limit):
                break
            names.append(n)
            total += rec.size
        batch = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.spool.start_batch(batch, names)
        return st.batches[batch]

    # ------------------------------------------------------------------ a training run
    def run_batch(self, batch: BatchRecord) -> None:
        st = self.spool.journal.state
        names = [n for n in batch.files if n in st.files and st.files[n].state == "queued"]
        if not names:
            self.spool.requeue(batch.batch, [])
            return
        if batch.pid is not None and self._checkpoint_completes(names):  # trained before a kill; bookkeeping lost
            log.info("run %s was already complete in the newest checkpoint", batch.batch)
            self._finish(batch, names, started=self.clock(), seconds=0.0)
            return
        attempt = batch.crashes + 1
        paths = [self.spool.folder("processing") / n for n in names]
        cmd = self.trainer_cmd(paths, self._cfg_args())
        log.info("training %d file(s) (run %s, attempt %d): %s", len(names), batch.batch, attempt, ", ".join(names))
        started = self.clock()
        self.disk_stopped = False
        proc = subprocess.Popen(cmd, cwd=os.getcwd(), start_new_session=True, preexec_fn=_pdeathsig)
        self.current_proc = proc
        self.current = {"files": names, "started_at": now_iso(), "pid": proc.pid, "attempt": attempt, "batch": batch.batch}
        self.spool.journal.append("launch", batch=batch.batch, pid=proc.pid, attempt=attempt)
        self.state = "training"
        self._write_status(force=True)
        code = self._wait_child(proc)
        self.current_proc, self.current = None, None
        seconds = self.clock() - started
        complete = self._run_complete(proc.pid, names)
        if complete and code == 0:
            self.failures = 0
            self._finish(batch, names, started, seconds)
        elif self.stop_event.is_set() and code in (0, -signal.SIGTERM):
            log.info("run %s interrupted by the stop; it resumes at the next start", batch.batch)
        elif self.disk_stopped and code in (0, -signal.SIGTERM):
            log.info("run %s paused for disk space; it resumes when there is room", batch.batch)
        elif code == 3 and self._fail_unusable(batch, names):
            self.failures = 0
        elif code in (2, 4):
            raise SetupError(f"train.py exited {code} ({'configuration error' if code == 2 else 'model cannot be loaded'}): "
                             f"{self._trainer_error(proc.pid) or 'see its log'}")
        else:
            self._crashed(batch, names, code, proc.pid)

    def _wait_child(self, proc: subprocess.Popen) -> int:
        signalled = False
        while True:
            try:
                return proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass
            self._check_stop_file()
            if self.stop_event.is_set() and not signalled:
                log.info("asking the trainer (pid %d) to save a checkpoint and stop", proc.pid)
                _signal(proc.pid, signal.SIGTERM)
                signalled = True
            if not self.stop_event.is_set() and self.clock() - self._last_intake >= self.d.poll_interval:
                self.disk = schedule.disk_info(self.ckpt_dir, self.d.disk_warn_gb, self.d.disk_critical_gb)
                if self.disk["level"] == "critical":
                    if not signalled:  # each further checkpoint would eat the last free space
                        log.error("free disk %.1f GB is critical: asking the trainer to save and pause",
                                  self.disk["free_gb"])
                        _signal(proc.pid, signal.SIGTERM)
                        signalled = self.disk_stopped = True
                else:
                    self.intake()  # keep the queue (and its ETA) current while training
            self._write_status()

    def _run_complete(self, pid: int, names: list[str]) -> bool:
        ts = read_json(self.status_dir / TRAINING_STATUS) or {}
        if ts.get("pid") == pid and ts.get("state") == "idle" and ts.get("run_total_steps") is not None \
                and ts.get("run_step") == ts.get("run_total_steps") \
                and sorted(Path(f).name for f in ts.get("current_files") or []) == sorted(names):
            return True
        return self._checkpoint_completes(names)

    def _checkpoint_completes(self, names: list[str]) -> bool:
        ckpts = list_complete(self.ckpt_dir)
        if not ckpts:
            return False
        meta = ckpts[-1].meta
        hashes = sorted(self.spool.journal.state.files[n].sha256 for n in names)
        return bool(meta.get("run_complete")) and sorted(f.get("sha256", "") for f in meta.get("files") or []) == hashes

    def _finish(self, batch: BatchRecord, names: list[str], started: float, seconds: float) -> None:
        st = self.spool.journal.state
        ts = read_json(self.status_dir / TRAINING_STATUS) or {}
        ckpts = list_complete(self.ckpt_dir)
        gstep = ckpts[-1].global_step if ckpts else ts.get("global_step")
        files, examples = [], 0
        for n in names:
            rep = read_json(report_path(self.status_dir, n)) or {}
            ex = rep.get("examples") if isinstance(rep.get("examples"), int) else None
            examples += ex or 0
            files.append({"name": n, "examples": ex})
        size = sum(st.files[n].size for n in names)
        self.spool.journal.append("done", batch=batch.batch, files=files, global_step=gstep, seconds=round(seconds, 3),
                                  bytes=size, examples=examples, finished_ts=self.clock())
        for n in names:
            self.spool.finish_done(n, report_path(self.status_dir, n))
        log.info("run %s done: %d file(s), %d examples, global step %s, %.1f s", batch.batch, len(names), examples, gstep, seconds)

    def _fail_unusable(self, batch: BatchRecord, names: list[str]) -> bool:
        bad = {}
        for n in names:
            rep = read_json(report_path(self.status_dir, n))
            if rep is not None and rep.get("usable") is False:
                bad[n] = rep.get("error") or "no usable example"
        if not bad:
            return False
        for n, why in bad.items():
            self.spool.fail(n, f"train.py: {why}")
        self.spool.requeue(batch.batch, [n for n in names if n not in bad])
        return True

    def _trainer_error(self, pid: int) -> str | None:
        ts = read_json(self.status_dir / TRAINING_STATUS) or {}
        return ts.get("error") if ts.get("pid") == pid else None

    def _crashed(self, batch: BatchRecord, names: list[str], code: int, pid: int) -> None:
        why = self._trainer_error(pid) or (f"killed by signal {-code}" if code < 0 else f"exited {code}")
        if code == 0:
            why = "exited 0 before finishing its run"
        reason = f"train.py {why}"
        self.last_error = reason
        self.spool.journal.append("crash", batch=batch.batch, attempt=batch.crashes + 1, code=code, reason=reason)
        log.error("run %s: %s (crash %d of %d)", batch.batch, reason, batch.crashes, self.d.max_attempts)
        if batch.crashes >= self.d.max_attempts:
            if len(names) > 1:
                log.warning("run %s keeps crashing: its files will be trained one by one to find the culprit", batch.batch)
                self.spool.requeue(batch.batch, names, solo=True)
            else:
                self.spool.fail(names[0], f"{reason} ({batch.crashes} attempts)")
                self.spool.requeue(batch.batch, [])
        self._backoff()

    def _backoff(self) -> None:
        self.failures += 1
        delay = min(self.d.retry_initial_seconds * 2 ** (self.failures - 1), self.d.retry_max_seconds)
        self.state = "backoff"
        log.info("backing off %.0f s before the next attempt", delay)
        self._write_status(force=True)
        self._sleep(delay)

    # ------------------------------------------------------------------ consolidation
    def _consolidation_wanted(self) -> bool:
        st = self.spool.journal.state
        if st.open_batch is not None or self.clock() < self.consolidation_retry_ts:
            return False
        ckpts = list_complete(self.ckpt_dir)
        if not ckpts or not ckpts[-1].meta.get("run_complete", True):
            return False
        hist = consolidation_history(self.consolidated_dir)
        if hist and hist[-1].get("global_step", -1) >= ckpts[-1].global_step:
            self.force_consolidation = False
            return False
        if self.force_consolidation:
            return True
        last = parse_iso(hist[-1]["created_at"]) if hist else None
        return schedule.consolidation_due(self.d.consolidation_hour, last, parse_iso(st.first_started),
                                          dt.datetime.now().astimezone())

    def consolidate(self) -> None:
        st = self.spool.journal.state
        files_json = self.spool.dir / "consolidation-files.json"
        atomic_write_json(files_json, {"files": list(st.done_since_consolidation)})
        self.state, self.consolidation_running = "consolidating", True
        self._write_status(force=True)
        log.info("consolidating: merging the adapter into the base")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_DIR), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(self.consolidate_cmd(files_json), start_new_session=True, preexec_fn=_pdeathsig, env=env)
        code = self._wait_child(proc)
        self.consolidation_running = False
        hist = consolidation_history(self.consolidated_dir)
        if code == 0 and hist:
            m = hist[-1]
            self.spool.journal.append("consolidated", path=m.get("path"), global_step=m.get("global_step"),
                                      source_checkpoint=m.get("source_checkpoint"))
            self.force_consolidation = False
            log.info("consolidated into %s (global step %s)", m.get("path"), m.get("global_step"))
        elif not self.stop_event.is_set():
            self.last_error = f"consolidation failed (exit {code}); retrying in {self.d.retry_max_seconds:.0f} s"
            log.error("%s", self.last_error)
            self.consolidation_retry_ts = self.clock() + self.d.retry_max_seconds
            if self.once:
                self.force_consolidation = False
                self.exit_code = 1
        self.state = "idle"

    # ------------------------------------------------------------------ status
    def _write_status(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_status < STATUS_EVERY:
            return
        self._last_status = now
        try:
            atomic_write_json(self.status_dir / DAEMON_STATUS, build_status(self, now))
        except OSError as e:  # a full disk must not stop the loop; the next write may succeed
            log.error("%s: cannot write (%s)", self.status_dir / DAEMON_STATUS, e)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _runs_files(pid: int, names: list[str]) -> bool:
    """Whether ``pid`` is still our trainer (its command line names the run's files), not a reused pid."""
    import psutil

    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return False
    return any(n in cmdline for n in names)


def _terminate_pid(pid: int, timeout: float = 120.0) -> None:
    _signal(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.2)
    if pid_alive(pid):
        log.warning("pid %d did not stop in %.0f s; killing it (its last complete checkpoint stays)", pid, timeout)
        _signal(pid, signal.SIGKILL)
