"""The servers the daemon brings up as children (``monitor_server.py``, ``memory_stats_api.py`` and,
with ``daemon.start_workbench``, ``workbench.py``).

Started once each, in their own session (a terminal Ctrl-C reaches the daemon, which stops them in
order); a server script that is missing from the install is skipped with a note.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ultimate_trainer.core.config import Config

log = logging.getLogger(__name__)

MONITORS = {"monitor": "monitor_server.py", "stats_api": "memory_stats_api.py", "workbench": "workbench.py"}
STOP_TIMEOUT = 10.0


class ChildSet:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def start_monitors(self, cfg: Config, cfg_args: list[str], code_dir: Path) -> None:
        for key, script in MONITORS.items():
            if key == "workbench" and not cfg.daemon.start_workbench:
                continue
            path = code_dir / script
            if not path.exists():
                log.info("%s is not there; the daemon runs without it", script)
                continue
            try:
                self.procs[key] = subprocess.Popen([sys.executable, str(path), *cfg_args], start_new_session=True)
                log.info("started %s (pid %d)", script, self.procs[key].pid)
            except OSError as e:
                log.error("cannot start %s: %s", script, e)

    def status(self, cfg: Config) -> dict[str, Any]:
        ports = {"monitor": cfg.monitor.port, "stats_api": cfg.monitor.stats_port,
                 "workbench": cfg.monitor.workbench_port}
        out = {}
        for key in MONITORS:
            p = self.procs.get(key)
            running = p is not None and p.poll() is None
            out[key] = {"pid": p.pid if p else None, "port": ports[key], "running": running}
        return out

    def stop_all(self) -> None:
        for key, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for key, p in self.procs.items():
            try:
                p.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", MONITORS[key], STOP_TIMEOUT)
                p.kill()
                p.wait()
        self.procs.clear()
