"""Forgetting, measured: held-out accuracy and probe retention without and with rehearsal, and across a consolidation.

    .venv/bin/python bench/forgetting.py [--settings 0.05:0,0.05:0.3] [--only-demo] [--quick] [--device auto]
        [--model-cache DIR] [--rehearsal-answers FILE] [--out F]

Two tasks, trained one after the other the way the daemon would (each finished file moves to
``queue/done/``): first a task of our own design (``orders``: "Make the order code for 12 lamps."
-> "ORD-12-LAMP", checkable with the normalized matcher), then the demo task exactly as ``make demo`` drops it (two
files of 300 ``ultimate_trainer/data/sample.py`` bookings, 568 trained, with ``configs/demo.json``'s
settings). ``--only-demo`` trains the demo task alone (a first task: nothing to replay). Each
setting is ``replay_fraction:rehearsal_fraction``; for each it runs the real ``train.py`` per task
and the real consolidation child once, in a fresh project (``--packing``, default auto:
padding-free, a step is 8 examples), and reports:

- the demo task's held-out accuracy at the end of its run (``history/evals.jsonl``);
- retention (probe score / the base's) at the last probe (``training_status.json``), and its lowest;
- the consolidation gate's figures (``models/consolidated/*/manifest.json``): held-out accuracy over
  the tasks' held-out lines and retention, of the base and of the merged candidate, and whether it
  was adopted.

The base's rehearsal answers are generated once (the first setting that rehearses) and copied into
the other projects; ``--rehearsal-answers`` hands in a file of them made before (the same base).
It trains for real: minutes on a GPU, much longer on a busy CPU (``--quick`` halves the orders task).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ITEMS = ("lamp chair table pencil bottle basket candle mirror helmet jacket ticket violin camera guitar "
         "kettle ladder magnet needle pillow saddle tunnel wallet zipper rocket").split()
PHRASES = ("Make the order code for {q} {item}s.", "{q} {item}s were ordered. What is the order code?",
           "Order code for {q} x {item}?", "What code goes on an order of {q} {item}s?")


def orders_task(path: Path, n: int, seed: int = 1) -> Path:
    """Our second task: order codes, "Make the order code for 12 lamps." -> "ORD-12-LAMP".

    Learnable from the prompt like the demo's bookings ("REF-42-SMITH") and close enough to them
    that training on the bookings afterwards can overwrite it: what replay is there to prevent."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            q, item = rng.randint(1, 99), rng.choice(ITEMS)
            prompt = rng.choice(PHRASES).format(q=q, item=item)
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": f"ORD-{q}-{item.upper()}"}]}) + "\n")
    return path


def run(cmd: list[str], cwd: Path) -> None:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    print(f"  {' '.join(Path(c).name if '/' in c else c for c in cmd[1:4])}... exit {r.returncode} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    if r.returncode not in (0, 6):
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"{cmd} failed")


def seed_answers(cfg_path: Path, answers: Path) -> None:
    """Put ``answers`` (the base's rehearsal answers) where this project's runs look for them."""
    from ultimate_trainer.core import config
    from ultimate_trainer.trainer.rehearsal.prompts import cache_path, load_prompts
    from ultimate_trainer.model.loading import resolve_base

    cfg = config.load(str(cfg_path), [])
    target = cache_path(cfg, resolve_base(cfg), load_prompts(cfg))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(answers, target)


def one_setting(replay: float, rehearsal: float, args: argparse.Namespace, root: Path,
                answers: Path | None) -> tuple[dict, Path | None]:
    from ultimate_trainer.data.sample import write_demo_data

    root.mkdir(parents=True)
    demo = json.loads((REPO / "configs" / "demo.json").read_text())
    t = demo.setdefault("training", {})
    t.update(replay_fraction=replay, rehearsal_fraction=rehearsal, device=args.device, packing=args.packing)
    if args.lr:
        t["learning_rate"] = args.lr
    demo["paths"] = {"root": str(root), "model_cache": args.model_cache}
    demo.setdefault("eval", {})["probe_every"] = 1
    if args.eval_steps:
        demo["eval_steps"] = args.eval_steps
    demo.setdefault("daemon", {})["start_monitors"] = False
    (root / "config.json").write_text(json.dumps(demo, indent=2))
    if answers is not None and rehearsal > 0:
        seed_answers(root / "config.json", answers)
    done = root / "queue" / "done"
    done.mkdir(parents=True)
    data = root / "data"
    data.mkdir()
    tasks = [] if args.only_demo else [[orders_task(data / "orders.jsonl", 150 if args.quick else 300)]]
    tasks.append(write_demo_data(data / "demo"))  # as make demo drops it: 2 files of 300 bookings
    py, cfg = sys.executable, ["--config", str(root / "config.json")]
    demo_evals_from = 0
    for files in tasks:
        demo_evals_from = len(history(root, "evals.jsonl"))
        run([py, str(REPO / "train.py"), *map(str, files), *cfg], REPO)
        for f in files:
            f.rename(done / f.name)  # what the daemon does with a finished file
    evals = history(root, "evals.jsonl")
    first_task = evals[demo_evals_from - 1].get("accuracy") if demo_evals_from else None
    demo_probes = [p for p in history(root, "probe.jsonl") if p.get("global_step", 0) >= evals[demo_evals_from]["global_step"]]
    ts = json.loads((root / "status/training_status.json").read_text())
    run([py, "-m", "ultimate_trainer.trainer.consolidation", *cfg], REPO)
    manifests = sorted((root / "models").glob("**/manifest.json"), key=lambda p: p.stat().st_mtime)
    gate = json.loads(manifests[-1].read_text()).get("gate") or {}
    cached = sorted((root / ".work" / "rehearsal").glob("*.jsonl"))
    result = {"replay_fraction": replay, "rehearsal_fraction": rehearsal, "tasks": "demo" if args.only_demo else
              "orders, then demo", "orders_heldout_accuracy_after_its_run": first_task,
              "demo_heldout_accuracy": evals[-1].get("accuracy"),
              "demo_heldout_accuracy_by_step": [[e.get("global_step"), e.get("accuracy")] for e in evals[demo_evals_from:]],
              "retention_after_training": (ts.get("retention") or {}).get("ratio"),
              "retention_by_step": [[p.get("global_step"), p.get("retention")] for p in demo_probes],
              "rehearsal": ts.get("rehearsal"), "replay": ts.get("replay"),
              "gate": {k: gate.get(k) for k in ("adopted", "reason", "heldout_prompts")},
              "base": {k: (gate.get("base") or {}).get(k) for k in ("accuracy", "retention")},
              "consolidated": {k: (gate.get("candidate") or {}).get(k) for k in ("accuracy", "retention")},
              "gate_heldout_by_task": {side: by_task(gate.get(side)) for side in ("base", "candidate")}}
    return result, (cached[0] if cached else None)


def by_task(scored: dict | None) -> dict[str, list[int]]:
    """The gate's held-out ``[correct, total]`` per task (orders.jsonl; the demo's files together)."""
    out: dict[str, list[int]] = {}
    for name, (right, total) in (((scored or {}).get("heldout") or {}).get("by_file") or {}).items():
        tally = out.setdefault("orders" if name.startswith("orders") else "demo", [0, 0])
        tally[0], tally[1] = tally[0] + right, tally[1] + total
    return out


def history(root: Path, name: str) -> list[dict]:
    path = root / "status" / "history" / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="0.05:0,0.05:0.3",
                    help="comma-separated replay_fraction:rehearsal_fraction pairs, one project each")
    ap.add_argument("--only-demo", action="store_true", help="train the demo task alone (no orders task first)")
    ap.add_argument("--quick", action="store_true", help="150 orders examples instead of 300")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--lr", type=float, default=None, help="training.learning_rate (default: configs/demo.json's)")
    ap.add_argument("--packing", default="auto", help="training.packing (auto: padding-free, the same steps as off)")
    ap.add_argument("--eval-steps", type=int, default=None, help="evaluate (and probe) every N steps "
                    "(default: configs/demo.json's); a run is evaluated at its end whatever N")
    ap.add_argument("--model-cache", default=str(REPO / "models" / "cache"), help="paths.model_cache to use")
    ap.add_argument("--rehearsal-answers", default=None, help="the base's rehearsal answers, generated before")
    ap.add_argument("--keep", default=None, help="keep the projects under this folder (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    settings = [tuple(float(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    answers = Path(args.rehearsal_answers) if args.rehearsal_answers else None
    results = []
    with tempfile.TemporaryDirectory(prefix="ut-forgetting-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for replay, rehearsal in settings:
            print(f"replay_fraction={replay} rehearsal_fraction={rehearsal}", flush=True)
            result, cached = one_setting(replay, rehearsal, args, base / f"replay-{replay}-rehearsal-{rehearsal}",
                                         answers)
            answers = answers or cached
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
