"""Where every checkpoint came from: the input files whose training it contains, back to the first run.

Training is one continuous chain: every run starts from the newest complete checkpoint (or the
consolidation made from it), so a checkpoint at global step S contains the training of every run
that saved a checkpoint at a step <= S. Each checkpoint's ``ut_checkpoint.json`` names its run
(``run_id``, ``run_step``, ``run_total_steps``, ``run_complete``) and the run's ``files``
(``name``, ``sha256``, and since the workbench ``size``, ``examples``, ``trained_at``). Checkpoints
written before those three fields were recorded are read as well: the missing values are None.

A run is a maximal sequence of consecutive checkpoints with one ``run_id`` (a run trained again on
the same files after it completed starts a new one). A checkpoint saved part-way through a run
contains that run's files only in part (``partial``).

Only what is on disk can be traced: a pruned checkpoint takes the record of a run that saved no
other checkpoint with it. Read-only; used by ``train.py --lineage`` and the workbench.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.core.checkpoints import CheckpointInfo, ConsolidationInfo, list_complete, list_consolidations
from ultimate_trainer.core.records import FileReport


@dataclass
class Run:
    """One training run, as far as its checkpoints tell."""

    run_id: str
    files: list[dict[str, Any]]
    checkpoints: list[CheckpointInfo] = field(default_factory=list)

    @property
    def first_step(self) -> int:
        return self.checkpoints[0].global_step

    @property
    def started_at(self) -> str | None:
        first = self.checkpoints[0].marker
        return first.run_started_at or first.created_at

    def complete_at(self, step: int) -> bool:
        """Whether the run's training was all done by the checkpoint at ``step``."""
        upto = [c for c in self.checkpoints if c.global_step <= step]
        return bool(upto) and upto[-1].marker.run_complete


def _file_entry(entry: Any, run: Run) -> dict[str, Any]:
    entry = entry if isinstance(entry, dict) else {"name": str(entry)}
    return {"name": str(entry.get("name", "?")), "sha256": entry.get("sha256"), "size": entry.get("size"),
            "examples": entry.get("examples"), "trained_at": entry.get("trained_at") or run.started_at,
            "run_id": run.run_id}


def runs(checkpoints: list[CheckpointInfo]) -> list[Run]:
    """The runs of a chain of complete checkpoints (oldest first)."""
    out: list[Run] = []
    for c in checkpoints:
        rid = c.marker.run_id or "?"
        prev = out[-1] if out else None
        if prev is None or prev.run_id != rid or prev.checkpoints[-1].marker.run_complete:
            out.append(Run(rid, c.marker.files))
        out[-1].checkpoints.append(c)
    return out


class Lineage:
    """The lineage of every checkpoint and consolidation under one project's folders."""

    def __init__(self, checkpoints_dir: str | Path, models_dir: str | Path):
        self.checkpoints = list_complete(checkpoints_dir)
        self.consolidations = list_consolidations(models_dir)
        self.runs = runs(self.checkpoints)

    # ----------------------------------------------------------------- forward: model -> files
    def find(self, name: str) -> CheckpointInfo | ConsolidationInfo | None:
        """A checkpoint or consolidation by folder name or path; ``latest`` is the newest checkpoint."""
        if name in ("latest", "") and self.checkpoints:
            return self.checkpoints[-1]
        wanted = Path(name).name
        for c in [*self.checkpoints, *self.consolidations]:
            if c.path.name == wanted or str(c.path) == name:
                return c
        return None

    def of_step(self, step: int) -> list[dict[str, Any]]:
        """Every file whose training a model at global ``step`` contains, oldest run first."""
        out = []
        for run in self.runs:
            if run.first_step > step:
                break
            partial = not run.complete_at(step)
            out.extend({**_file_entry(f, run), "partial": partial} for f in run.files)
        return out

    def of(self, model: CheckpointInfo | ConsolidationInfo) -> dict[str, Any]:
        """The lineage record of one checkpoint or consolidation."""
        if isinstance(model, ConsolidationInfo):
            m = model.manifest
            return {"kind": "consolidation", "name": model.path.name, "global_step": model.global_step,
                    "created_at": m.get("created_at"), "source_checkpoint": m.get("source_checkpoint"),
                    "base_model": m.get("base_model_name"), "files": self.of_step(model.global_step)}
        return {"kind": "checkpoint", "name": model.name, "global_step": model.global_step,
                "created_at": model.marker.created_at, "run_id": model.marker.run_id or None,
                "base_model": model.marker.base_model_name, "files": self.of_step(model.global_step)}

    def all(self) -> list[dict[str, Any]]:
        """The lineage of every checkpoint and consolidation, by global step."""
        models: list[CheckpointInfo | ConsolidationInfo] = sorted([*self.checkpoints, *self.consolidations], key=lambda m: m.global_step)
        return [self.of(m) for m in models]

    # ----------------------------------------------------------------- reverse: file -> models
    def files(self) -> list[dict[str, Any]]:
        """Every input file trained so far (one row per run that trained it), oldest first."""
        return [{**_file_entry(f, run), "first_step": run.first_step} for run in self.runs for f in run.files]

    def containing(self, query: str) -> list[dict[str, Any]]:
        """For each trained file matching ``query`` (its name, or a sha256 prefix of 8+ characters):
        the checkpoints and consolidations that contain its training."""
        q = query.strip()
        out = []
        for run in self.runs:
            for f in run.files:
                e = _file_entry(f, run)
                if e["name"] != q and Path(q).name != e["name"] and not (
                        len(q) >= 8 and str(e["sha256"] or "").startswith(q.lower())):
                    continue
                holders = [{"kind": "checkpoint", "name": c.name, "global_step": c.global_step,
                            "partial": not run.complete_at(c.global_step)}
                           for c in self.checkpoints if c.global_step >= run.first_step]
                holders += [{"kind": "consolidation", "name": c.path.name, "global_step": c.global_step,
                             "partial": not run.complete_at(c.global_step)}
                            for c in self.consolidations if c.global_step >= run.first_step]
                out.append({**e, "first_step": run.first_step,
                            "models": sorted(holders, key=lambda h: (h["global_step"], h["kind"]))})
        return out


# --------------------------------------------------------------------------- terminal text

def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return "?"


def format_model(record: dict[str, Any]) -> str:
    """``train.py --lineage CHECKPOINT``: the files a model contains, one line each."""
    head = f"{record['kind']} {record['name']} (global step {record['global_step']}"
    head += f", from {record['source_checkpoint']})" if record.get("source_checkpoint") else ")"
    lines = [head]
    if not record["files"]:
        lines.append("  no recorded input files")
    for f in record["files"]:
        sha = (f["sha256"] or "?")[:12]
        examples = "?" if f["examples"] is None else f["examples"]
        part = "  (partly: its run was not finished at this checkpoint)" if f.get("partial") else ""
        lines.append(f"  {f['name']}  sha256 {sha}  {_size(f['size'])}  {examples} examples  "
                     f"trained {f['trained_at'] or '?'}  run {f['run_id']}{part}")
    return "\n".join(lines)


def format_file(record: dict[str, Any]) -> str:
    """``train.py --lineage FILE``: the models that contain a file's training."""
    lines = [f"file {record['name']} (sha256 {(record['sha256'] or '?')[:12]}, run {record['run_id']}, "
             f"first saved at step {record['first_step']})"]
    for m in record["models"]:
        lines.append(f"  {m['kind']} {m['name']} (step {m['global_step']})" + ("  partly" if m["partial"] else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- what the trainer records

def run_files(files: list[Path], reports: dict[str, FileReport], started_at: str) -> list[dict[str, Any]]:
    """The ``files`` entries of a run's checkpoint markers: name, sha256, size, examples, trained_at."""
    out = []
    for f in files:
        rep = reports.get(str(f))
        out.append({"name": f.name, "sha256": rep.sha256 if rep else None, "size": rep.size_bytes if rep else None,
                    "examples": rep.examples if rep else None, "trained_at": started_at})
    return out
