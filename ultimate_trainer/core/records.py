"""The records other processes read, typed: the per-file report, the checkpoint marker, training_status.json.

Each is a dataclass whose fields carry their JSON type and meaning (as core/config.py's settings
do); docs/STATUS.md's tables for them are generated from here (``python -m
ultimate_trainer.core.records --markdown``) and a test keeps the two in step. ``to_json`` is the
file's object. ``from_json`` is the one place a reader turns a file's object into its record: any
file written since schema 1 reads (a missing field takes its default), a field it does not know is
kept (``extra``, written back as it was), and a field of the wrong JSON type is reported by name, in
a warning that names the file, and read as its default; ``strict=True`` (the writers' tests) refuses
all three with one ``RecordError`` listing every problem. ``read`` does the same for a path.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ultimate_trainer.core.status import read_json

T = TypeVar("T", bound="Record")
log = logging.getLogger(__name__)

# The JSON types a field's annotation allows, as Python types (a float field takes an int; bool is no number).
_JSON_TYPES: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,),
                                            list: (list,), dict: (dict,), type(None): (type(None),)}
_warned: set[tuple[str, str, str]] = set()  # (record, where, field): a bad field is reported once per file


_NOT_FIELDS = ("extra", "given")  # a record's bookkeeping, not fields of its file


class RecordError(ValueError):
    """A file's object is not the record it should be; the message lists every problem."""


def _allowed(annotation: Any) -> tuple[type, ...]:
    """The Python types of the JSON values a field annotation admits (``int | None`` -> int, NoneType)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    out: tuple[type, ...] = ()
    for a in args:
        out += _JSON_TYPES.get(typing.get_origin(a) or a, (object,))
    return out


@functools.cache
def _allowed_types(cls: type[Record]) -> dict[str, tuple[type, ...]]:
    """Each field of the record with the Python types of the JSON values it admits (worked out once)."""
    hints = typing.get_type_hints(cls)
    return {n: _allowed(hints[n]) for n in cls.names()}


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in allowed:
        return False  # JSON true is not the number 1
    return isinstance(value, allowed)


def _f(default: Any, json_type: str, doc: str) -> Any:
    """A field with its JSON type word (``int``, ``string or null``, ...) and its meaning."""
    meta = {"type": json_type, "doc": doc}
    if isinstance(default, _Factory):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


class _Factory:
    def __init__(self, value: Any):
        self.value = value

    def __call__(self) -> Any:
        return json.loads(json.dumps(self.value))


def _list() -> _Factory:
    return _Factory([])


def _obj(value: dict[str, Any]) -> _Factory:
    return _Factory(value)


class Record:
    """Shared by the records: JSON in and out, unknown fields kept, the schema as a markdown table."""

    extra: dict[str, Any]  # the file's fields this version does not know
    given: frozenset[str] | None  # the known fields the file had (None: built in code, every field given)
    ABSENT_WHEN_NULL: ClassVar[tuple[str, ...]] = ()  # fields the file leaves out rather than write null

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_FIELDS]  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        out = {**{n: getattr(self, n) for n in self.names()}, **self.extra}
        for name in self.ABSENT_WHEN_NULL:
            if out[name] is None:
                del out[name]
        return out

    @property
    def missing(self) -> list[str]:
        """The fields the file did not have (an older writer's): they read as their defaults."""
        return [] if self.given is None else [n for n in self.names() if n not in self.given]

    @property
    def unknown(self) -> list[str]:
        """The fields of the file this version does not know (a newer writer's), kept in ``extra``."""
        return sorted(self.extra)

    @classmethod
    def from_json(cls: type[T], data: dict[str, Any] | None, where: str | Path = "", *,
                  strict: bool = False) -> T | None:
        """The record of a file's object; None when there is no object (missing, unreadable, not JSON).

        A field of the wrong JSON type takes its default and is reported (a warning naming ``where``
        and the field, once per file); fields it does not know are kept and named once (info); a
        missing field takes its default (``missing`` lists them: older writers). ``strict``: a wrong
        type, a missing or an unknown field raises ``RecordError`` listing them all.
        """
        if not isinstance(data, dict):
            if strict:
                raise RecordError(f"{where or cls.__name__}: not a JSON object")
            return None
        allowed = _allowed_types(cls)
        known = set(allowed)
        values, wrong = {}, []
        for k, v in data.items():
            if k not in known:
                continue
            if _fits(v, allowed[k]):
                values[k] = v
            else:
                wrong.append(f"{k}: {type(v).__name__} {json.dumps(v, default=str)[:60]}, "
                             f"expected {cls._field(k).metadata['type']}")
        rec = cls(**values)  # type: ignore[call-arg]
        rec.extra = {k: v for k, v in data.items() if k not in known}
        rec.given = frozenset(known & set(data))
        if strict:
            problems = wrong + [f"{k}: missing" for k in sorted(known - set(data) - set(cls.ABSENT_WHEN_NULL))] \
                + [f"{k}: not a field of {cls.__name__}" for k in rec.unknown]
            if problems:
                raise RecordError(f"{where or cls.__name__}: " + "; ".join(problems))
        for problem in wrong:
            key = (cls.__name__, str(where), problem.split(":", 1)[0])
            if key not in _warned:
                _warned.add(key)
                log.warning("%s: %s field %s; read as its default", where or "a file", cls.__name__, problem)
        if rec.extra and (cls.__name__, str(where), "") not in _warned:  # a newer writer's: said once, kept
            _warned.add((cls.__name__, str(where), ""))
            log.info("%s: %s fields this version does not know, kept as they are: %s", where or "a file",
                     cls.__name__, ", ".join(rec.unknown))
        return rec

    @classmethod
    def read(cls: type[T], path: str | Path) -> T | None:
        """The record in ``path``; None when it is missing, empty, half-written or not an object."""
        return cls.from_json(read_json(path), path)

    @classmethod
    def _field(cls, name: str) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]

    @classmethod
    def markdown_table(cls) -> str:
        rows = ["| field | type | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in _NOT_FIELDS:
                rows.append(f"| `{f.name}` | {f.metadata['type']} | {f.metadata['doc'].replace('|', chr(92) + '|')} |")
        return "\n".join(rows) + "\n"


@dataclass
class FileReport(Record):
    """``status/reports/<file name>.report.json``: what reading one input file found (data/prepare.py writes it)."""

    schema_version: int = _f(1, "int", "`1`")
    file: str = _f("", "string", "absolute path as given")
    sha256: str | None = _f(None, "string", "hash of the content (the run manifest's, core/manifest.py)")
    size_bytes: int = _f(0, "int", "bytes read")
    unit: str = _f("line", "string", "`line` (JSONL) or `item` (a JSON array file: `[{...}, ...]`)")
    lines: int = _f(0, "int", "lines read (blank lines included), or array items read")
    examples: int = _f(0, "int", "usable examples")
    train_examples: int = _f(0, "int", "usable examples trained")
    heldout_examples: int = _f(0, "int", "usable examples held out (data/heldout.py); includes `heldout_duplicates`")
    heldout_duplicates: int = _f(0, "int", "copies of an already held-out example: neither trained nor asked twice")
    formats: dict[str, int] = _f(_obj({}), "object",
                                 "usable examples per detected format (`chat`, `sharegpt`, `preference`, "
                                 "`prompt_response`, `alpaca`, `text`, `segments`)")
    bad_lines: int = _f(0, "int", "lines (or items) skipped")
    bad: list[dict[str, Any]] = _f(_list(), "list",
                                   "the first 1,000 of them, in file order: `line` (1-based) or, for an array, "
                                   "`item` (1-based), and `reason`; rendered as `file:line: reason` or "
                                   "`file:item N: reason`")
    warnings: list[str] = _f(_list(), "list of string",
                             "per-file notes on examples that are used but may not be what was meant (template "
                             "placeholders such as `{{name}}`), each with a count and the first line or item")
    reasoning: dict[str, Any] | None = _f(None, "object or null",
                                          "null when no example has a reasoning trace; else `examples` (how many) "
                                          "and `rendered_as` (the chat template's reasoning field, or the "
                                          "`<think>` convention: data/reasoning.py)")
    usable: bool = _f(False, "bool", "false when the file has no usable example")
    error: str | None = _f(None, "string or null", "one-line reason when not usable")
    created_at: str | None = _f(None, "string", "when the file was read")
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    given: frozenset[str] | None = field(default=None, repr=False, compare=False)


@dataclass
class CheckpointMarker(Record):
    """``checkpoints/checkpoint-<global_step>/ut_checkpoint.json``: written last, it makes the checkpoint complete
    (core/checkpoints.py); what the run, the daemon, the lineage and the consolidation read of a checkpoint."""

    schema_version: int = _f(1, "int", "`1`")
    global_step: int = _f(0, "int", "optimizer steps since the very first run, at this save")
    run_id: str = _f("", "string", "the run it belongs to (core/manifest.py `run_id`)")
    run_step: int = _f(0, "int", "steps of that run done at this save")
    run_total_steps: int = _f(0, "int", "steps the run takes")
    run_complete: bool = _f(True, "bool",
                            "whether this checkpoint ends its run (`run_step >= run_total_steps`); a marker "
                            "without it counts as complete")
    files: list[dict[str, Any]] = _f(_list(), "list",
                                     "the run's input files: `name`, `sha256`, `size`, `examples`, `trained_at` "
                                     "(core/lineage.py)")
    run_started_at: str | None = _f(None, "string or null", "when the run's process started")
    parent: dict[str, Any] | None = _f(None, "object or null",
                                       "where the run started: `kind` (`fresh`, `checkpoint`, `consolidation`), "
                                       "`name`")
    base_model: str = _f("", "string", "the base weights the adapter applies to (a path)")
    base_model_name: str | None = _f(None, "string or null", "the configured `base_model` (name, path or Hub id)")
    load_in_4bit: bool | None = _f(None, "bool or null", "whether the base was 4-bit")
    lora: dict[str, Any] | None = _f(None, "object or null", "`r`, `alpha` of the adapter")
    world_size: int = _f(1, "int", "training processes (ranks) that saved it")
    distributed: str | None = _f(None, "string or null",
                                 "`ddp`, `fsdp` or `deepspeed` with several ranks (how the optimizer state is "
                                 "saved); null for one process")
    examples_per_step: int | None = _f(None, "int or null", "examples (or packed rows) one optimizer step trained")
    replay: dict[str, Any] | None = _f(None, "object or null",
                                       "the run's replay, absent when none: `examples`, `files` (done file name -> lines)")
    rehearsal: dict[str, Any] | None = _f(None, "object or null",
                                          "the run's rehearsal, absent when none: `examples`, `answers`, `prompts_file`, "
                                          "`loss` (`distill` or `answers`: training.rehearsal_loss)")
    controller: dict[str, Any] | None = _f(None, "object or null",
                                           "the retention-aware controller's state at this save, absent when it "
                                           "is off (trainer/control_rule.py `ControllerState`): `lr_scale` (x "
                                           "`training.learning_rate`), `rehearsal_extra` (added to "
                                           "`training.rehearsal_fraction`: drawn by the runs that start from it, "
                                           "a weight on the rehearsal lines' loss in the run that decided it), "
                                           "`run_rehearsal_fraction` (the share this run drew at its start: a continued "
                                           "run keeps it), `best_accuracy`, `evaluations_since_best`, `decisions` "
                                           "(kind -> count, all runs), `last` (`global_step`, `kind`, `reason`, "
                                           "`time`). A resumed run and the next run start from it")
    created_at: str | None = _f(None, "string", "when the marker was written")
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    given: frozenset[str] | None = field(default=None, repr=False, compare=False)
    ABSENT_WHEN_NULL: ClassVar[tuple[str, ...]] = ("replay", "rehearsal", "controller")  # absent, not null, when none (as ever)

    def at(self, global_step: int, run_step: int) -> CheckpointMarker:
        """This run's marker for the checkpoint saved at ``global_step``, ``run_step`` steps into the run."""
        return dataclasses.replace(self, global_step=global_step, run_step=run_step,
                                   run_complete=run_step >= self.run_total_steps)



@dataclass
class TrainingStatus(Record):
    """``status/training_status.json``: the live state of the trainer (trainer/reporter.py writes it)."""

    schema_version: int = _f(1, 'int',
        '`1`')
    state: str = _f("loading", 'string',
        '`idle` (run finished or not started), `loading` (model), `tokenizing`, `training`, `evaluating`, `saving`, `error`')
    current_files: list = _f(_list(), 'list of string',
        'file names of the current run')
    run_id: str | None = _f(None, 'string',
        "identifies the run: a hash of its files' contents and the settings that shape the data order")
    global_step: int = _f(0, 'int',
        'optimizer steps since the very first run; never goes backwards')
    run_step: int = _f(0, 'int',
        'optimizer steps done in this run (also counts steps done before a crash, when the run was resumed)')
    run_total_steps: int = _f(0, 'int',
        'optimizer steps this run will take')
    epoch: float = _f(0.0, 'float',
        "passes over this run's data so far (`run_step / steps_per_epoch`)")
    loss: float | None = _f(None, 'float or null',
        'training loss of the last logged step')
    learning_rate: float | None = _f(None, 'float or null',
        'learning rate of the last step')
    grad_norm: float | None = _f(None, 'float or null',
        'gradient norm before clipping, last step')
    tokens_per_second: float | None = _f(None, 'float or null',
        'trained (non-padding) tokens per second, over the last logged steps')
    eta_seconds: float | None = _f(None, 'float or null',
        'predicted seconds to the end of this run')
    accuracy: dict = _f(_obj({"overall": None, "last_20": None, "last_50": None, "trend": None, "evaluations": 0, "answers": 0, "signals": {"last_20": None, "last_50": None}}), 'object',
        '`overall`, `last_20`, `last_50` (percent 0-100 or null), `trend` (`improving`, `stable`, `regressing`, or null until there are enough answers), `evaluations` (number of evaluations so far), `answers` (scored answers so far), `signals` (`last_20`, `last_50`: `above`, `level`, `below` the overall baseline by the configured margins)')
    val_loss: float | None = _f(None, 'float or null',
        'loss on the held-out examples at the last evaluation')
    retention: dict | None = _f(None, 'object or null',
        "the forgetting guard (docs/TRAINING.md), null before the first probe: `ratio` (probe score / the base's baseline score, 1 = nothing forgotten), `score` (share of probe questions right, 0-1), `baseline`, `correct`, `total`, `global_step` (of that probe), `trend` (`falling`: the ratio fell by more than 0.02 since the previous probe, or is under `warn_below` and not rising; `rising`; `stable`; null at the first probe), `forgetting` (`ratio` < `eval.retention_warn`), `warn_below`, `probes` (probes so far)")
    replay: dict | None = _f(None, 'object or null',
        'lines of earlier files mixed into this run (null: none): `examples` (trained), `files` (done file name -> lines)')
    rehearsal: dict | None = _f(None, 'object or null',
        "the base's own answers to general prompts mixed into this run (null: none): `examples` (trained), `answers` (the cache file under `.work/rehearsal/`: whose answers), `prompts_file`, `loss` (what its lines train: `distill`, the base\'s distribution, or `answers`, its answers; docs/TRAINING.md, Rehearsal)")
    controller: dict | None = _f(None, 'object or null',
        'the retention-aware controller (docs/TRAINING.md), null before training starts: `enabled`, `lr_scale` (x the configured rate, 1 when off), `learning_rate` (configured x scale: the base of the schedule now), `configured_learning_rate`, `rehearsal_fraction` (the share of rehearsal lines this run drew at its start), `next_rehearsal_fraction` (the controller\'s share now: this run\'s rehearsal lines are weighted to it, the next run draws it), `rehearsal_weight` (a rehearsal token\'s loss weight in this run, other tokens\' weighted so a step\'s mean weight is 1; 1 when the two shares agree), `configured_rehearsal_fraction`, `decisions` (kind -> count, all runs: `step_down`, `step_back`, `hold`), `last` (the last decision: `global_step`, `kind`, `reason`, `time`; null before the first)')
    stability: dict = _f(_obj({"loss_slope": None, "score": None, "anomalies": 0, "anomalies_this_run": 0, "last_anomaly": None}), 'object',
        'the divergence guard\'s view (docs/TRAINING.md, "Divergence guard"): `loss_slope` (least-squares slope of the step loss per step over the last `guard.slope_steps` steps, null before 2), `score` (stability score 0-100, null before the first step), `anomalies` (anomalous steps so far, all runs: the lines of `history/anomalies.jsonl`), `anomalies_this_run`, `shares` (the last step\'s target tokens by source), `last_anomaly` (`global_step`, `kind`, `files`, `loss`, `grad_norm`, or null)')
    diverged: dict | None = _f(None, 'object or null',
        'set when the guard stopped the run (`train.py` exits 5): `reason`, `files` (the ones to blame: present in every anomalous step), `run_id`')
    progress: dict | None = _f(None, 'object or null',
        'a long phase that is not a training step, while it lasts (null otherwise): `phase` (`rehearsal answers`: the base answering the rehearsal prompts, once per base; `probe baseline`; `probe`; `evaluation`), `done`, `total`, `unit` (`prompts`, `questions`), `elapsed_seconds`, `eta_seconds` (at the rate so far; null before the first batch), `started_at`. A stop (SIGTERM) ends the phase within a generated token')
    recent_examples: list = _f(_list(), 'list',
        'the last scored answers, newest last: `step`, `prompt`, `expected`, `generated`, `correct`, `source` (`file:line`)')
    pid: int = _f(0, 'int',
        "the trainer's process id")
    rss_bytes: int = _f(0, 'int',
        "the trainer's resident memory")
    checkpoints: list = _f(_list(), 'list',
        'the newest 100 complete checkpoints, oldest first: `name`, `global_step`, `created_at`')
    last_checkpoint: str | None = _f(None, 'string or null',
        'name of the newest complete checkpoint')
    base_model: str | None = _f(None, 'string',
        'what was loaded: the built-in name, a path or a Hub id')
    device: str | None = _f(None, 'string',
        '`cuda` or `cpu`')
    load_in_4bit: bool | None = _f(None, 'bool',
        'whether the base is 4-bit')
    world_size: int = _f(1, 'int',
        'training processes (ranks) of this run; 1 without torchrun. Rank 0 alone writes this file')
    ranks: list = _f(_list(), 'list',
        'with several ranks, one entry per rank refreshed every step: `rank`, `local_rank`, `host`, `pid`, `rss_bytes`, `device` (`cpu`, `cuda:<i>`), `device_memory_allocated_bytes`, `device_memory_reserved_bytes`, `device_memory_peak_bytes` (null on the CPU); empty with one process')
    error: str | None = _f(None, 'string or null',
        'one-line reason when `state` is `error`')
    started_at: str = _f("", 'string',
        'when this process started')
    updated_at: str = _f("", 'string',
        'when this file was written')
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    given: frozenset[str] | None = field(default=None, repr=False, compare=False)

    def finished(self, pid: int, file_names: list[str]) -> bool:
        """Whether trainer ``pid`` finished its run over ``file_names`` (by name) according to this status."""
        return (self.pid == pid and self.state == "idle" and self.run_step == self.run_total_steps
                and sorted(Path(f).name for f in self.current_files) == sorted(file_names))

    def diverged_files(self, pid: int, names: list[str]) -> tuple[list[str], str | None]:
        """After exit 5: the files of trainer ``pid``'s run the guard blamed (all when it named none), its reason."""
        div = self.diverged if self.pid == pid else None
        if not isinstance(div, dict):
            return list(names), None
        blamed = [n for n in names if n in (div.get("files") or [])]
        return blamed or list(names), div.get("reason")


@dataclass
class ControllerDecision(Record):
    """``status/history/controller.jsonl``, one line per decision of the retention-aware controller (after each probe;
    trainer/controller.py). A run resumed from a checkpoint takes the decisions after it again, identically, so a
    line may repeat (the same `run_id`, `global_step` and figures)."""

    time: str = _f("", "string", "when it was decided")
    global_step: int = _f(0, "int", "the step of the probed evaluation")
    run_id: str = _f("", "string", "the run")
    kind: str = _f("hold", "string", "`step_down` (retention under `step_down_below`: learning rate down, rehearsal "
                   "share up), `step_back` (accuracy stalled with retention safe: both towards the configured values) or "
                   "`hold`")
    reason: str = _f("", "string", "why, in one line (also logged)")
    retention: float | None = _f(None, "float", "the probe's retention (score / the base's)")
    retention_warn: float = _f(0.95, "float", "`eval.retention_warn` at the time")
    step_down_below: float | None = _f(None, "float or null", "the retention under which the controller steps down: "
                                       "`eval.retention_warn` + `controller.step_down_margin` at the time (null in "
                                       "lines written before the margin existed: the warning itself)")
    accuracy: float | None = _f(None, "float or null", "the evaluation's held-out accuracy, percent")
    best_accuracy: float | None = _f(None, "float or null", "the best held-out accuracy at a probed evaluation so far")
    evaluations_since_best: int = _f(0, "int", "probed evaluations since the best (or since the last step)")
    lr_scale_before: float = _f(1.0, "float", "the learning rate's scale before")
    lr_scale: float = _f(1.0, "float", "after: applies from the next optimizer step, for the rest of the run and the "
                         "next runs")
    learning_rate: float = _f(0.0, "float", "`training.learning_rate` x `lr_scale` (before the schedule's factor)")
    rehearsal_fraction_before: float = _f(0.0, "float", "the controller's rehearsal share, before")
    rehearsal_fraction: float = _f(0.0, "float", "after: from the next optimizer step this run's rehearsal lines are "
                                   "weighted to hold this share of the loss; the next run draws it")
    run_rehearsal_fraction: float = _f(0.0, "float", "the share of rehearsal lines this run drew at its start")
    rehearsal_weight: float = _f(1.0, "float", "after: a rehearsal token's loss weight in this run (the other tokens' "
                                 "is such that a step's mean weight is 1; 1 when the two shares agree)")
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


RECORDS: dict[str, type[Record]] = {
    "`training_status.json`": TrainingStatus,
    "`reports/<file name>.report.json`": FileReport,
    "`checkpoints/checkpoint-<global_step>/ut_checkpoint.json`": CheckpointMarker,
    "`history/controller.jsonl`": ControllerDecision,
}


def markdown(title: str) -> str:
    """The table of the record documented under ``## {title}`` in docs/STATUS.md."""
    return RECORDS[title].markdown_table()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the field tables of docs/STATUS.md.")
    parser.add_argument("--markdown", action="store_true", help="print every record's table under its title")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write("\n".join(f"## {t}\n\n{cls.markdown_table()}" for t, cls in RECORDS.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
