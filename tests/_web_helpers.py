"""Fixtures shared by the web tests: a copy of the fixture status folder made "live", and a real server."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Iterator

# `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from ultimate_trainer.core import status  # noqa: E402
from ultimate_trainer.core.times import now_iso

FIXTURE_STATUS = Path(__file__).parent / "fixtures" / "status"


def live_status_dir(dest: Path) -> Path:
    """Copy the fixture status files to ``dest`` and make them look current: the trainer's pid is
    this (alive) process and the memory sample is fresh."""
    shutil.copytree(FIXTURE_STATUS, dest)
    for name, fields in ((status.TRAINING_STATUS, ("updated_at",)), (status.MEMORY_STATUS, ("updated_at", "sampled_at"))):
        doc = json.loads((dest / name).read_text(encoding="utf-8"))
        for f in fields:
            doc[f] = now_iso()
        if name == status.TRAINING_STATUS:
            doc["pid"] = os.getpid()
        status.atomic_write_json(dest / name, doc)
    return dest


class ServerThread:
    """A real waitress server for ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app: object):
        from waitress.server import create_server

        self.server = create_server(app, host="127.0.0.1", port=0, threads=4)
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except Exception:  # closing the sockets from the test thread ends the loop with an error
            pass

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()
        self.thread.join(timeout=5)


def iter_lines(text: str) -> Iterator[str]:
    return (line for line in text.splitlines() if line.strip())
