"""Evaluation time against training time for one train.py run, with the evaluation's breakdown.

    python bench/eval_overhead.py [--configs demo,defaults] [--examples 600] [--max-steps 100]
        [--rehearsal shipped|FRACTION]

For each configuration it runs the real ``train.py`` on the built-in SmolLM2-135M-Instruct (4-bit,
CPU here) over the demo data (``data/sample.py``, booking references: short answers, like
``make demo``) in a fresh project, then reads the run's own records:

- ``history/evals.jsonl``: per evaluation, the seconds of generation and of validation loss (the
  trainer times both; the evaluation at step 0 included);
- ``history/probe.jsonl``: the base-knowledge probe's seconds, reported apart (issue 13's cost);
- ``history/steps.jsonl``: the time of the first and last logged step; training seconds are that
  span less the evaluations and probes inside it, plus one step (1-second timestamps: long runs
  read best).

Configurations: ``demo`` is ``configs/demo.json`` (eval every 25 steps, 16 prompts, 16 new tokens,
validation loss over 16 examples); ``defaults`` is the shipped ``config.json`` with the built-in
model in place of Qwen (eval every 25 steps, 20 prompts, 64 new tokens). Both rehearse 0.3 as
shipped unless ``--rehearsal`` says otherwise. The goal (issue 9): evaluation at most 10% of
training time. Prints a Markdown table, then the figures as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ultimate_trainer.core.status import iter_jsonl  # noqa: E402
from ultimate_trainer.data import sample  # noqa: E402

CONFIGS = {"demo": REPO / "configs" / "demo.json", "defaults": REPO / "config.json"}


def _ts(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def run_config(name: str, args: argparse.Namespace, work: Path) -> dict:
    root = work / name
    files = sample.write_demo_data(root / "data", n_files=1, examples_per_file=args.examples, seed=1)
    sets = ["base_model=smollm2-135m-instruct", "load_in_4bit=true", f"paths.root={root}",
            f"paths.model_cache={REPO / 'models' / 'cache'}", "training.device=cpu", "save_steps=100000"]
    if args.rehearsal != "shipped":  # rehearsal (0.3 in both shipped configs) adds training steps
        sets.append(f"training.rehearsal_fraction={float(args.rehearsal)}")
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, files), "--config", str(CONFIGS[name]),
           "--max-steps", str(args.max_steps)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{name}: train.py exited {r.returncode}:\n{r.stderr[-3000:]}")
    evals = list(iter_jsonl(root / "status" / "history" / "evals.jsonl"))
    steps = list(iter_jsonl(root / "status" / "history" / "steps.jsonl"))
    first, last = _ts(steps[0]["time"]), _ts(steps[-1]["time"])
    probes = list(iter_jsonl(root / "status" / "history" / "probe.jsonl"))
    inside = sum(sum(e["seconds"].values()) for e in evals if first < _ts(e["time"]) <= last) + \
        sum(p.get("seconds", 0.0) for p in probes if first < _ts(p["time"]) <= last)
    n_steps = steps[-1]["global_step"] - steps[0]["global_step"]
    per_step = max(last - first - inside, 0.0) / max(n_steps, 1)
    train = per_step * (n_steps + 1)
    gen = sum(e["seconds"]["generation"] for e in evals)
    val = sum(e["seconds"]["val_loss"] for e in evals)
    baseline = json.loads((root / "status" / "history" / "probe_baseline.json").read_text())
    return {"config": name, "steps": steps[-1]["global_step"], "evals": len(evals), "train": train,
            "generation": gen, "val_loss": val, "wall": wall, "probes": len(probes),
            "probe": sum(p.get("seconds", 0.0) for p in probes), "probe_baseline": baseline.get("seconds"),
            "per_evaluation": [[e["global_step"], e["seconds"]["generation"], e["seconds"]["val_loss"]] for e in evals],
            "per_probe": [[p["global_step"], p.get("seconds")] for p in probes]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="demo,defaults")
    ap.add_argument("--examples", type=int, default=600, help="demo examples in the training file")
    ap.add_argument("--max-steps", type=int, default=100, help="cap on the run's optimizer steps")
    ap.add_argument("--rehearsal", default="shipped",
                    help="training.rehearsal_fraction: 'shipped' (as the configuration has it) or a number")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        rows = [run_config(name, args, Path(tmp)) for name in args.configs.split(",")]
    print("| config | steps | evaluations | train s | eval s (generation + val loss) | eval / train "
          "| probes | probe s | probe / train | probe baseline s (once per base) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ev = r["generation"] + r["val_loss"]
        share = f"{ev / r['train']:.1%}" if r["train"] else "n/a (fewer than two logged steps)"
        probe_share = f"{r['probe'] / r['train']:.1%}" if r["train"] else "n/a"
        print(f"| {r['config']} | {r['steps']} | {r['evals']} | {r['train']:.1f} | {ev:.1f} "
              f"({r['generation']:.1f} + {r['val_loss']:.1f}) | {share} | {r['probes']} | {r['probe']:.1f} "
              f"| {probe_share} | {r['probe_baseline'] or 0:.1f} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
