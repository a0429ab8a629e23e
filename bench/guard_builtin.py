"""The issue-23 cases on the built-in model at the shipped guard settings, through the real ``train.py``.

    nice -n 10 .venv/bin/python bench/guard_builtin.py [--model smollm2-135m-instruct] [--lines 24]
                                                       [--batch 2] [--out DIR]

Three runs in one project, as a user who walks away would have them:

1. an ordinary file (the history the next runs are judged from: the guard's window, and the level
   of the user's files when new);
2. a new ordinary file at learning rate 1.0 (the issue: the loss went 2.82 -> 86.5, nothing was
   flagged, the ruined adapter was saved and continued from): it must stop with exit 5 and leave
   run 1's checkpoint the newest;
3. a new ordinary file beside a file of word salad (the issue: trained and moved to done at 0
   anomalies): the salad file must be the one blamed.

Everything but the paths, the device (CPU), the batch (``--batch`` examples a step, no
accumulation; the shipped 16 takes minutes a step here), evaluation and the probe (off: their
generation is slow on a CPU and is not the guard) and checkpoints (one at the end of each run) is
the shipped config: the
guard's settings, rehearsal at 0.3 of each run, replay, LoRA, 4-bit. The base's rehearsal answers
are seeded with ordinary lines (generating the 380 answers takes ~40 min on this CPU). Prints, per
run, the exit code, each anomaly (step, kind, loss, threshold, files) and the step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the ordinary lines and the word salad of the guard's tests


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lines", type=int, default=24, help="lines of each ordinary file")
    ap.add_argument("--salad", type=int, default=8, help="lines of the word-salad file")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--runs", default="1,2,3", help="which runs to do, e.g. 3 in a copy of a project after run 1 "
                    "(runs 2 and 3 each start from run 1's state, so they can run side by side in two copies)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from _guard_helpers import chat, normal_records, salad_records

    from ultimate_trainer.core import checkpoints as ck
    from ultimate_trainer.core import config
    from ultimate_trainer.model.loading import resolve_base
    from ultimate_trainer.trainer.rehearsal.prompts import cache_path, load_prompts

    root = args.out or Path(tempfile.mkdtemp(prefix="guard-builtin-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = REPO / "models" / "cache"
    shipped = config.Config().to_dict()
    data = {**shipped, "base_model": args.model, "eval_steps": 0, "save_steps": 10**6,
            "paths": {**shipped["paths"], "root": str(root), "model_cache": str(cache)},
            "training": {**shipped["training"], "batch_size": args.batch, "gradient_accumulation_steps": 1,
                         "device": "cpu"},
            "eval": {**shipped["eval"], "at_start": False, "probe_file": None}}
    cfg_path = root / "config.json"

    def write_config(lr: float | None = None) -> None:
        d = json.loads(json.dumps(data))
        if lr is not None:
            d["training"]["learning_rate"] = lr
        cfg_path.write_text(json.dumps(d, indent=2))

    write_config()
    cfg = config.load(str(cfg_path), [])
    base = resolve_base(cfg)
    rehearsal = cache_path(cfg, base, load_prompts(cfg))
    rehearsal.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rehearsal, normal_records(200, seed=999) + [chat("Say hello.", "Hello!")])
    tok = AutoTokenizer.from_pretrained(base)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    history = root / "status" / "history"
    print(f"project {root}; model {args.model}; shipped guard {json.dumps(shipped['guard'])}; "
          f"rehearsal {shipped['training']['rehearsal_fraction']}, {args.batch} examples a step", flush=True)

    def run(name: str, files: list[Path], lr: float | None = None) -> int:
        write_config(lr)
        before = len(read_jsonl(history / "anomalies.jsonl"))
        steps_before = len(read_jsonl(history / "steps.jsonl"))
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, files), "--config", str(cfg_path)],
                           env=env, capture_output=True, text=True)
        steps = read_jsonl(history / "steps.jsonl")[steps_before:]
        events = read_jsonl(history / "anomalies.jsonl")[before:]
        newest = ck.newest_complete(root / "checkpoints")
        print(f"\n## {name}: exit {r.returncode} after {time.monotonic() - t0:.0f} s; {len(steps)} steps logged; "
              f"newest checkpoint {newest.path.name if newest else None}", flush=True)
        print("step losses: " + ", ".join(
            f"{s['global_step']}:{s['loss']:.2f}{'*' if s.get('skipped') else ''}" if isinstance(s.get("loss"), float)
            else f"{s['global_step']}:{s.get('loss_text', 'null')}*" for s in steps) + "   (* skipped)")
        for e in events:
            print(f"anomaly step {e['global_step']}: {e['kind']}, loss {e['loss']}, threshold {e['threshold']}, "
                  f"shares {e.get('shares')}, files {e['files']}")
        ts = json.loads((root / "status" / "training_status.json").read_text())
        if ts.get("diverged"):
            print(f"diverged: {ts['diverged']['reason']}")
        if r.returncode not in (0, 5):
            print(r.stderr[-3000:], file=sys.stderr)
        return r.returncode

    todo = {int(x) for x in args.runs.split(",")}
    ok = True
    if 1 in todo:
        ok &= run("run 1: an ordinary file", [write_jsonl(root / "ordinary1.jsonl", normal_records(args.lines, 11))]) == 0
    window = json.loads((history / "guard_window.json").read_text())
    print(f"new_file_levels after run 1: {window.get('new_file_levels')}")
    if 2 in todo:
        kept = ck.newest_complete(root / "checkpoints")
        code2 = run("run 2: a new ordinary file at learning rate 1.0",
                    [write_jsonl(root / "ordinary2.jsonl", normal_records(args.lines, 12))], lr=1.0)
        after = ck.newest_complete(root / "checkpoints")
        same = kept is not None and after is not None and after.path == kept.path
        print(f"run 1's checkpoint still the newest: {same}")
        ok &= code2 == 5 and same
    if 3 in todo:
        code3 = run("run 3: a new ordinary file beside word salad",
                    [write_jsonl(root / "ordinary3.jsonl", normal_records(args.lines, 13)),
                     write_jsonl(root / "salad.jsonl", salad_records(args.salad, tok))])
        ts = json.loads((root / "status" / "training_status.json").read_text())
        blamed = (ts.get("diverged") or {}).get("files")
        print(f"blamed: {blamed}")
        ok &= code3 == 5 and blamed == ["salad.jsonl"]
    print(f"\nverdict: {'as the issue asks' if ok else 'NOT as the issue asks'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
