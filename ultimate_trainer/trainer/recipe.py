"""One training run, read top to bottom as its phases (``_recipe`` below):

    config -> start point -> tokenizer -> data -> plan -> model (+ adapter) -> train (evaluate, save) -> idle

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

Everything the phases build lands on one ``RunState``; nothing else is passed around.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config
from ultimate_trainer.core import lineage
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.progress import Stopped
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.model.loading import ModelError
from ultimate_trainer.trainer.distributed import World, collective_failure
from ultimate_trainer.trainer.reporter import StatusReporter
from ultimate_trainer.trainer.stability import Diverged

log = logging.getLogger(__name__)

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

    def stopped(self) -> bool:
        """Asked by long phases (core/progress.py) to end within seconds."""
        return self.requested


@dataclass
class RunPlan:
    run_id: str
    order: list[int]  # indices into the token store, every epoch of this run concatenated
    examples_per_step: int  # examples per optimizer step; rows per step when there are rows
    total_steps: int
    done_steps: int  # steps already trained by an interrupted attempt of this same run
    steps_per_epoch: int
    rows: list[list[int]] | None = None  # flat or packed: ``order`` cut into rows of store indices (data/packing.py)
    layout: str = "grouped"  # data/packing.py: flat (a micro-batch a row), rows (packed) or grouped

    @property
    def micro_batch(self) -> int | None:
        """Rows a forward pass takes when flat (one: the micro-batch is the row), else None (the config's)."""
        return 1 if self.layout == "flat" and self.rows is not None else None

    @property
    def remaining_order(self) -> list[int]:
        return self.order[self.done_steps * self.examples_per_step:]

    @property
    def remaining_rows(self) -> list[list[int]]:
        return (self.rows or [])[self.done_steps * self.examples_per_step:]

    def examples_of_step(self, run_step: int) -> list[int]:
        """Store indices of the examples trained by the ``run_step``-th step of the run (0-based)."""
        a, b = run_step * self.examples_per_step, (run_step + 1) * self.examples_per_step
        return [i for row in self.rows[a:b] for i in row] if self.rows is not None else self.order[a:b]


@dataclass
class RunState:
    """What one run knows, filled in phase by phase."""

    cfg: Config
    files: list[Path]
    reporter: StatusReporter
    stop: StopFlag
    max_steps: int | None = None
    start: ck.StartPoint | None = None
    base_path: str = ""
    tokenizer: Any = None
    prepared: Any = None  # data.prepare.Prepared
    hashes: list[str] = field(default_factory=list)
    plan: RunPlan | None = None
    steps_now: int = 0
    device: str = "cpu"
    model: Any = None
    replay: Any = None  # data.replay.Replay: the earlier lines mixed into this run
    rehearsal: Any = None  # data.rehearsal.Rehearsal: the base's own answers mixed into this run
    started_at: str = field(default_factory=now_iso)
    world: World = field(default_factory=World)  # rank 0 alone writes status, reports and markers
    session: Any = None  # trainer.session.Session: a worker's loaded tokenizer and model, reused when they fit

    def checkpoint_meta(self, global_step: int) -> dict[str, Any]:
        """The marker of a checkpoint saved at ``global_step`` of this run."""
        assert self.plan is not None and self.start is not None
        cfg, start = self.cfg, self.start
        parent = start.consolidation.path.name if start.consolidation else start.checkpoint.name if start.checkpoint \
            else None
        return ck.marker_meta(
            global_step=global_step, run_id=self.plan.run_id,
            run_step=self.plan.done_steps + global_step - start.global_step,
            run_total_steps=self.plan.total_steps,
            files=lineage.run_files(self.files, self.prepared.reports, self.started_at),
            run_started_at=self.started_at, parent={"kind": start.kind, "name": parent},
            base_model=str(self.base_path), base_model_name=cfg.base_model, load_in_4bit=cfg.load_in_4bit,
            lora={"r": cfg.lora.r, "alpha": cfg.lora.alpha}, world_size=self.world.size,
            distributed=cfg.training.distributed if self.world.size > 1 else None,
            examples_per_step=self.plan.examples_per_step * (cfg.training.batch_size if self.plan.micro_batch else 1)
        ) | ({"replay": {"examples": self.prepared.replay_examples, "files": self.replay.sources}} if self.replay else {}
             ) | ({"rehearsal": self.rehearsal_record()} if self.rehearsal else {})

    def rehearsal_record(self) -> dict[str, Any]:
        """What the checkpoint marker and training_status.json say of the run's rehearsal."""
        return {"examples": self.prepared.rehearsal_examples, "answers": self.rehearsal.answers,
                "prompts_file": self.rehearsal.prompts_file}


def run_id_for(file_hashes: list[str], cfg: Config, layout: str = "grouped", step_scale: int = 1) -> str:
    """Same files (by content) + same data-order settings = same run, so a crash can be continued."""
    key = {"files": sorted(file_hashes), **{k: getattr(cfg.training, k) for k in DATA_ORDER_KEYS}}
    if layout == "rows":
        key["packed"] = True  # rows, not examples, make a step: another plan
    elif layout == "flat":
        key["packed"] = "flat"  # the plan's own order, not length-grouped: another plan
    if step_scale != 1:
        key["step_scale"] = step_scale  # a step of world_size x the configured examples: another plan
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def plan_run(n_examples: int, run_id: str, cfg: Config, resume: ck.CheckpointInfo | None,
             lengths: Any = None, layout: str = "grouped", step_scale: int = 1) -> RunPlan:
    """The run's order; with ``lengths`` also its batches (data/packing.py ``layout`` kinds: padding-free
    micro-batches a row each, packed rows, or length-grouped examples).

    ``step_scale`` > 1: the ranks' accumulation could not be split (``distributed.accumulation``),
    so a step trains that many times the configured examples.
    """
    import numpy as np

    from ultimate_trainer.data.packing import lay_out

    per_step = cfg.training.gradient_accumulation_steps * step_scale  # flat: rows (micro-batches) per step
    if layout != "flat" or lengths is None:
        per_step *= cfg.training.batch_size  # examples, or packed rows, per step
    total_examples = max(1, math.ceil(cfg.training.epochs_per_file * n_examples)) if n_examples else 0
    rng = np.random.default_rng([cfg.training.seed, int(run_id, 16) % (2**32)])
    order: list[int] = []
    while len(order) < total_examples:
        order.extend(rng.permutation(n_examples).tolist())
    order = order[:total_examples]
    rows = None
    if lengths is not None:
        order, rows = lay_out(order, lengths, cfg.training.batch_size, cfg.training.max_seq_length,
                              cfg.training.seed, layout)
    units = len(rows) if rows is not None else total_examples
    total_steps = math.ceil(units / per_step)
    per_epoch = units * n_examples / total_examples if total_examples else 0
    done = min(ck.steps_done(resume.meta, run_id), total_steps) if resume is not None else 0
    return RunPlan(run_id, order, per_step, total_steps, done, max(1, math.ceil(per_epoch / per_step)), rows,
                   layout if lengths is not None else "grouped")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


# --------------------------------------------------------------------------- the run

def run(cfg: Config, files: list[Path], *, max_steps: int | None = None, dry_run: bool = False,
        stop: StopFlag | None = None, session: Any = None) -> int:
    """Train on ``files`` from wherever the last run ended. Returns the process exit code.

    ``session`` (trainer/session.py): the worker's already loaded tokenizer and model, used when they
    fit this run's start point; ``train.py`` passes none and loads them.
    """
    stop = stop or StopFlag()
    world = World.from_env()
    reporter = StatusReporter(cfg.path("status"), cfg.path("checkpoints"), cfg.status.interval_seconds,
                              cfg.eval.recent_examples, live=not dry_run and world.is_main)
    reporter.update(current_files=[f.name for f in files], base_model=cfg.base_model, load_in_4bit=cfg.load_in_4bit)
    reporter.set_state("loading")
    reporter.start()
    reporter.update(world_size=world.size)
    state = RunState(cfg, files, reporter, stop, max_steps=max_steps, world=world, session=session)
    try:
        return _recipe(state, dry_run)
    except (StopRequested, Stopped) as e:
        log.info("stopped before training started%s; nothing to save", f" ({e})" if str(e) else "")
        reporter.set_state("idle")
        return Exit.OK
    except ModelError as e:
        return _fail(reporter, Exit.MODEL, str(e))
    except Diverged as e:  # the guard stopped the run; the updates it caught were never applied
        return _fail(reporter, Exit.DIVERGED, e.reason)
    except MemoryError:
        return _fail(reporter, Exit.CRASH, "out of memory (lower training.batch_size or training.max_seq_length)")
    except Exception as e:
        log.exception("training failed")
        reason = _one_line(e)
        if "No space left on device" in reason or getattr(e, "errno", None) == errno.ENOSPC:
            reason = (f"disk full while writing ({reason}): free space under {cfg.path('checkpoints')} "
                      f"(the unfinished checkpoint is set aside at the next start)")
        reason = collective_failure(reason, cfg, world) or reason
        return _fail(reporter, Exit.CRASH, reason)
    finally:
        reporter.stop()
        shutil.rmtree(world.rank_path(cfg.path("work") / "current"), ignore_errors=True)
        world.rank_path(cfg.path("work") / "current-replay.jsonl").unlink(missing_ok=True)
        world.rank_path(cfg.path("work") / "current-rehearsal.jsonl").unlink(missing_ok=True)


def _recipe(run: RunState, dry_run: bool) -> int:
    reporter = run.reporter

    # 0. Ranks: with several processes, join the others first (rank 0 prepares what they wait for).
    if run.world.size > 1 and not dry_run:
        from ultimate_trainer.model.loading import pick_device
        from ultimate_trainer.trainer import distributed

        distributed.init_process_group(run.cfg, run.world, pick_device(run.cfg))

    # 1. Start point: it decides which base weights (and so which tokenizer) this run continues.
    problem = find_start(run, quarantine=not dry_run)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return Exit.CONFIG

    # 2. Tokenizer of that base (a worker's session keeps it while the base stays the same).
    from ultimate_trainer.model.loading import load_tokenizer

    run.tokenizer = run.session.tokenizer_for(run.base_path) if run.session else load_tokenizer(run.base_path)
    run.stop.check()

    # 3. Data: read, hold out, tokenize (streaming, chunked, into a memory-mapped store).
    reporter.set_state("tokenizing")
    prepare_data(run, write_reports=not dry_run, rehearse=not dry_run)
    if dry_run:
        return print_dry_run(run)
    if run.prepared.unusable:
        for path, reason in run.prepared.unusable:
            print(f"error: {path}: {reason}", file=sys.stderr)
        reporter.set_state("error", error="; ".join(f"{Path(p).name}: {r}" for p, r in run.prepared.unusable))
        return Exit.DATA
    run.stop.check()

    # 4. Plan: which examples, in which order, how many steps; continue an interrupted attempt.
    if not plan(run):
        log.info("nothing to train: run %s is already complete", run.plan.run_id)
        reporter.set_state("idle")
        return Exit.OK

    # 5. Model: the base (4-bit or not) and the adapter to continue, or a fresh one.
    load_model(run)
    run.stop.check()

    # 6. Train: evaluate every eval_steps, save every save_steps and at the end of the run.
    train(run)

    # 7. Done: the last checkpoint is sealed; say so.
    reporter.refresh_checkpoints()
    reporter.set_state("idle", eta_seconds=0.0)
    return Exit.OK


def _fail(reporter: StatusReporter, code: Exit, reason: str) -> int:
    print(f"error: {reason}", file=sys.stderr)
    reporter.set_state("error", error=reason)
    return code


# --------------------------------------------------------------------------- the phases

def find_start(run: RunState, quarantine: bool) -> str | None:
    """Fill ``run.start`` and ``run.base_path``; a one-line problem when the checkpoints belong to another model."""
    cfg = run.cfg
    ckpt_dir, models_dir = cfg.path("checkpoints"), cfg.path("models")
    if quarantine and run.world.is_main:
        ck.quarantine_incomplete(ckpt_dir)
    if run.world.size > 1:
        from ultimate_trainer.trainer import distributed

        distributed.barrier()  # every rank sees the checkpoints after rank 0 set the incomplete ones aside
    start = run.start = ck.start_point(ckpt_dir, models_dir)
    trained_on = start.checkpoint.meta.get("base_model_name") if start.checkpoint else None
    if start.kind == "checkpoint" and trained_on not in (None, cfg.base_model):
        return (f"{ckpt_dir} continues {trained_on!r} but base_model is {cfg.base_model!r}: set base_model back, "
                f"or point paths.checkpoints at a new folder to start another model")
    run.base_path = _base_path(cfg, start)
    return None


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


def prepare_data(run: RunState, write_reports: bool, rehearse: bool = True) -> None:
    """Tokenize the run's files, its replay and (unless ``rehearse`` is off: a dry run loads no model) its rehearsal."""
    from ultimate_trainer.data import prepare
    from ultimate_trainer.data.replay import digest_files

    # Each rank tokenizes into its own store (the same tokens: tokenizing is deterministic); rank 0 reports.
    work = run.cfg.path("work")
    store_dir = run.world.rank_path(work / "current")
    shutil.rmtree(store_dir, ignore_errors=True)
    digests = digest_files(run.files)
    run.replay = replay_for(run, run.world.rank_path(work / "current-replay.jsonl"), digests)
    if rehearse:
        run.rehearsal = rehearsal_for(run, run.world.rank_path(work / "current-rehearsal.jsonl"), digests)
    session = run.session
    run.prepared = prepare.prepare(run.files, run.tokenizer, run.cfg, store_dir,
                                   run.cfg.path("status") if write_reports and run.world.is_main else None,
                                   replay_file=run.replay.path if run.replay else None,
                                   rehearsal_file=run.rehearsal.path if run.rehearsal else None,
                                   cache_dir=session.cache_dir if session is not None else None)
    if session is not None:  # the worker reports the hits and removes the entries once the run is over
        session.cache_hits, session.cache_used = run.prepared.cache_hits, run.prepared.cache_used
    run.hashes = [run.prepared.reports[str(f)]["sha256"] for f in run.files]
    if run.replay:
        run.reporter.update(replay={"examples": run.prepared.replay_examples, "files": run.replay.sources})
    if run.rehearsal:
        run.reporter.update(rehearsal=run.rehearsal_record())


def replay_for(run: RunState, out: Path, digests: tuple[list[str], int] | None = None) -> Any:
    """This run's replay of earlier files (``data/replay.py``), drawn by the id of its files; None when off."""
    from ultimate_trainer.data.replay import write_replay

    cfg = run.cfg
    return write_replay(run.files, cfg, cfg.path("queue") / "done", out, lambda hashes: run_id_for(hashes, cfg),
                        cfg.path("status"), digests)


def rehearsal_for(run: RunState, out: Path, digests: tuple[list[str], int]) -> Any:
    """This run's rehearsal (``data/rehearsal.py``): the base's own answers, drawn by the id of its files."""
    from ultimate_trainer.trainer.rehearsal import rehearsal_for as draw

    shas, lines = digests
    return draw(run.cfg, run.base_path, run.tokenizer, lines, run_id_for(shas, run.cfg), out, session=run.session,
                track=lambda total: run.reporter.progress("rehearsal answers", total, "prompts", run.stop.stopped))


def print_dry_run(run: RunState) -> int:
    from ultimate_trainer.data import prepare

    for path, report in run.prepared.reports.items():
        for bad in report["bad"]:
            print(st.bad_entry_text(Path(path).name, bad), file=sys.stderr)
        for warning in report["warnings"]:
            print(f"{Path(path).name}: warning: {warning}", file=sys.stderr)
    print(json.dumps(prepare.summarize(run.prepared, run.cfg.training.max_seq_length), indent=2))
    return Exit.DATA if run.prepared.unusable else Exit.OK


def plan(run: RunState) -> bool:
    """Fill ``run.plan`` and ``run.steps_now``; False when the run has nothing left to train."""
    from ultimate_trainer.data.packing import layout
    from ultimate_trainer.trainer.distributed import accumulation

    cfg, lengths = run.cfg, run.prepared.train.lengths
    kind = layout(cfg.training.packing)
    _, scale = accumulation(cfg.training.gradient_accumulation_steps, run.world.size)
    if scale != 1:
        log.warning("training.gradient_accumulation_steps (%d) does not divide by the %d processes: a step trains "
                    "%d x %d x %d examples (or rows) instead of %d x %d; choose a multiple of %d to keep a step's size",
                    cfg.training.gradient_accumulation_steps, run.world.size, cfg.training.batch_size,
                    cfg.training.gradient_accumulation_steps, scale, cfg.training.batch_size,
                    cfg.training.gradient_accumulation_steps, run.world.size)
    run_id = run_id_for(run.hashes, cfg, kind, scale)
    p = run.plan = plan_run(len(run.prepared.train), run_id, cfg, run.start.checkpoint, lengths, kind, scale)
    run.steps_now = p.total_steps - p.done_steps
    if run.max_steps is not None:
        run.steps_now = min(run.steps_now, run.max_steps)
    run.reporter.update(run_id=run_id, run_step=p.done_steps, run_total_steps=p.total_steps,
                        global_step=run.start.global_step, epoch=p.done_steps / p.steps_per_epoch)
    if p.done_steps:
        log.info("continuing interrupted run %s at run step %d of %d", run_id, p.done_steps, p.total_steps)
    return run.steps_now > 0


def load_model(run: RunState) -> None:
    """The base model and the adapter of the start point: resumed from its checkpoint, or fresh."""
    from ultimate_trainer.model.loading import pick_device

    cfg, session = run.cfg, run.session
    checkpoint = run.start.checkpoint.path if run.start.kind == "checkpoint" else None
    why = session.reusable(cfg, run.base_path, run.start.kind, checkpoint) if session else "no session"
    if why is None:  # the Trainer loads the checkpoint's adapter weights into it (trainer/session.py)
        run.model, run.device = session.model, session.device
        run.reporter.set_state("loading", device=run.device)
        log.info("model kept loaded from the previous run")
        return
    if session:
        session.drop()
        log.info("loading the model: %s", why)
    run.device = pick_device(cfg)
    run.reporter.set_state("loading", device=run.device)
    run.model = _model_with_adapter(cfg, run.base_path, run.device, checkpoint)
    if session:
        session.hold(cfg, run.base_path, run.model, run.device, checkpoint, why)


def _model_with_adapter(cfg: Config, base_path: str, device: str, checkpoint: Path | None) -> Any:
    import torch

    from ultimate_trainer.model.loading import attach_lora, load_base_model

    model = load_base_model(cfg, base_path, quantize=cfg.load_in_4bit, device=device)
    if checkpoint is not None:
        return attach_lora(cfg, model, adapter_dir=str(checkpoint))
    torch.manual_seed(cfg.training.seed)  # the fresh adapter's init is reproducible
    return attach_lora(cfg, model)


def preload(cfg: Config, session: Any) -> None:
    """Load into ``session`` what the next run will start from, while no run waits (the worker's start).

    Best effort: anything that goes wrong here is left for the run itself to meet and report.
    """
    from ultimate_trainer.model.loading import pick_device

    try:
        start = ck.start_point(cfg.path("checkpoints"), cfg.path("models"))
        trained_on = start.checkpoint.meta.get("base_model_name") if start.checkpoint else None
        if start.kind == "consolidation" or trained_on not in (None, cfg.base_model):
            return  # a bootstrap with a fresh adapter, or a refusal: the run's own business
        base_path = _base_path(cfg, start)
        session.tokenizer_for(base_path)
        checkpoint = start.checkpoint.path if start.kind == "checkpoint" else None
        device = pick_device(cfg)
        session.hold(cfg, base_path, _model_with_adapter(cfg, base_path, device, checkpoint), device, checkpoint,
                     "preloaded before the first run")
    except Exception as e:  # noqa: BLE001 - the run reports it properly
        log.info("no preload (%s); the first run loads the model", _one_line(e))
        session.drop()


def train(run: RunState) -> None:
    """Hand the planned order to the Hugging Face Trainer and train ``run.steps_now`` steps."""
    from transformers.trainer_callback import PrinterCallback

    from ultimate_trainer.data.collate import Collator
    from ultimate_trainer.model.loading import compute_dtype
    from ultimate_trainer.model.scoring import AccuracyTracker
    from ultimate_trainer.trainer import distributed, hf, speed
    from ultimate_trainer.trainer.guard import GuardCallback, step_describer
    from ultimate_trainer.trainer.probe import probe_callback

    cfg, start, p, reporter, world = run.cfg, run.start, run.plan, run.reporter, run.world
    collator = Collator(run.tokenizer)
    tracker = AccuracyTracker.from_history(
        reporter.examples_history, reporter.evals_history, margin_last_20=cfg.eval.margin_last_20,
        margin_last_50=cfg.eval.margin_last_50, margin_trend=cfg.eval.margin_trend)
    reporter.update(accuracy=tracker.snapshot())

    args = hf.training_arguments(cfg, cfg.path("checkpoints"), start.global_step + run.steps_now, run.device,
                                 compute_dtype(cfg, run.device), world.size,
                                 distributed.engine_arguments(cfg, world, run.model), micro_batch=p.micro_batch)
    run_cb = hf.RunCallback(reporter, run.stop, start.global_step, p.done_steps, p.total_steps, p.steps_per_epoch,
                            [f.name for f in run.files], p.run_id, world)
    callbacks = [
        hf.ConfiguredLearningRate(cfg.training.learning_rate),  # first: the others' on_train_begin see it
        hf.EvalCallback(cfg, reporter, run.tokenizer, run.prepared.heldout, run.prepared.heldout_encoded, collator,
                        tracker, p.run_id, run.stop, run_cb.throughput),
        *filter(None, [probe_callback(cfg, reporter, run.tokenizer, tracker, run.base_path, p.run_id,
                                      run_cb.throughput, run.stop)]),  # after EvalCallback: it counts its evaluations
        run_cb,
        hf.SealCallback(reporter, run.checkpoint_meta),
        speed.ThreadGovernor(),
        guard := GuardCallback(cfg.guard, reporter, step_describer(run), p.run_id),  # last: it may stop the run
    ]
    resume_dir = str(start.checkpoint.path) if start.kind == "checkpoint" else None
    problem = distributed.optimizer_state_problem(start.checkpoint.meta, world.size, cfg.training.distributed) \
        if start.kind == "checkpoint" else None
    if problem:
        log.warning("%s: %s", start.checkpoint.name, problem)
    if (start.kind != "checkpoint" and start.global_step > 0) or problem:
        resume_dir = str(hf.write_bootstrap(run.model, world.rank_path(cfg.path("work") / "bootstrap"),
                                            start.global_step, args))
    train_dataset, train_collator = speed.training_data(run.prepared.train, p, run.tokenizer)
    trainer = hf.ContinuousTrainer(model=run.model, args=args, train_dataset=train_dataset,
                                   data_collator=train_collator, processing_class=run.tokenizer,
                                   callbacks=callbacks, cfg=cfg, loss_observers=[guard.observe_loss])
    trainer.remove_callback(PrinterCallback)  # RunCallback logs each step in one readable line
    if run.session:
        run.session.pristine = False  # trained from here on: no longer a fresh adapter
    log.info("run %s: %d examples%s, steps %d..%d of the run (global %d -> %d), base %s",
             p.run_id, len(run.prepared.train),
             f" in {len(p.rows)} {'padding-free micro-batches' if p.layout == 'flat' else 'packed rows'}"
             if p.rows is not None else "",
             p.done_steps, p.done_steps + run.steps_now, start.global_step, start.global_step + run.steps_now,
             run.base_path)
    trainer.train(resume_from_checkpoint=resume_dir)
