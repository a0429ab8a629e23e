"""Tokenize the next run's files while the worker trains this one (docs/DAEMON.md, "The worker").

    python -m ultimate_trainer.trainer.prefetch --cache DIR --base PATH [--config PATH] [--set ...] --manifest PATH
    python -m ultimate_trainer.trainer.prefetch --cache DIR --base PATH [--config PATH] [--set ...] -- FILE ...

The daemon names, with each run it hands the worker, the files of the run queued after it (the
"next" hint of core/worker_files.py), each with the SHA-256, size and lines its journal recorded: the
worker writes them as a manifest (core/manifest.py) for this process, which keys its cache entries
by those hashes and hashes nothing (files given by path alone are hashed, as a run by hand would
be). The worker starts this process for them at the lowest CPU
priority (nice 19), with the tokenizer of the base it is training on; it writes one cache entry per
file (data/tokcache.py) that ``prepare`` takes when that run comes. It is a separate process, not a
thread, so that it never competes with the training loop for the GIL nor shares its tokenizer; it
dies with the worker (PR_SET_PDEATHSIG). A hint that turns out wrong costs only the CPU it used.

``daemon.prefetch_tokenize``: ``auto`` (the default) prefetches when the worker trains on a GPU,
where the CPU is otherwise idle; on a CPU it would take cores from training, so it does not unless
set to ``on``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ultimate_trainer.core import config
from ultimate_trainer.core.config import Config
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.launch import child_env, die_with_parent, launch
from ultimate_trainer.core.logs import setup_logging
from ultimate_trainer.core.manifest import FileEntry, Manifest

if TYPE_CHECKING:
    from ultimate_trainer.trainer.recipe import StopFlag

log = logging.getLogger(__name__)

NICE = 19
MANIFEST_PREFIX = ".next-manifest-"  # in the cache folder: the files the child tokenizes (one per worker)


def enabled(cfg: Config, device: str) -> bool:
    """Whether to tokenize ahead: ``daemon.prefetch_tokenize`` (auto: when training on a GPU)."""
    mode = cfg.daemon.prefetch_tokenize
    return mode == "on" or (mode == "auto" and device.startswith("cuda"))


def cache_dir(cfg: Config) -> Path:
    return cfg.path("work") / "tokcache"


class Prefetcher:
    """The worker's one prefetch child at a time."""

    def __init__(self, cfg_args: list[str]):
        self.cfg_args = cfg_args
        self.proc: subprocess.Popen | None = None
        self.files: list[Path] = []
        self.manifest: Path | None = None  # the child's manifest file, removed with the child

    def start(self, files: list[FileEntry], base_path: str, cache: Path) -> None:
        self.stop()
        self.manifest = Manifest(list(files)).write(Path(cache) / f"{MANIFEST_PREFIX}{os.getpid()}.json")
        cmd = [sys.executable, "-m", "ultimate_trainer.trainer.prefetch", "--cache", str(cache), "--base", base_path,
               *self.cfg_args, "--manifest", str(self.manifest)]
        # The worker has threads: no preexec_fn; the child asks for its parent-death signal itself (main).
        self.proc = launch(cmd, own_session=False, pdeathsig=False, env=child_env(TOKENIZERS_PARALLELISM="false"),
                           stdin=subprocess.DEVNULL)
        self.files = [f.path for f in files]
        log.info("tokenizing ahead (pid %d): %s", self.proc.pid, ", ".join(f.path.name for f in files))

    def settle(self, files: list[Path], stop: StopFlag) -> None:
        """Before a run of ``files``: let a prefetch of those same files (by name) finish, end any other."""
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            return
        if [Path(f).name for f in files] == [Path(f).name for f in self.files]:
            log.info("waiting for the files of this run to be tokenized ahead (pid %d)", self.proc.pid)
            while self.proc.poll() is None and not stop.requested:
                time.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.manifest is not None:
            self.manifest.unlink(missing_ok=True)
            self.manifest = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ultimate_trainer.trainer.prefetch",
                                     description="Tokenize files ahead of their run into the token cache.")
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--base", required=True, help="the base model folder whose tokenizer to use")
    config.add_arguments(parser)
    parser.add_argument("--manifest", type=Path, help="the files with their SHA-256, size and lines (core/manifest.py)")
    parser.add_argument("files", nargs="*", type=Path, help="files by path alone (hashed here)")
    args = parser.parse_args(argv)
    die_with_parent()  # dies with the worker
    os.nice(NICE)
    setup_logging(logging.INFO)
    cfg = config.config_or_none(args)
    if cfg is None:
        return Exit.CONFIG
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ultimate_trainer.data.prepare import fill_cache
    from ultimate_trainer.model.loading import load_tokenizer

    files = Manifest.read(args.manifest).files if args.manifest else args.files
    made = fill_cache(files, load_tokenizer(args.base), cfg, args.cache)
    log.info("tokenized ahead: %d new cache entr%s", len(made), "y" if len(made) == 1 else "ies")
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
