"""What ``train.py`` (and the consolidation child) tell the daemon by their exit code.

The daemon turns each into an outcome (daemon/runner.py); the fake trainer of the tests imports
them from here too, so the two sides cannot drift apart. The other entry points of the trainer and
the daemon (``daemon.py``, the worker, the prefetch child) return these too: 0 done, 1 failed,
2 the configuration or the command line is wrong.
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0        # the run finished, or stopped cleanly after saving (SIGTERM, .stop)
    CRASH = 1     # anything unexpected: the daemon retries with a back-off, then isolates the file
    CONFIG = 2    # the configuration is wrong: no file is to blame, the daemon waits for a fix
    DATA = 3      # a file has no usable example: that file goes to queue/failed/
    MODEL = 4     # the base model cannot be found or loaded: no file is to blame
    DIVERGED = 5  # the divergence guard stopped the run: the files it names go to queue/failed/
    REFUSED = 6   # (the consolidation child) the gate refused the merged candidate: it is kept, not adopted

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_MEANING = {
    Exit.OK: "finished",
    Exit.CRASH: "crashed",
    Exit.CONFIG: "configuration error",
    Exit.DATA: "no usable data",
    Exit.MODEL: "model cannot be loaded",
    Exit.DIVERGED: "training diverged",
    Exit.REFUSED: "consolidation refused by the gate",
}

SETUP_ERRORS = frozenset({Exit.CONFIG, Exit.MODEL})  # not the files' fault: retrying other files cannot help
