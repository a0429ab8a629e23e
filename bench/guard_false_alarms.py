"""The divergence guard's spike rules side by side: false alarms on ordinary varied data over a long run.

    .venv/bin/python bench/guard_false_alarms.py [--model guard-tiny | smollm2-135m-instruct | PATH]
                                                 [--runs 4] [--lines 240] [--rehearsal 0.3] [--batch 2]
                                                 [--accumulation 1] [--out DIR | --judge DIR]

Trains ``--runs`` runs in a row through the real ``train.py`` (one file each, rehearsal mixed in at
the shipped share), with the guard observing only (its thresholds set out of reach), so every step
is trained and its loss and mix of sources land in ``history/steps.jsonl``. Then both rules judge
that same series, step by step, as they would have in training:

- pooled: the rule before issue 23 (``median + k * max(1.4826 * MAD, 0.05 * median)`` of the run's
  last 50 accepted step losses, judged from the run's 21st step);
- by source: ``stability.SpikeRule`` (per-source levels, the spread of the fit's residuals, the
  earlier runs' window at each run's start, the growth and chance rules, and the new-file rule:
  each run's first steps against the earlier runs' files' levels when new, at the shipped
  ``guard.new_file_growth``).

Every flag on this data is a false alarm. ``--model guard-tiny`` is the tests' tiny model trained
on the ordinary lines (tests/_guard_helpers.py: fast, and it knows its language); the built-in
model is the real thing, slower. Its data are the varied lines of ``tests/_guard_helpers.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tiny model and the ordinary lines of the guard's tests


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pooled_flags(losses: list[float], k: float, window: int = 50, min_history: int = 20) -> int:
    from ultimate_trainer.trainer.stability import spike_threshold

    accepted: list[float] = []
    flags = 0
    for x in losses:
        t = spike_threshold(accepted[-window:], k, min_history)
        if t is not None and x > t:
            flags += 1
        else:
            accepted.append(x)
    return flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="guard-tiny")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--lines", type=int, default=240, help="lines per run's file")
    ap.add_argument("--rehearsal", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--judge", type=Path, default=None, help="judge the steps of this earlier --out again, training nothing")
    args = ap.parse_args()

    from _guard_helpers import cached_guard_model, chat, normal_records

    from ultimate_trainer.model.loading import resolve_base
    from ultimate_trainer.core import config
    from ultimate_trainer.trainer.rehearsal.prompts import cache_path, load_prompts
    from ultimate_trainer.trainer.stability import Observation, SpikeRule, fit_levels

    cache = REPO / "models" / "cache"
    root = args.judge or args.out or Path(tempfile.mkdtemp(prefix="guard-false-alarms-"))
    root.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "guard-tiny":
        builtin = config.from_dict({"base_model": "smollm2-135m-instruct", "paths": {"model_cache": str(cache)}})
        model = str(cached_guard_model(cache, Path(resolve_base(builtin))))
    data = {"base_model": model, "load_in_4bit": False, "eval_steps": 0, "save_steps": 10**6,
            "paths": {"root": str(root), "model_cache": str(cache)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"batch_size": args.batch, "gradient_accumulation_steps": args.accumulation,
                         "learning_rate": args.lr,
                         "warmup_steps": 0, "max_seq_length": 256, "device": "cpu", "packing": "off",
                         "rehearsal_fraction": args.rehearsal, "replay_fraction": 0.05},
            "data": {"heldout_fraction": 0.0},
            "guard": {"spike_k": 1e9, "max_growth": 1e9, "max_anomalies": 10**6}}
    cfg_path = root / "config.json"
    if not args.judge:
        cfg_path.write_text(json.dumps(data, indent=2))
    if args.rehearsal and not args.judge:  # the base's answers: ordinary lines it knows (generation by a real base is slow here)
        cfg = config.load(str(cfg_path), [])
        rehearsal = cache_path(cfg, resolve_base(cfg), load_prompts(cfg))
        rehearsal.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(rehearsal, normal_records(200, seed=999) + [chat("Say hello.", "Hello!")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for i in range(0 if args.judge else args.runs):
        f = write_jsonl(root / f"part{i}.jsonl", normal_records(args.lines, seed=100 + i))
        done = root / "queue" / "done"  # replay draws from the files trained before
        r = subprocess.run([sys.executable, str(REPO / "train.py"), str(f), "--config", str(cfg_path)], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        done.mkdir(parents=True, exist_ok=True)
        f.rename(done / f.name)

    vocab = json.loads((Path(resolve_base(config.load(str(cfg_path), []))) / "config.json").read_text())
    chance = math.log(vocab["vocab_size"])
    steps = [json.loads(x) for x in (root / "status" / "history" / "steps.jsonl").read_text().splitlines()]
    runs: dict[str, list[dict]] = {}
    for s in steps:
        if isinstance(s.get("loss"), float) and math.isfinite(s["loss"]):
            runs.setdefault(s["run_id"], []).append(s)
    n = sum(len(v) for v in runs.values())
    print(f"{n} steps in {len(runs)} runs on {Path(model).name}; mean share of the run's own lines "
          f"{sum((s.get('shares') or {}).get('user', 1.0) for v in runs.values() for s in v) / n:.2f}")
    print(f"{'k':>4} {'pooled flags':>13} {'by-source flags':>16} {'pooled judged':>14} {'by-source judged':>17}")
    for k in (6.0, 8.0, 10.0):
        pooled = sum(pooled_flags([s["loss"] for s in v], k) for v in runs.values())
        pooled_judged = sum(max(0, len(v) - 20) for v in runs.values())
        flags = judged = new_flags = 0
        earlier: list[Observation] = []
        levels: list[float] = []  # each earlier run's own files' level when new (guard_window.json)
        new_growth = config.Config().guard.new_file_growth
        for v in runs.values():
            rule = SpikeRule(k, 50, 20, 4, 10.0, chance=chance, new_file_growth=new_growth)
            rule.seed(earlier, levels)
            for s in v:
                shares = s.get("shares") or {"user": 1.0}
                new = rule.new_file_threshold(shares, fit_levels(rule.window))
                verdict = rule.judge(s["loss"], shares)
                judged += (verdict.threshold is not None and verdict.expected is not None) or new is not None
                if new is not None and s["loss"] > new:
                    new_flags += 1
                if verdict.kind:
                    flags += 1
                else:
                    rule.accept(s["loss"], shares)
            earlier = list(rule.window)  # as the next run reads it (seed() makes this run's files "earlier")
            levels += [rule.new_level] if rule.new_level is not None else []
        print(f"{k:>4.0f} {pooled:>6} ({100 * pooled / max(1, pooled_judged):.2f}%) {flags:>8} "
              f"({100 * flags / max(1, judged):.2f}%) {pooled_judged:>14} {judged:>17}   "
              f"(of the by-source flags, {new_flags} by the new-file rule)")
    print(f"(project: {root}; {args.batch * args.accumulation} examples a step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
