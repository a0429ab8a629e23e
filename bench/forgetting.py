"""Forgetting, measured: held-out accuracy with and without replay, and probe retention across a consolidation.

    .venv/bin/python bench/forgetting.py [--replay 0.05] [--quick] [--device auto] [--model-cache DIR] [--out F]

Two tasks, trained one after the other the way the daemon would (each finished file moves to
``queue/done/``): first a task of our own design (``spell``: "Spell backwards: apple" -> "elppa",
checkable with the normalized matcher), then the demo task (``ultimate_trainer/data/sample.py``
bookings, with ``configs/demo.json``'s settings). For each replay setting (0, then ``--replay``) it
runs the real ``train.py`` twice and the real consolidation child once, in a fresh project, and
reports:

- the demo task's held-out accuracy at the end of its run (``history/evals.jsonl``);
- retention (probe score / the base's) at the last probe (``training_status.json``);
- the consolidation gate's figures (``models/consolidated/*/manifest.json``): held-out accuracy over
  both tasks' held-out lines and retention, of the base and of the merged candidate, and whether it
  was adopted.

It trains for real: minutes on a GPU, much longer on a busy CPU (``--quick`` halves the data).
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

WORDS = ("apple river stone cloud pencil garden window silver orange planet rabbit candle forest bridge "
         "yellow market winter summer doctor camera guitar ticket island butter mirror rocket kitten "
         "basket dragon violin helmet jacket lemon magnet needle pepper saddle tunnel wallet zipper").split()


def spell_task(path: Path, n: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            w = "".join(rng.sample(WORDS, 1)) + rng.choice(["", "s", "er", "ly"])
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Spell backwards: {w}"},
                                             {"role": "assistant", "content": w[::-1]}]}) + "\n")
    return path


def run(cmd: list[str], cwd: Path) -> None:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    print(f"  {' '.join(Path(c).name if '/' in c else c for c in cmd[1:4])}... exit {r.returncode} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    if r.returncode not in (0, 6):
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"{cmd} failed")


def one_setting(replay: float, quick: bool, device: str, root: Path, cache: str) -> dict:
    from ultimate_trainer.data.sample import write_demo_data

    root.mkdir(parents=True)
    demo = json.loads((REPO / "configs" / "demo.json").read_text())
    demo.setdefault("training", {})["replay_fraction"] = replay
    demo["training"]["device"] = device
    demo["paths"] = {"root": str(root), "model_cache": cache}
    demo.setdefault("eval", {})["probe_every"] = 1
    (root / "config.json").write_text(json.dumps(demo, indent=2))
    done = root / "queue" / "done"
    done.mkdir(parents=True)
    data = root / "data"
    data.mkdir()
    n = 150 if quick else 300
    first = spell_task(data / "spell.jsonl", n)
    demo_files = write_demo_data(data, n_files=1, examples_per_file=n)
    py, cfg = sys.executable, ["--config", str(root / "config.json")]
    for f in [first, *demo_files]:
        run([py, str(REPO / "train.py"), str(f), *cfg], REPO)
        f.rename(done / f.name)  # what the daemon does with a finished file
    evals = [json.loads(x) for x in (root / "status/history/evals.jsonl").read_text().splitlines()]
    ts = json.loads((root / "status/training_status.json").read_text())
    run([py, "-m", "ultimate_trainer.trainer.consolidate", *cfg], REPO)
    manifests = sorted((root / "models" / "consolidated").glob("**/manifest.json"))
    gate = json.loads(manifests[-1].read_text()).get("gate") or {}
    return {"replay_fraction": replay, "demo_heldout_accuracy": evals[-1].get("accuracy"),
            "retention_after_training": (ts.get("retention") or {}).get("ratio"),
            "gate": {k: gate.get(k) for k in ("adopted", "reason", "heldout_prompts")},
            "base": {k: (gate.get("base") or {}).get(k) for k in ("accuracy", "retention")},
            "consolidated": {k: (gate.get("candidate") or {}).get(k) for k in ("accuracy", "retention")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replay", type=float, default=0.05)
    ap.add_argument("--quick", action="store_true", help="150 examples per task instead of 300")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model-cache", default=str(REPO / "models" / "cache"), help="paths.model_cache to use")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ut-forgetting-") as tmp:
        for replay in (0.0, args.replay):
            print(f"replay_fraction={replay}", flush=True)
            results.append(one_setting(replay, args.quick, args.device, Path(tmp) / f"replay-{replay}", args.model_cache))
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
