"""One training run, read top to bottom as its phases:

    load config -> find the start point -> load tokenizer -> read and tokenize data -> plan the run
    -> load model (+ adapter) -> train (evaluate, save) -> final save -> idle

Continuous training on the Hugging Face Trainer. The Trainer's own resume is built for "the same
dataset, interrupted"; here every run brings new files, so:

- the run's example order is planned here (seeded by the run id) and handed to the Trainer as a
  sequence (``train_sampling_strategy="sequential"``), with ``ignore_data_skip=True`` so the Trainer
  never fast-forwards through data that is not the data it saw;
- ``max_steps`` is the global step the run ends at (start step + this run's steps), so steps
  accumulate across runs instead of "epoch 1.0 of 1, nothing to do";
- ``resume_from_checkpoint`` restores adapter, optimizer, scheduler, RNG and ``global_step``;
- a run interrupted part-way (kill, crash, SIGTERM) is recognised by its run id when started again
  on the same files, and continues after the examples it had already trained on.

After a consolidation the start point is the merged model with a fresh adapter: a one-off
bootstrap folder holding only ``trainer_state.json`` (the global step) and that adapter lets the
Trainer continue the global step with a new optimizer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.config import Config
from ultimate_trainer.model.loading import ModelError
from ultimate_trainer.trainer.reporter import StatusReporter

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_DATA, EXIT_MODEL = 0, 1, 2, 3, 4
DATA_ORDER_KEYS = ("batch_size", "gradient_accumulation_steps", "epochs_per_file", "seed", "max_seq_length")


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived before training started: nothing to save, exit 0."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the training loop finishes its step, saves and stops. A second ^C aborts."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            log.warning("%s received: finishing the current step, then saving a checkpoint",
                        signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def check(self) -> None:
        if self.requested:
            raise StopRequested


@dataclass
class RunPlan:
    run_id: str
    order: list[int]  # indices into the token store, every epoch of this run concatenated
    examples_per_step: int  # examples per optimizer step; packed rows per step when packed
    total_steps: int
    done_steps: int  # steps already trained by an interrupted attempt of this same run
    steps_per_epoch: int
    rows: list[list[int]] | None = None  # packed: ``order`` cut into rows of store indices (data/packing.py)

    @property
    def remaining_order(self) -> list[int]:
        return self.order[self.done_steps * self.examples_per_step:]

    @property
    def remaining_rows(self) -> list[list[int]]:
        return (self.rows or [])[self.done_steps * self.examples_per_step:]


def run_id_for(file_hashes: list[str], cfg: Config, packed: bool = False) -> str:
    """Same files (by content) + same data-order settings = same run, so a crash can be continued."""
    key = {"files": sorted(file_hashes), **{k: getattr(cfg.training, k) for k in DATA_ORDER_KEYS}}
    if packed:
        key["packed"] = True  # rows, not examples, make a step: another plan
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def plan_run(n_examples: int, run_id: str, cfg: Config, resume: ck.CheckpointInfo | None,
             lengths: Any = None, packed: bool = False) -> RunPlan:
    """The run's order; with ``lengths`` also its batches (packed rows, or length-grouped examples)."""
    import numpy as np

    from ultimate_trainer.data.packing import lay_out

    per_step = cfg.training.batch_size * cfg.training.gradient_accumulation_steps
    total_examples = max(1, math.ceil(cfg.training.epochs_per_file * n_examples)) if n_examples else 0
    rng = np.random.default_rng([cfg.training.seed, int(run_id, 16) % (2**32)])
    order: list[int] = []
    while len(order) < total_examples:
        order.extend(rng.permutation(n_examples).tolist())
    order = order[:total_examples]
    rows = None
    if lengths is not None:
        order, rows = lay_out(order, lengths, cfg.training.batch_size, cfg.training.max_seq_length,
                              cfg.training.seed, packed)
    units = len(rows) if rows is not None else total_examples
    total_steps = math.ceil(units / per_step)
    per_epoch = units * n_examples / total_examples if total_examples else 0
    done = 0
    if resume is not None and resume.meta.get("run_id") == run_id and not resume.meta.get("run_complete", True):
        done = min(int(resume.meta.get("run_step", 0)), total_steps)
    return RunPlan(run_id, order, per_step, total_steps, done, max(1, math.ceil(per_epoch / per_step)), rows)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def run(cfg: Config, files: list[Path], *, max_steps: int | None = None, dry_run: bool = False,
        stop: StopFlag | None = None) -> int:
    """Train on ``files`` from wherever the last run ended. Returns the process exit code."""
    stop = stop or StopFlag()
    status_dir, ckpt_dir = cfg.path("status"), cfg.path("checkpoints")
    reporter = StatusReporter(status_dir, ckpt_dir, cfg.status.interval_seconds, cfg.eval.recent_examples)
    if not dry_run:
        reporter.update(current_files=[f.name for f in files], base_model=cfg.base_model,
                        load_in_4bit=cfg.load_in_4bit)
        reporter.set_state("loading")
        reporter.start()
    try:
        return _run(cfg, files, reporter, stop, max_steps=max_steps, dry_run=dry_run)
    except StopRequested:
        log.info("stopped before training started; nothing to save")
        if not dry_run:
            reporter.set_state("idle")
        return EXIT_OK
    except ModelError as e:
        return _fail(reporter, EXIT_MODEL, str(e), dry_run)
    except MemoryError:
        return _fail(reporter, EXIT_CRASH, "out of memory (lower training.batch_size or training.max_seq_length)",
                     dry_run)
    except Exception as e:
        log.exception("training failed")
        reason = _one_line(e)
        if "No space left on device" in reason or getattr(e, "errno", None) == errno.ENOSPC:
            reason = (f"disk full while writing ({reason}): free space under {cfg.path('checkpoints')} "
                      f"(the unfinished checkpoint is set aside at the next start)")
        return _fail(reporter, EXIT_CRASH, reason, dry_run)
    finally:
        if not dry_run:
            reporter.stop()
        shutil.rmtree(cfg.path("work") / "current", ignore_errors=True)


def _fail(reporter: StatusReporter, code: int, reason: str, dry_run: bool) -> int:
    print(f"error: {reason}", file=sys.stderr)
    if not dry_run:
        reporter.set_state("error", error=reason)
    return code


def _base_path(cfg: Config, start: ck.StartPoint) -> str:
    """The base weights the start point continues; the configured base when none is recorded.

    A recorded built-in or Hub base that moved (another machine, a new cache) is resolved again by
    name; a consolidated base cannot be, and applying its adapter to another base would be wrong.
    """
    from ultimate_trainer.model.loading import resolve_base

    if start.base_path and Path(start.base_path).is_dir():
        return start.base_path
    if start.base_path and (start.kind == "consolidation" or "consolidated" in Path(start.base_path).parts):
        name = start.checkpoint.name if start.checkpoint else "the newest checkpoint"
        raise ModelError(f"{name} continues the consolidated model {start.base_path}, which is missing: restore "
                         f"it, or point paths.checkpoints at a new folder to start over")
    return resolve_base(cfg)


def _run(cfg: Config, files: list[Path], reporter: StatusReporter, stop: StopFlag, *,
         max_steps: int | None, dry_run: bool) -> int:
    from ultimate_trainer.data import prepare as data
    from ultimate_trainer.data.packing import should_pack
    from ultimate_trainer.model.loading import load_tokenizer

    # Start point first: it decides which base (and so which tokenizer) this run uses.
    ckpt_dir, models_dir = cfg.path("checkpoints"), cfg.path("models")
    if not dry_run:
        ck.quarantine_incomplete(ckpt_dir)
    start = ck.start_point(ckpt_dir, models_dir)
    if start.checkpoint is not None and start.checkpoint.meta.get("base_model_name") not in (None, cfg.base_model) \
            and start.kind == "checkpoint":
        print(f"error: {ckpt_dir} continues {start.checkpoint.meta['base_model_name']!r} but base_model is "
              f"{cfg.base_model!r}: set base_model back, or point paths.checkpoints at a new folder to start "
              f"another model", file=sys.stderr)
        return EXIT_CONFIG
    base_path = _base_path(cfg, start)
    tokenizer = load_tokenizer(base_path)
    stop.check()

    # Read and tokenize: streaming, chunked, into a memory-mapped store.
    if not dry_run:
        reporter.set_state("tokenizing")
    store_dir = cfg.path("work") / "current"
    shutil.rmtree(store_dir, ignore_errors=True)
    prepared = data.prepare(files, tokenizer, cfg, store_dir, None if dry_run else cfg.path("status"))
    if dry_run:
        for path, report in prepared.reports.items():
            for bad in report["bad"]:
                print(f"{Path(path).name}:{bad['line']}: {bad['reason']}", file=sys.stderr)
        print(json.dumps(data.summarize(prepared, cfg.training.max_seq_length), indent=2))
        return EXIT_DATA if prepared.unusable else EXIT_OK
    for path, reason in prepared.unusable:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if prepared.unusable:
        reporter.set_state("error", error="; ".join(f"{Path(p).name}: {r}" for p, r in prepared.unusable))
        return EXIT_DATA
    stop.check()

    # Plan: which examples, in which order, how many steps; continue an interrupted attempt.
    hashes = [prepared.reports[str(f)]["sha256"] for f in files]
    lengths = prepared.train.lengths
    packed = should_pack(cfg.training.packing, lengths, cfg.training.max_seq_length)
    run_id = run_id_for(hashes, cfg, packed)
    plan = plan_run(len(prepared.train), run_id, cfg, start.checkpoint, lengths, packed)
    steps_now = plan.total_steps - plan.done_steps
    if max_steps is not None:
        steps_now = min(steps_now, max_steps)
    reporter.update(run_id=run_id, run_step=plan.done_steps, run_total_steps=plan.total_steps,
                    global_step=start.global_step, epoch=plan.done_steps / plan.steps_per_epoch)
    if plan.done_steps:
        log.info("continuing interrupted run %s at run step %d of %d", run_id, plan.done_steps, plan.total_steps)
    if steps_now <= 0:
        log.info("nothing to train: run %s is already complete", run_id)
        reporter.set_state("idle")
        return EXIT_OK

    from ultimate_trainer.trainer.hf import build_and_train

    build_and_train(cfg, files=files, prepared=prepared, tokenizer=tokenizer, base_path=base_path,
                    start=start, plan=plan, steps_now=steps_now, hashes=hashes,
                    reporter=reporter, stop=stop)
    reporter.refresh_checkpoints()
    reporter.set_state("idle", eta_seconds=0.0)
    return EXIT_OK
