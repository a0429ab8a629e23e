"""Complete-or-absent checkpoints, consolidations, and the choice of where a run starts.

A checkpoint is ``checkpoints/checkpoint-<global_step>/``: the Hugging Face Trainer's files
(adapter, optimizer, scheduler, RNG, trainer_state.json) and, written last after every other file
has been fsynced, ``ut_checkpoint.json``. A folder without that marker was cut short (a kill, a
full disk) and is never resumed from: at start it is moved aside into ``checkpoints/.incomplete/``
(nothing is deleted). Only names matching ``checkpoint-<digits>`` count, so stray folders are ignored.

A consolidation is ``models/consolidated/<timestamp>/`` with ``manifest.json`` written last
(see docs/DAEMON.md). When the newest consolidation is at least as new as the newest checkpoint,
training continues on the consolidated weights with a fresh adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ultimate_trainer.core.records import CheckpointMarker
from ultimate_trainer.core.status import atomic_write_json, read_json
from ultimate_trainer.core.times import now_iso

log = logging.getLogger(__name__)

MARKER = "ut_checkpoint.json"
MANIFEST = "manifest.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_DIR = ".incomplete"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    global_step: int
    marker: CheckpointMarker  # its ut_checkpoint.json, read once (core/records.py)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def meta(self) -> dict[str, Any]:
        """The marker as its file's JSON object (a missing field at its default)."""
        return self.marker.to_json()


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def marker_meta(*, global_step: int, run_id: str, run_step: int, run_total_steps: int,
                files: list[dict[str, Any]], base_model: str, base_model_name: str | None = None,
                load_in_4bit: bool | None = None, lora: dict[str, Any] | None = None,
                run_started_at: str | None = None, parent: dict[str, Any] | None = None, world_size: int = 1,
                distributed: str | None = None, examples_per_step: int | None = None,
                replay: dict[str, Any] | None = None, rehearsal: dict[str, Any] | None = None,
                controller: dict[str, Any] | None = None) -> CheckpointMarker:
    """The marker of a checkpoint (``CheckpointMarker``, core/records.py; docs/STATUS.md); ``mark_complete``
    stamps its ``created_at``.

    ``files`` lists the run's input files, each ``{"name", "sha256", "size", "examples",
    "trained_at"}`` (``core/lineage.run_files``); ``run_complete`` says whether this checkpoint ends
    its run (a checkpoint saved part-way lets the run be continued); ``parent`` is where the run
    started (``{"kind": "fresh" | "checkpoint" | "consolidation", "name"}``), for the lineage.
    ``world_size`` and ``distributed`` (ddp, fsdp, deepspeed; None for one process) say how the
    optimizer state was saved; ``examples_per_step`` what one of its steps trained.
    """
    return CheckpointMarker(
        global_step=global_step, run_id=run_id, run_step=run_step, run_total_steps=run_total_steps,
        run_complete=run_step >= run_total_steps, files=files, run_started_at=run_started_at, parent=parent,
        base_model=base_model, base_model_name=base_model_name, load_in_4bit=load_in_4bit, lora=lora,
        world_size=world_size, distributed=distributed, examples_per_step=examples_per_step, replay=replay,
        rehearsal=rehearsal, controller=controller)


def _marker(marker: CheckpointMarker | dict[str, Any]) -> CheckpointMarker:
    """A marker as its record; a dict (a marker file's object, from callers that still hold one) parsed."""
    return marker if isinstance(marker, CheckpointMarker) else CheckpointMarker.from_json(marker) or CheckpointMarker()


def run_complete(marker: CheckpointMarker | dict[str, Any]) -> bool:
    """Whether the checkpoint ends its run. Markers older than the field count as complete."""
    return _marker(marker).run_complete


def steps_done(marker: CheckpointMarker | dict[str, Any], run_id: str) -> int:
    """Run steps of ``run_id`` already trained, when this checkpoint cut that run short; else 0."""
    marker = _marker(marker)
    if marker.run_id != run_id or marker.run_complete:
        return 0
    return max(marker.run_step, 0)


def completes_files(marker: CheckpointMarker | dict[str, Any], sha256s: list[str]) -> bool:
    """Whether the checkpoint ends a run over exactly these files (by content)."""
    marker = _marker(marker)
    trained = sorted(f.get("sha256", "") for f in marker.files if isinstance(f, dict))
    return marker.run_complete and trained == sorted(sha256s)


def mark_complete(path: Path, marker: CheckpointMarker | dict[str, Any]) -> None:
    """Seal a checkpoint folder: fsync its files, then write the marker atomically."""
    _fsync_tree(path)
    if isinstance(marker, dict):  # a marker's JSON object (tests build small ones)
        marker = CheckpointMarker.from_json(marker, path / MARKER, strict=False) or CheckpointMarker()
    atomic_write_json(path / MARKER, {**dataclasses.replace(marker, created_at=now_iso()).to_json()})


def list_complete(checkpoints_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest (lowest global step) first."""
    out = []
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        raw = read_json(p / MARKER)
        if raw is None or raw.get("global_step") != int(m.group(1)):
            continue
        out.append(CheckpointInfo(p, int(m.group(1)), CheckpointMarker.from_json(raw, p / MARKER)))
    return sorted(out, key=lambda c: c.global_step)


def newest_complete(checkpoints_dir: str | Path) -> CheckpointInfo | None:
    found = list_complete(checkpoints_dir)
    return found[-1] if found else None


def quarantine_incomplete(checkpoints_dir: str | Path) -> list[Path]:
    """Move checkpoint folders without a marker into ``.incomplete/`` so they can never be resumed."""
    root = Path(checkpoints_dir)
    moved = []
    if not root.is_dir():
        return moved
    for p in sorted(root.iterdir()):
        if CHECKPOINT_RE.match(p.name) and p.is_dir() and read_json(p / MARKER) is None:
            dest = root / INCOMPLETE_DIR / f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            p.rename(dest)
            log.warning("moved incomplete checkpoint %s aside to %s (it was cut short)", p.name, dest)
            moved.append(dest)
    return moved


@dataclass(frozen=True)
class ConsolidationInfo:
    path: Path
    global_step: int
    manifest: dict[str, Any]


def list_consolidations(models_dir: str | Path, root: bool = False) -> list[ConsolidationInfo]:
    """Complete, adopted consolidations (manifest present), oldest first; ``root``: ``models_dir`` is the
    folder that holds them (the refused ones' folder, say) rather than the models folder."""
    root_dir = Path(models_dir) if root else Path(models_dir) / "consolidated"
    out = []
    if not root_dir.is_dir():
        return out
    for p in root_dir.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        manifest = read_json(p / MANIFEST)
        if manifest is None or not isinstance(manifest.get("global_step"), int):
            continue
        out.append(ConsolidationInfo(p, manifest["global_step"], manifest))
    return sorted(out, key=lambda c: (c.global_step, c.path.name))


def newest_consolidation(models_dir: str | Path) -> ConsolidationInfo | None:
    found = list_consolidations(models_dir)
    return found[-1] if found else None


REFUSED_DIR = ".refused"  # models/consolidated/.refused/<name>/: candidates the gate did not adopt
ROLLED_BACK_DIR = ".rolled-back"  # models/consolidated/.rolled-back/<name>/: adopted, then rolled back
ROLLBACK_RECORD = "rollback.json"


def list_refused(models_dir: str | Path) -> list[ConsolidationInfo]:
    """Consolidations the gate refused (kept beside, never trained on), oldest first."""
    return list_consolidations(Path(models_dir) / "consolidated" / REFUSED_DIR, root=True)


def rolled_back_step(models_dir: str | Path) -> int:
    """The highest global step reached before any rollback (0 when none): training resumes past it."""
    root = Path(models_dir) / "consolidated" / ROLLED_BACK_DIR
    steps = [0]
    if root.is_dir():
        for p in root.iterdir():
            rec = read_json(p / ROLLBACK_RECORD) if p.is_dir() else None
            if rec and isinstance(rec.get("global_step_at_rollback"), int):
                steps.append(rec["global_step_at_rollback"])
    return max(steps)


def on_base(ckpt: CheckpointInfo, cons: ConsolidationInfo | None) -> bool:
    """Whether ``ckpt``'s adapter was trained on the current base: the newest adopted consolidation, or the
    configured base when there is none."""
    base = ckpt.marker.base_model
    in_consolidated = bool(base) and Path(str(base)).parent.name in ("consolidated", REFUSED_DIR, ROLLED_BACK_DIR)
    if cons is None:
        return not in_consolidated
    return in_consolidated and Path(str(base)).name == cons.path.name


def current_checkpoints(checkpoints_dir: str | Path, models_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints that training may continue or consolidate, oldest first.

    After a rollback, checkpoints trained on the rolled-back model, or on the current base before the
    rollback, are history: they are left on disk and ignored.
    """
    floor = rolled_back_step(models_dir)
    if floor == 0:  # no rollback: every checkpoint counts (one whose base went missing is an error, not skipped)
        return list_complete(checkpoints_dir)
    cons = newest_consolidation(models_dir)
    return [c for c in list_complete(checkpoints_dir) if on_base(c, cons) and c.global_step > floor]


@dataclass(frozen=True)
class StartPoint:
    """Where the next run starts: which base weights, which adapter, which global step."""

    kind: str  # "fresh" | "checkpoint" | "consolidation"
    global_step: int
    base_path: str | None  # None: resolve config base_model
    checkpoint: CheckpointInfo | None = None  # the adapter to resume, or (after a consolidation) its source
    consolidation: ConsolidationInfo | None = None


def start_point(checkpoints_dir: str | Path, models_dir: str | Path) -> StartPoint:
    """The newest checkpoint on the current base; else the current consolidation with a fresh adapter.

    After ``daemon.py --rollback-consolidation`` the base is the previous one again, with a fresh
    adapter, and the global step continues from the highest step reached before the rollback.
    """
    ckpts = current_checkpoints(checkpoints_dir, models_dir)
    ckpt = ckpts[-1] if ckpts else None
    cons = newest_consolidation(models_dir)
    floor = rolled_back_step(models_dir)
    if cons is not None and (ckpt is None or cons.global_step >= ckpt.global_step):
        if cons.global_step <= floor:  # rolled back to this consolidation: it stays, the step goes on
            return StartPoint("consolidation", floor, str(cons.path), consolidation=cons)
        # The source checkpoint still tells whether a run was cut short, so it can be finished, not redone.
        source = next((c for c in list_complete(checkpoints_dir)
                       if c.name == cons.manifest.get("source_checkpoint")), None)
        return StartPoint("consolidation", cons.global_step, str(cons.path), checkpoint=source, consolidation=cons)
    if ckpt is not None:
        return StartPoint("checkpoint", ckpt.global_step, ckpt.marker.base_model or None, checkpoint=ckpt)
    return StartPoint("fresh", floor, None)


# --------------------------------------------------------------------------- models by name

BASE, LATEST, ADOPTED, CONSOLIDATED = "base", "latest", "adopted", "consolidated/"
MODEL_NAMES_HELP = ("base | latest (what training continues from) | adopted (the newest consolidation the gate "
                    "accepted; the base while there is none) | checkpoint-<step> | consolidated/<name> or <name>")


@dataclass(frozen=True)
class ModelSpec:
    """A model name resolved to folders: the base weights and, for a checkpoint, its adapter.

    The one resolution the workbench, ``export.py`` and ``serve.py`` share; no torch here.
    """

    key: str           # the concrete key (``latest`` and ``adopted`` resolved): base, checkpoint-N, consolidated/<name>
    label: str
    base: str | None   # base weights folder; None: resolve the configured base_model
    adapter: str | None
    fingerprint: str   # changes when the model's files are replaced (cache key for loads and evaluations)
    quantized: bool = False  # the adapter was trained on the 4-bit base
    global_step: int = 0
    base_name: str | None = None  # the configured base_model name the weights descend from (a Hub id, say)


def _fingerprint(*parts: Any) -> str:
    import hashlib

    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def resolve_model(checkpoints_dir: str | Path, models_dir: str | Path, base_model: str, load_in_4bit: bool,
                  key: str) -> ModelSpec:
    """The folders behind a model name (``MODEL_NAMES_HELP``); ValueError for a name that names nothing (any more).

    ``latest`` is resolved again at every call, so it follows new checkpoints; ``adopted`` follows new
    consolidations (the gate's refusals live beside them, in ``.refused/``, and are never served).
    """
    key = (key or "").strip()
    if key == LATEST:
        start = start_point(checkpoints_dir, models_dir)
        if start.kind == "checkpoint" and start.checkpoint is not None:
            key = start.checkpoint.name
        elif start.kind == "consolidation" and start.consolidation is not None:
            key = CONSOLIDATED + start.consolidation.path.name
        else:
            key = BASE
    elif key == ADOPTED:
        cons = newest_consolidation(models_dir)
        key = CONSOLIDATED + cons.path.name if cons is not None else BASE
    if key == BASE:
        return ModelSpec(BASE, f"base model {base_model}", None, None, _fingerprint("base", base_model),
                         load_in_4bit, 0, base_model)
    if CHECKPOINT_RE.match(key):
        for c in list_complete(checkpoints_dir):
            if c.name == key:
                m = c.marker
                base = m.base_model if m.base_model and Path(m.base_model).is_dir() else None  # moved: resolve by name
                return ModelSpec(key, f"{c.name} (step {c.global_step})", base, str(c.path),
                                 _fingerprint(c.path, m.created_at), bool(m.load_in_4bit), c.global_step,
                                 m.base_model_name or base_model)
        raise ValueError(f"no complete checkpoint named {key}")
    name = key[len(CONSOLIDATED):] if key.startswith(CONSOLIDATED) else key
    for c in list_consolidations(models_dir):
        if c.path.name == name:
            return ModelSpec(CONSOLIDATED + name, f"consolidated {name} (step {c.global_step})", str(c.path), None,
                             _fingerprint(c.path, c.manifest.get("created_at")), False, c.global_step,
                             c.manifest.get("base_model_name") or base_model)
    raise ValueError(f"no model named {key!r}: use {MODEL_NAMES_HELP}")
