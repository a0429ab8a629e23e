"""The long-lived trainer: trains run after run with the model kept loaded (docs/DAEMON.md, "The worker").

    python -m ultimate_trainer.trainer.worker --worker-dir DIR [--config PATH] [--set KEY=VALUE ...]

The daemon starts it as its child and writes one request per run into ``DIR/requests``; the worker
does each with ``recipe.run`` (the same phases, status files, run ids and checkpoints as
``train.py FILE ...``), handing it a ``Session`` so the tokenizer and the model stay loaded while
they fit (trainer/session.py), and answers in ``DIR/results`` (core/worker_files.py). The
configuration is read again for every run, as a new ``train.py`` would.

A request may name the files of the run queued after it (``next``): with
``daemon.prefetch_tokenize`` on (auto: training on a GPU), the worker starts a low-priority child
that tokenizes them while this run trains (trainer/prefetch.py), and the next run takes them from
that cache (data/tokcache.py) instead of tokenizing; its result says how many (``tokenized_ahead``).

The worker ends, after writing the run's result, when:

- SIGTERM/SIGINT arrived (the daemon stops, or died: PR_SET_PDEATHSIG sends SIGTERM): a run in
  progress finishes its step and saves first, as ``train.py`` does;
- a run did not end cleanly (exit code other than 0 or 3): whatever state it left in memory dies
  with the process, and the next run loads afresh;
- its RSS, or the GPU memory torch holds, grew more than ``daemon.worker_max_growth_mb`` past what
  it was after its first run (a leak must not grow the trainer without bound).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ultimate_trainer.core import config, worker_files
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.logs import setup_logging

if TYPE_CHECKING:
    from ultimate_trainer.trainer.prefetch import Prefetcher
    from ultimate_trainer.trainer.recipe import StopFlag

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
KEEPS_RUNNING = (Exit.OK, Exit.DATA)  # a run that ended like this leaves the loaded model as it was


def memory_mb() -> dict[str, float]:
    """This process's RSS and, on a GPU, the memory torch has reserved, in MB."""
    import psutil

    out = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["gpu_mb"] = torch.cuda.memory_reserved() / 2**20
    return {k: round(v, 1) for k, v in out.items()}


class MemoryBound:
    """Growth past the memory measured after the first run, beyond ``limit_mb``: time to recycle."""

    def __init__(self, limit_mb: float):
        self.limit_mb = limit_mb
        self.baseline: dict[str, float] | None = None

    def exceeded(self, now: dict[str, float]) -> str | None:
        if self.baseline is None:
            self.baseline = dict(now)
            return None
        for key, value in now.items():
            grown = value - self.baseline.get(key, value)
            if self.limit_mb and grown > self.limit_mb:
                return f"{key[:-3]} grew {grown:.0f} MB since the first run (daemon.worker_max_growth_mb={self.limit_mb:g})"
        return None


def serve(args: argparse.Namespace, stop: StopFlag) -> int:
    """Take requests until told to stop or until a reason to end; the last run's exit code."""
    from ultimate_trainer.trainer.prefetch import Prefetcher

    ahead = Prefetcher(["--config", str(args.config), *(a for o in args.overrides for a in ("--set", o))])
    try:
        return _serve(args, stop, ahead)
    finally:
        ahead.stop()  # no child of a worker tokenizes on after it (what it finished stays cached)


def _serve(args: argparse.Namespace, stop: StopFlag, ahead: Prefetcher) -> int:
    from ultimate_trainer.data import tokcache
    from ultimate_trainer.trainer import prefetch
    from ultimate_trainer.trainer.recipe import execute, preload
    from ultimate_trainer.trainer.session import Session

    worker_dir = Path(args.worker_dir)
    session, bound, code, tokenized_ahead = Session(), None, Exit.OK, 0
    cfg = config_or_none(args)
    if cfg is not None and not stop.requested:
        preload(cfg, session)  # while the daemon waits for files: the first run finds the model loaded
    log.info("worker %d ready, waiting for runs in %s", os.getpid(), worker_dir / worker_files.REQUESTS)
    while not stop.requested:
        req = worker_files.next_request(worker_dir)
        if req is None:
            time.sleep(POLL_SECONDS)
            continue
        cfg, loads, tokenized_ahead = config_or_none(args), len(session.loads), 0
        if cfg is None:
            code, why = Exit.CONFIG, "the configuration does not load"
        else:
            bound = bound or MemoryBound(cfg.daemon.worker_max_growth_mb)
            ahead.settle(req.files, stop)  # files of this run being tokenized ahead: let that finish
            on = prefetch.enabled(cfg, session.device)
            cache = prefetch.cache_dir(cfg) if on else None
            if cache is not None and req.next and session.base_path:
                ahead.start(req.next, session.base_path, cache)
            result = execute(cfg, req.manifest or req.files, stop=stop, session=session, cache_dir=cache)
            code, tokenized_ahead = result.code, len(result.cache_hits)
            if cache is not None:
                tokcache.remove(cache, result.cache_used)
            gc.collect()  # the run's Trainer, optimizer and data go now, not at some later collection
            why = None
            if stop.requested:
                why = "asked to stop"
            elif code not in KEEPS_RUNNING:
                why = f"the run exited {code}: a fresh process for the next one"
        mem = memory_mb()
        if why is None and bound is not None:
            why = bound.exceeded(mem)
        worker_files.write_result(worker_dir, req.seq, code=int(code), pid=os.getpid(), exiting=why is not None,
                                  why=why, model_loaded=len(session.loads) > loads,
                                  tokenized_ahead=tokenized_ahead, **mem)
        if why is not None:
            log.info("worker %d ends: %s", os.getpid(), why)
            return int(code)
    return int(code)


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ultimate_trainer.trainer.worker",
                                     description="Train the daemon's runs one after another, the model kept loaded.")
    parser.add_argument("--worker-dir", required=True, type=Path, help="where requests and results are exchanged")
    config.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if config_or_none(args) is None:
        return Exit.CONFIG
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ultimate_trainer.trainer.recipe import StopFlag

    stop = StopFlag()
    stop.install()
    return serve(args, stop)


if __name__ == "__main__":
    sys.exit(worker_main())
