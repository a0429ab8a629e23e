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

The run arrives described (core/manifest.py: its files with their hashes and line counts, and the
earlier files it may replay); its id is computed once from that, and replay, rehearsal and the plan
all use it. Everything the phases build lands on one ``RunState``; nothing else is passed around.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config
from ultimate_trainer.core import lineage
from ultimate_trainer.core import manifest as mf
from ultimate_trainer.core.manifest import Manifest
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.progress import Stopped
from ultimate_trainer.core.records import CheckpointMarker
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.model.loading import ModelError
from ultimate_trainer.trainer.distributed import World, collective_failure
from ultimate_trainer.trainer.plan import RunPlan, plan_run
from ultimate_trainer.trainer.reporter import StatusReporter
from ultimate_trainer.trainer.stability import Diverged

if TYPE_CHECKING:  # the phases import these lazily: a dry run never loads torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from ultimate_trainer.data.prepare import Prepared
    from ultimate_trainer.data.replay import Replay
    from ultimate_trainer.trainer.rehearsal.prompts import Rehearsal
    from ultimate_trainer.trainer.session import Session
    from ultimate_trainer.trainer.control_rule import ControllerState

log = logging.getLogger(__name__)

class StopRequested(Exception):
    """SIGTERM/SIGINT arrived before training started: nothing to save, exit 0."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the training loop finishes its step, saves and stops. A second ^C aborts."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
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
class RunState:
    """What one run knows, filled in phase by phase."""

    cfg: Config
    manifest: Manifest  # the run's files (hashes, sizes, lines) and its replay sources, as handed down
    reporter: StatusReporter
    stop: StopFlag
    max_steps: int | None = None
    start: ck.StartPoint | None = None
    base_path: str = ""
    tokenizer: PreTrainedTokenizerBase | None = None  # the base's
    prepared: Prepared | None = None
    run_id: str = ""  # core/manifest.run_id of the files, the data-order settings, the layout and step scale
    layout: str = "grouped"  # data/packing.py's layout of training.packing
    step_scale: int = 1  # trainer/distributed.accumulation: > 1 when the ranks cannot split the accumulation
    plan: RunPlan | None = None
    steps_now: int = 0
    device: str = "cpu"
    model: PeftModel | None = None  # base + adapter
    replay: Replay | None = None  # the earlier lines mixed into this run
    rehearsal: Rehearsal | None = None  # the base's own answers mixed into this run
    started_at: str = field(default_factory=now_iso)
    world: World = field(default_factory=World)  # rank 0 alone writes status, reports and markers
    session: Session | None = None  # a worker's loaded tokenizer and model, reused when they fit
    control: ControllerState | None = None  # the retention-aware controller's state (None: off); trainer/controller.py
    rehearsal_share: float = 0.0  # this run's rehearsal share (the controller's, else training.rehearsal_fraction)
    cache_dir: Path | None = None  # a worker's prefetch cache (trainer/prefetch.py); None: tokenize here

    @property
    def files(self) -> list[Path]:
        return self.manifest.paths

    def replay_record(self) -> dict[str, Any]:
        """What the checkpoint marker and training_status.json say of the run's replay."""
        return {"examples": self.prepared.replay_examples, "files": self.replay.sources}

    def rehearsal_record(self) -> dict[str, Any]:
        """What the checkpoint marker and training_status.json say of the run's rehearsal."""
        from ultimate_trainer.trainer.speed import rehearsal_loss

        return {"examples": self.prepared.rehearsal_examples, "answers": self.rehearsal.answers,
                "prompts_file": self.rehearsal.prompts_file,
                "loss": rehearsal_loss(self.cfg, self.world.size)}


def run_marker(run: RunState) -> CheckpointMarker:
    """What every checkpoint of this run says of it; ``hf.SealCallback`` adds each save's step."""
    assert run.plan is not None and run.start is not None and run.prepared is not None
    cfg, start, p = run.cfg, run.start, run.plan
    parent = start.consolidation.path.name if start.consolidation else start.checkpoint.name if start.checkpoint \
        else None
    return ck.marker_meta(
        global_step=start.global_step, run_id=p.run_id, run_step=p.done_steps, run_total_steps=p.total_steps,
        files=lineage.run_files(run.files, run.prepared.reports, run.started_at),
        run_started_at=run.started_at, parent={"kind": start.kind, "name": parent},
        base_model=str(run.base_path), base_model_name=cfg.base_model, load_in_4bit=cfg.load_in_4bit,
        lora={"r": cfg.lora.r, "alpha": cfg.lora.alpha}, world_size=run.world.size,
        distributed=cfg.training.distributed if run.world.size > 1 else None,
        examples_per_step=p.examples_per_step * (cfg.training.batch_size if p.micro_batch else 1),
        replay=run.replay_record() if run.replay else None,
        rehearsal=run.rehearsal_record() if run.rehearsal else None,
        controller=run.control.to_json() if run.control is not None else None)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


# --------------------------------------------------------------------------- the run

@dataclass
class RunResult:
    """What a run hands back to whoever ran it (``train.py`` exits with ``code``; the worker reports the rest)."""

    code: int  # the process exit code (core/exitcodes.py)
    cache_hits: list[str] = field(default_factory=list)  # files taken from the prefetch cache (data/tokcache.py)
    cache_used: list[str] = field(default_factory=list)  # their cache entries: the worker removes them after the run


def run(cfg: Config, files: Manifest | list[Path], *, max_steps: int | None = None, dry_run: bool = False,
        stop: StopFlag | None = None, session: Session | None = None) -> int:
    """Train on the run ``files`` describes from wherever the last run ended. Returns the process exit code."""
    return execute(cfg, files, max_steps=max_steps, dry_run=dry_run, stop=stop, session=session).code


def execute(cfg: Config, files: Manifest | list[Path], *, max_steps: int | None = None, dry_run: bool = False,
            stop: StopFlag | None = None, session: Session | None = None, cache_dir: Path | None = None) -> RunResult:
    """``run``, with what the worker needs back: the exit code and the prefetch cache entries the run took.

    ``files``: the run's manifest (core/manifest.py), or its files alone (a run started by hand), for
    which it is built here.

    ``session`` (trainer/session.py): the worker's already loaded tokenizer and model, used when they
    fit this run's start point; ``train.py`` passes none and loads them. ``cache_dir``: where the
    worker's prefetch child left files tokenized ahead (trainer/prefetch.py); None: not used.
    """
    stop = stop or StopFlag()
    manifest = files if isinstance(files, Manifest) else mf.for_files(files, cfg)
    files = manifest.paths
    world = World.from_env()
    reporter = StatusReporter(cfg.path("status"), cfg.path("checkpoints"), cfg.status.interval_seconds,
                              cfg.eval.recent_examples, live=not dry_run and world.is_main)
    reporter.update(current_files=[f.name for f in files], base_model=cfg.base_model, load_in_4bit=cfg.load_in_4bit)
    reporter.set_state("loading")
    reporter.start()
    reporter.update(world_size=world.size)
    state = RunState(cfg, manifest, reporter, stop, max_steps=max_steps, world=world, session=session,
                     cache_dir=cache_dir)
    code = _run_guarded(state, dry_run)
    p = state.prepared
    return RunResult(code, p.cache_hits if p else [], p.cache_used if p else [])


def _run_guarded(state: RunState, dry_run: bool) -> int:
    """``_recipe``, every way it can end turned into an exit code and the status file's last word."""
    cfg, reporter, world = state.cfg, state.reporter, state.world
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

    # 1. Identity: the run id, from the files' hashes, the data-order settings and the layout; the
    #    replay, the rehearsal and the plan are all drawn by it.
    identify(run)

    # 2. Start point: it decides which base weights (and so which tokenizer) this run continues.
    problem = find_start(run, quarantine=not dry_run)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return Exit.CONFIG

    # 3. Tokenizer of that base (a worker's session keeps it while the base stays the same).
    from ultimate_trainer.model.loading import load_tokenizer

    run.tokenizer = run.session.tokenizer_for(run.base_path) if run.session else load_tokenizer(run.base_path)
    run.stop.check()

    # 4. Data: read, hold out, tokenize (streaming, chunked, into a memory-mapped store).
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

    # 5. Plan: which examples, in which order, how many steps; continue an interrupted attempt.
    if not plan(run):
        log.info("nothing to train: run %s is already complete", run.plan.run_id)
        reporter.set_state("idle")
        return Exit.OK

    # 6. Model: the base (4-bit or not) and the adapter to continue, or a fresh one.
    load_model(run)
    run.stop.check()

    # 7. Train: evaluate every eval_steps, save every save_steps and at the end of the run.
    train(run)

    # 8. Done: the last checkpoint is sealed; say so.
    reporter.refresh_checkpoints()
    reporter.set_state("idle", eta_seconds=0.0)
    return Exit.OK


def _fail(reporter: StatusReporter, code: Exit, reason: str) -> int:
    print(f"error: {reason}", file=sys.stderr)
    reporter.set_state("error", error=reason)
    return code


# --------------------------------------------------------------------------- the phases

def identify(run: RunState) -> None:
    """Fill ``run.run_id`` (core/manifest.run_id), ``run.layout`` and ``run.step_scale``."""
    from ultimate_trainer.data.packing import layout
    from ultimate_trainer.trainer.distributed import accumulation

    cfg = run.cfg
    run.layout = layout(cfg.training.packing)
    _, run.step_scale = accumulation(cfg.training.gradient_accumulation_steps, run.world.size)
    run.run_id = run.manifest.run_id(cfg, run.layout, run.step_scale)


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
    trained_on = start.checkpoint.marker.base_model_name if start.checkpoint else None
    if start.kind == "checkpoint" and trained_on not in (None, cfg.base_model):
        return (f"{ckpt_dir} continues {trained_on!r} but base_model is {cfg.base_model!r}: set base_model back, "
                f"or point paths.checkpoints at a new folder to start another model")
    run.base_path = base_path_for(cfg, start)
    return None


def base_path_for(cfg: Config, start: ck.StartPoint) -> str:
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

    # Each rank tokenizes into its own store (the same tokens: tokenizing is deterministic); rank 0 reports.
    work = run.cfg.path("work")
    store_dir = run.world.rank_path(work / "current")
    shutil.rmtree(store_dir, ignore_errors=True)
    run.replay = replay_for(run, run.world.rank_path(work / "current-replay.jsonl"))
    start_control(run)
    if rehearse:
        run.rehearsal = rehearsal_for(run, run.world.rank_path(work / "current-rehearsal.jsonl"))
    run.prepared = prepare.prepare(run.manifest.files, run.tokenizer, run.cfg, store_dir,
                                   run.cfg.path("status") if write_reports and run.world.is_main else None,
                                   replay_file=run.replay.path if run.replay else None,
                                   rehearsal_file=run.rehearsal.path if run.rehearsal else None,
                                   cache_dir=run.cache_dir)
    if run.replay:
        run.reporter.update(replay=run.replay_record())
    if run.rehearsal:
        run.reporter.update(rehearsal=run.rehearsal_record())


def start_control(run: RunState) -> None:
    """The retention-aware controller's state this run starts from (``run.control``) and the run's rehearsal share.

    The state is the start point's checkpoint marker's (after a consolidation: its source checkpoint's),
    the initial one when there is none. An interrupted run being continued keeps the share it started
    with, so that it draws the same rehearsal lines and its plan stays the same."""
    from ultimate_trainer.trainer.control_rule import ControllerState, run_share

    cfg, checkpoint = run.cfg, run.start.checkpoint if run.start else None
    if not cfg.controller.enabled:
        run.control, run.rehearsal_share = None, cfg.training.rehearsal_fraction
        return
    marker = checkpoint.marker if checkpoint is not None else None
    run.control = ControllerState.from_json(marker.controller if marker is not None else None)
    continuing = marker is not None and ck.steps_done(marker, run.run_id) > 0
    run.rehearsal_share = run_share(run.control, cfg, continuing)
    run.control.run_rehearsal_fraction = run.rehearsal_share
    if run.control.lr_scale != 1.0 or run.rehearsal_share != cfg.training.rehearsal_fraction:
        log.info("retention-aware controller: learning rate x%g (%g), rehearsal share %g (configured %g)%s",
                 run.control.lr_scale, cfg.training.learning_rate * run.control.lr_scale, run.rehearsal_share,
                 cfg.training.rehearsal_fraction, f", from {checkpoint.name}" if checkpoint is not None else "")


def replay_for(run: RunState, out: Path) -> Replay | None:
    """This run's replay of the manifest's earlier files (``data/replay.py``), drawn by the run id; None when off."""
    from ultimate_trainer.data.replay import write_replay

    return write_replay(run.manifest, run.cfg, out, run.run_id)


def rehearsal_for(run: RunState, out: Path) -> Rehearsal | None:
    """This run's rehearsal (``trainer/rehearsal/``): the base's own answers, drawn by the run id."""
    import dataclasses

    from ultimate_trainer.trainer.rehearsal.answers import rehearsal_for as draw

    cfg = run.cfg
    if run.rehearsal_share != cfg.training.rehearsal_fraction:  # the controller's share for this run
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, rehearsal_fraction=run.rehearsal_share))
    return draw(cfg, run.base_path, run.tokenizer, run.manifest.lines, run.run_id, out, session=run.session,
                track=lambda total: run.reporter.progress("rehearsal answers", total, "prompts", run.stop.stopped))


def print_dry_run(run: RunState) -> int:
    from ultimate_trainer.data import prepare

    for path, report in run.prepared.reports.items():
        for bad in report.bad:
            print(st.bad_entry_text(Path(path).name, bad), file=sys.stderr)
        for warning in report.warnings:
            print(f"{Path(path).name}: warning: {warning}", file=sys.stderr)
    print(json.dumps(prepare.summarize(run.prepared, run.cfg.training.max_seq_length), indent=2))
    return Exit.DATA if run.prepared.unusable else Exit.OK


def plan(run: RunState) -> bool:
    """Fill ``run.plan`` and ``run.steps_now``; False when the run has nothing left to train."""
    cfg, lengths = run.cfg, run.prepared.train.lengths
    kind, scale, run_id = run.layout, run.step_scale, run.run_id
    if scale != 1:
        log.warning("training.gradient_accumulation_steps (%d) does not divide by the %d processes: a step trains "
                    "%d x %d x %d examples (or rows) instead of %d x %d; choose a multiple of %d to keep a step's size",
                    cfg.training.gradient_accumulation_steps, run.world.size, cfg.training.batch_size,
                    cfg.training.gradient_accumulation_steps, scale, cfg.training.batch_size,
                    cfg.training.gradient_accumulation_steps, run.world.size)
    p = run.plan = plan_run(len(run.prepared.train), run_id, cfg, run.start.checkpoint, lengths, kind, scale)
    p.start_step = run.start.global_step
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


def _model_with_adapter(cfg: Config, base_path: str, device: str, checkpoint: Path | None) -> PeftModel:
    import torch

    from ultimate_trainer.model.loading import attach_lora, load_base_model

    model = load_base_model(cfg, base_path, quantize=cfg.load_in_4bit, device=device)
    if checkpoint is not None:
        return attach_lora(cfg, model, adapter_dir=str(checkpoint))
    torch.manual_seed(cfg.training.seed)  # the fresh adapter's init is reproducible
    return attach_lora(cfg, model)


def preload(cfg: Config, session: Session) -> None:
    """Load into ``session`` what the next run will start from, while no run waits (the worker's start).

    Best effort: anything that goes wrong here is left for the run itself to meet and report.
    """
    from ultimate_trainer.model.loading import pick_device

    try:
        start = ck.start_point(cfg.path("checkpoints"), cfg.path("models"))
        trained_on = start.checkpoint.marker.base_model_name if start.checkpoint else None
        if start.kind == "consolidation" or trained_on not in (None, cfg.base_model):
            return  # a bootstrap with a fresh adapter, or a refusal: the run's own business
        base_path = base_path_for(cfg, start)
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
    from ultimate_trainer.trainer.guard import GuardCallback, step_describer, step_sources
    from ultimate_trainer.trainer.controller import ControllerCallback
    from ultimate_trainer.trainer.control_rule import lr_scale
    from ultimate_trainer.trainer.probe.callback import probe_callback
    from ultimate_trainer.trainer.reporter import Throughput

    cfg, start, p, reporter, world = run.cfg, run.start, run.plan, run.reporter, run.world
    collator = Collator(run.tokenizer)
    tracker = AccuracyTracker.from_history(
        reporter.examples_history, reporter.evals_history, margin_last_20=cfg.eval.margin_last_20,
        margin_last_50=cfg.eval.margin_last_50, margin_trend=cfg.eval.margin_trend)
    reporter.update(accuracy=tracker.snapshot())

    args = hf.training_arguments(cfg, cfg.path("checkpoints"), start.global_step + run.steps_now, run.device,
                                 compute_dtype(cfg, run.device), world.size,
                                 distributed.engine_arguments(cfg, world, run.model), micro_batch=p.micro_batch)

    # What one run does around the Trainer's own loop, in the order the Trainer calls the callbacks at
    # each event (the list's order). Each callback keeps its own state; what another needs it is
    # handed explicitly (the throughput meter, the guard's stability), never through the reporter.
    #
    #   callback                 events                      contributes
    #   ConfiguredLearningRate   train_begin                 the configured LR (x the controller's scale) over the
    #                                                        checkpoint's schedule; first, so the others see it
    #   EvalCallback             train_begin, step_end       held-out answers and validation loss, every
    #                                                        eval_steps and at the run's end (evals.jsonl)
    #   ProbeCallback (if any)   train_begin, step_end       the base-knowledge probe; after EvalCallback,
    #                                                        whose evaluations it counts
    #   ControllerCallback       train_begin, step_end       the retention-aware controller (if on): after each
    #     (if on)                                            probe, the learning rate's scale (applied to the
    #                                                        scheduler now) and the rehearsal share (this run:
    #                                                        the loss's weights; the next run: drawn); before
    #                                                        SealCallback, whose marker carries its state
    #   RunCallback              train_begin, step_end, log  training_status.json and steps.jsonl; the stop
    #                                                        request (all ranks agree) and the run's last save
    #   SealCallback             step_end, save              the "saving" state; the marker sealing each
    #                                                        checkpoint the Trainer just wrote
    #   ThreadGovernor           train_begin, step_end       CPU threads for the step (speed.py)
    #   GuardCallback            step_begin, pre_optimizer,  the divergence guard: skips an anomalous update
    #                            step_end                    before it is applied; last, as it may stop the run
    #
    # The loss itself is hf.ContinuousTrainer.compute_loss (packed inputs, the chunked loss, the rehearsal
    # lines' loss (the base's distribution distilled) and weight (the controller's)), which hands each
    # micro-batch's plain loss to the guard's observe_loss.
    throughput = Throughput()  # trained tokens/s, with the time of evaluations and probes left out
    guard = GuardCallback(cfg.guard, reporter, step_describer(p, run.prepared, run.files, run.tokenizer), p.run_id,
                          step_sources(p, run.prepared, run.files),
                          cfg.path("status") / st.GUARD_WINDOW, world)
    evaluation = hf.EvalCallback(cfg, reporter, run.tokenizer, run.prepared.heldout, run.prepared.heldout_encoded,
                                 collator, tracker, p.run_id, run.stop, throughput)
    probe = probe_callback(cfg, reporter, run.tokenizer, tracker, run.base_path, p.run_id, throughput,
                           run.stop)
    status = hf.RunCallback(reporter, run.stop, p, [f.name for f in run.files], guard, throughput, world)
    controller = ControllerCallback(cfg, reporter, run.control, run.rehearsal_share, evaluation, probe, p.run_id,
                                    world) if run.control is not None else None
    scale = lr_scale(run.control, cfg) if run.control is not None else 1.0
    if controller is None:
        reporter.update(controller={"enabled": False, "lr_scale": 1.0, "learning_rate": cfg.training.learning_rate,
                                    "configured_learning_rate": cfg.training.learning_rate,
                                    "rehearsal_fraction": run.rehearsal_share,
                                    "next_rehearsal_fraction": cfg.training.rehearsal_fraction,
                                    "rehearsal_weight": 1.0,
                                    "configured_rehearsal_fraction": cfg.training.rehearsal_fraction,
                                    "decisions": {}, "last": None})
    callbacks = [hf.ConfiguredLearningRate(cfg.training.learning_rate, scale), evaluation,
                 *filter(None, [probe, controller]), status,
                 hf.SealCallback(reporter, run_marker(run), p, run.control),
                 speed.ThreadGovernor(), guard]
    resume_dir = str(start.checkpoint.path) if start.kind == "checkpoint" else None
    problem = distributed.optimizer_state_problem(start.checkpoint.marker, world.size, cfg.training.distributed) \
        if start.kind == "checkpoint" else None
    if problem:
        log.warning("%s: %s", start.checkpoint.name, problem)
    if (start.kind != "checkpoint" and start.global_step > 0) or problem:
        resume_dir = str(hf.write_bootstrap(run.model, world.rank_path(cfg.path("work") / "bootstrap"),
                                            start.global_step, args))
    train_dataset, train_collator = speed.training_data(
        run.prepared.train, p, run.tokenizer, speed.rehearsal_from(run.prepared, cfg, controller is not None))
    trainer = hf.ContinuousTrainer(model=run.model, args=args, train_dataset=train_dataset,
                                   data_collator=train_collator, processing_class=run.tokenizer,
                                   callbacks=callbacks, cfg=cfg, loss_observers=[guard.observe_loss],
                                   token_weights=controller.token_weights if controller is not None else None)
    trainer.remove_callback(PrinterCallback)  # RunCallback logs each step in one readable line
    if run.session:
        run.session.training()  # the held adapter is no longer a fresh one
    log.info("run %s: %d examples%s, steps %d..%d of the run (global %d -> %d), base %s",
             p.run_id, len(run.prepared.train),
             f" in {len(p.rows)} {'padding-free micro-batches' if p.layout == 'flat' else 'packed rows'}"
             if p.rows is not None else "",
             p.done_steps, p.done_steps + run.steps_now, start.global_step, start.global_step + run.steps_now,
             run.base_path)
    trainer.train(resume_from_checkpoint=resume_dir)
