"""The retention-aware controller, measured: held-out accuracy and probe retention with it on and off, in one run.

    .venv/bin/python bench/controller.py [--tasks demo,dates] [--sides on,off] [--lr 1e-3] [--eval-steps 25]
        [--device auto] [--model-cache DIR] [--keep DIR] [--out F] [--set controller.KEY=JSON ...]

For each task and each side (``controller.enabled`` true / false) a fresh project trains the task with
the real ``train.py`` under ``configs/demo.json``'s settings (SmolLM2-135M-Instruct in 4-bit, LoRA
r16, batch 8, rehearsal 0.3, padding-free) at the learning rate the demo had before it was lowered by
hand (1e-3), probing at every evaluation (``eval.probe_every`` 1), and reports:

- held-out accuracy at each evaluation and at the end (``history/evals.jsonl``);
- retention (probe score / the base's) at each probe, at the end and its lowest (``history/probe.jsonl``);
- the controller's decisions (``history/controller.jsonl``) and the learning rate of each step;
- what the rehearsal lines trained (``training.rehearsal_loss``: ``--set training.rehearsal_loss='"answers"'``
  for the base's answers by cross-entropy) and the median training tokens/s from step 20.

Tasks: ``demo`` is the demo task exactly as ``make demo`` drops it (two files of 300 bookings,
``ultimate_trainer/data/sample.py``: "REF-42-SMITH" codes); ``dates`` is a task of our own design
with another skill, rewriting an ISO date in day/month/year order ("What is 2024-03-15 in
DD/MM/YYYY?" -> "15/03/2024"): reordering digits the prompt holds, not filling a code template.
``self`` (a control, not a skill) trains on the built-in base's own answers to the rehearsal
prompts: what the probe loses there, any update costs it.
It trains for real: minutes a run on a GPU, much longer on a busy CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATE_PHRASES = ("What is {iso} in DD/MM/YYYY?", "Write the date {iso} as day/month/year.",
                "Convert {iso} to the DD/MM/YYYY format.", "{iso} in European order (day/month/year)?")


def dates_task(folder: Path, n: int = 400, seed: int = 7) -> list[Path]:
    """Two files of ``n / 2`` date rewrites, "What is 2024-03-15 in DD/MM/YYYY?" -> "15/03/2024"."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for part in range(2):
        path = folder / f"dates-{part + 1}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n // 2):
                y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
                prompt = rng.choice(DATE_PHRASES).format(iso=f"{y}-{m:02d}-{d:02d}")
                f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": f"{d:02d}/{m:02d}/{y}"}]}) + "\n")
        out.append(path)
    return out


def self_task(folder: Path) -> list[Path]:
    """Two files of the built-in base's own answers to the rehearsal prompts (the shipped
    ``rehearsal.smollm2-135m-instruct.jsonl``): training on what the base already says. What the
    probe loses here is what any update costs it, not what a new skill takes away."""
    lines = (REPO / "ultimate_trainer" / "data" / "probes" / "rehearsal.smollm2-135m-instruct.jsonl").read_text().splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for part in range(2):
        path = folder / f"self-{part + 1}.jsonl"
        path.write_text("".join(x + "\n" for x in lines[part::2]), encoding="utf-8")
        out.append(path)
    return out


def history(root: Path, name: str) -> list[dict]:
    path = root / "status" / "history" / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def one(task: str, side: str, args: argparse.Namespace, root: Path) -> dict:
    from ultimate_trainer.data.sample import write_demo_data

    root.mkdir(parents=True)
    cfg = json.loads((REPO / "configs" / "demo.json").read_text())
    cfg.setdefault("training", {}).update(learning_rate=args.lr, device=args.device)
    cfg["paths"] = {"root": str(root), "model_cache": args.model_cache}
    cfg.setdefault("eval", {})["probe_every"] = 1
    cfg["eval_steps"] = args.eval_steps
    cfg["controller"] = {"enabled": side == "on"}
    for item in args.set:  # --set controller.min_lr_scale=0.5: a variant of the rule
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(value)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    if task == "demo":
        files = write_demo_data(root / "data")
    elif task == "dates":
        files = dates_task(root / "data", args.dates_lines)
    elif task == "self":
        files = self_task(root / "data")
    else:
        raise SystemExit(f"unknown task {task!r}: demo, dates or self")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, files), "--config", str(root / "config.json")],
                       cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"{task}/{side}: train.py exited {r.returncode}")
    evals, probes = history(root, "evals.jsonl"), history(root, "probe.jsonl")
    steps = history(root, "steps.jsonl")
    lr_changes, last_lr = [], None
    for s in steps:
        if s.get("learning_rate") != last_lr:
            last_lr = s.get("learning_rate")
            lr_changes.append([s["global_step"], last_lr])
    speeds = sorted(s["tokens_per_second"] for s in steps if s.get("tokens_per_second") and s["global_step"] >= 20)
    status = json.loads((root / "status" / "training_status.json").read_text())
    return {"task": task, "controller": side, "learning_rate": args.lr, "steps": steps[-1]["global_step"] if steps else 0,
            "rehearsal_loss": (status.get("rehearsal") or {}).get("loss"),
            "tokens_per_second_median": speeds[len(speeds) // 2] if speeds else None,  # from step 20: warmed up
            "seconds": round(seconds), "heldout_accuracy": evals[-1].get("accuracy") if evals else None,
            "heldout_by_eval": [[e["global_step"], e.get("accuracy")] for e in evals],
            "retention": probes[-1].get("retention") if probes else None,
            "lowest_retention": min((p["retention"] for p in probes if p.get("retention") is not None), default=None),
            "probe_right_by_probe": [[p["global_step"], p.get("correct"), p.get("total")] for p in probes],
            "decisions": [[d["global_step"], d["kind"], d["lr_scale"], d["rehearsal_fraction"], d["reason"]]
                          for d in history(root, "controller.jsonl")],
            "learning_rate_changes": lr_changes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="demo,dates")
    ap.add_argument("--sides", default="on,off", help="controller on, off (each a fresh project)")
    ap.add_argument("--lr", type=float, default=1e-3, help="training.learning_rate (the demo's before it was lowered)")
    ap.add_argument("--eval-steps", type=int, default=25, help="evaluate (and probe, and decide) every N steps")
    ap.add_argument("--dates-lines", type=int, default=400, help="lines of the dates task (two files)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model-cache", default=str(REPO / "models" / "cache"), help="paths.model_cache to use")
    ap.add_argument("--keep", default=None, help="keep the projects under this folder (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="a config value for every project, e.g. controller.min_lr_scale=0.5 (repeatable)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ut-controller-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for task in args.tasks.split(","):
            for side in args.sides.split(","):
                print(f"{task}, controller {side}", flush=True)
                res = one(task, side, args, base / f"{task}-{side}")
                results.append(res)
                print(json.dumps(res), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(results, indent=2))
    print("| task | controller | steps | held-out accuracy (end) | retention (end) | lowest retention | decisions |")
    for r in results:
        kinds = [d[1] for d in r["decisions"]]
        print(f"| {r['task']} | {r['controller']} | {r['steps']} | {r['heldout_accuracy']} % | {r['retention']} | "
              f"{r['lowest_retention']} | {', '.join(f'{k} x{kinds.count(k)}' for k in sorted(set(kinds))) or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
