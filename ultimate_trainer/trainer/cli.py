"""``train.py``'s command line: parse, check, then hand over to the run recipe. Returns the exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable
from pathlib import Path

from ultimate_trainer.core import config
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.manifest import Manifest
from ultimate_trainer.core.logs import setup_logging


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Fine-tune (QLoRA) on JSONL files, continuing from the last checkpoint.")
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE",
                        help="training data: JSONL (one example a line) or a JSON array of examples (.json)")
    config.add_arguments(parser)
    parser.add_argument("--max-steps", type=int, metavar="N", help="cap the optimizer steps of this run")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate config and data, print counts and token lengths; train nothing")
    parser.add_argument("--lineage", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="print the input files a checkpoint or consolidation contains (default: the newest "
                             "checkpoint; 'all' for every one), or given a file name or sha256, the models "
                             "containing it; train nothing")
    parser.add_argument("--manifest", type=Path, metavar="JSON",
                        help="the run's manifest (core/manifest.py: the files' hashes and line counts, the files to "
                             "replay), written by the daemon; without it, built here from FILE and queue/done")
    tune = parser.add_argument_group("tuning (train.py --tune FILE ...; docs/TUNING.md)")
    tune.add_argument("--tune", action="store_true",
                      help="search learning rate x LoRA rank on a held-out slice of FILE, from the current start point; "
                           "print a table and write a JSON report; train nothing of the project's own")
    tune.add_argument("--lrs", type=_floats, metavar="LR,LR,...",
                      help="learning rates to try (default: half, the configured one, double)")
    tune.add_argument("--ranks", type=_ints, metavar="R,R,...",
                      help="LoRA ranks to try (default: half the configured lora.r, and it)")
    tune.add_argument("--steps", type=int, default=30, metavar="N",
                      help="optimizer steps per candidate (default 30; at most the steps a run of FILE takes)")
    tune.add_argument("--budget", type=float, default=3600.0, metavar="SECONDS",
                      help="start no candidate that would end past this many seconds, judged by the ones before "
                           "(default 3600; 0: no limit)")
    tune.add_argument("--prompts", type=int, default=50, metavar="N",
                      help="held-out prompts each candidate answers (default 50, at most the held-out slice)")
    tune.add_argument("--report", type=Path, metavar="JSON",
                      help="where to write the JSON report (default: tune/tune-<time>.json under paths.root)")
    tune.add_argument("--write-config", type=Path, metavar="PATH",
                      help="write the best learning rate and rank into this config file (only those two keys); "
                           "without it no config file changes")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None
    if rank not in (None, "0"):  # rank 0 tells the run; the others speak up only for warnings and errors
        level = logging.DEBUG if args.verbose else logging.WARNING
    setup_logging(level, prefix=f"[rank {rank}] " if rank is not None else "")
    cfg = config_or_none(args)
    if cfg is None:
        return Exit.CONFIG
    if args.lineage is not None:
        return print_lineage(cfg, args.lineage)
    if args.tune:
        return tune_main(cfg, args)
    if not args.files:
        parser.error("the following arguments are required: FILE.jsonl")
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return Exit.CONFIG
    if args.max_steps is not None and args.max_steps < 1:
        print("error: --max-steps must be at least 1", file=sys.stderr)
        return Exit.CONFIG
    files = [f.resolve() for f in args.files]
    manifest: Manifest | list[Path] = files
    if args.manifest is not None:
        try:
            manifest = Manifest.read(args.manifest)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {args.manifest}: not a run manifest ({e})", file=sys.stderr)
            return Exit.CONFIG
        if [p.resolve() for p in manifest.paths] != files:
            print(f"error: {args.manifest} describes other files than FILE", file=sys.stderr)
            return Exit.CONFIG
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub here: fail fast instead of retrying the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.dry_run:
        from ultimate_trainer.trainer import distributed

        problem = distributed.setup_problem(cfg)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return Exit.CONFIG
        if not distributed.under_launcher():
            nproc = distributed.processes_wanted(cfg)
            if nproc > 1:  # the same command, once per process, under torchrun
                return distributed.relaunch(nproc, list(sys.argv[1:] if argv is None else argv), cfg.path("work"))
    from ultimate_trainer.trainer.recipe import StopFlag, run

    stop = StopFlag()
    stop.install()
    code = run(cfg, manifest, max_steps=args.max_steps, dry_run=args.dry_run, stop=stop)
    if not args.dry_run:
        from ultimate_trainer.trainer import distributed

        distributed.report_exit(code, distributed.World.from_env())
    return code


def print_lineage(cfg: config.Config, what: str) -> int:
    """``--lineage``: the files behind a model, or the models behind a file (core/lineage.py)."""
    from ultimate_trainer.core.lineage import Lineage, format_file, format_model

    lin = Lineage(cfg.path("checkpoints"), cfg.path("models"))
    if what == "all":
        records = lin.all()
        print("\n\n".join(format_model(r) for r in records) if records else "no complete checkpoints yet")
        return Exit.OK
    model = lin.find(what)
    if model is not None:
        print(format_model(lin.of(model)))
        return Exit.OK
    found = lin.containing(what)
    if found:
        print("\n\n".join(format_file(r) for r in found))
        return Exit.OK
    if what == "latest":
        print(f"no complete checkpoints in {cfg.path('checkpoints')} yet")
        return Exit.OK
    print(f"error: {what!r} is neither a checkpoint, a consolidation nor a trained file (name or sha256)",
          file=sys.stderr)
    return Exit.CONFIG


def _numbers(kind: type, what: str) -> Callable[[str], list]:
    """An argparse ``type``: comma-separated ``kind`` values, at least one."""
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what} separated by commas") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one number")
        return values
    return parse


_floats, _ints = _numbers(float, "numbers"), _numbers(int, "whole numbers")


def tune_main(cfg: config.Config, args: argparse.Namespace) -> int:
    """``--tune``: check the command line and the files, then the search (trainer/tuning/)."""
    problems = []
    if not args.files:
        problems.append("--tune needs the files to tune on: train.py --tune FILE.jsonl [FILE ...]")
    for f in args.files:
        if not f.is_file():
            problems.append(f"{f}: no such file")
            continue
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as e:
            problems.append(f"{f}: cannot read ({e.strerror or e})")
    if args.steps < 1:
        problems.append("--steps must be at least 1")
    if args.prompts < 1:
        problems.append("--prompts must be at least 1")
    if args.budget < 0:
        problems.append("--budget must be 0 (no limit) or more seconds")
    if args.max_steps is not None or args.dry_run or args.manifest is not None:
        problems.append("--tune does not combine with --max-steps, --dry-run or --manifest")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return Exit.CONFIG
    from ultimate_trainer.trainer.tuning.report import candidate_config, default_lrs, default_ranks

    lrs = list(dict.fromkeys(args.lrs or default_lrs(cfg.training.learning_rate)))
    ranks = list(dict.fromkeys(args.ranks or default_ranks(cfg.lora.r)))
    try:
        for lr in lrs:
            for r in ranks:
                candidate_config(cfg, lr, r)
    except config.ConfigError as e:
        print(f"error: --lrs/--ranks: {e}", file=sys.stderr)
        return Exit.CONFIG
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ultimate_trainer.trainer.recipe import StopFlag
    from ultimate_trainer.trainer.tuning.search import Options, tune

    opts = Options(lrs=lrs, ranks=ranks, steps=args.steps, budget=args.budget or None, prompts=args.prompts,
                   report=args.report, write_config=args.write_config)
    stop = StopFlag()
    stop.install()
    return tune(cfg, [f.resolve() for f in args.files], opts, stop)
