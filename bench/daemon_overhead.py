"""How much of the daemon's wall time goes to loading the model, when files arrive one after another.

    python bench/daemon_overhead.py [--files 6] [--examples 8] [--every 3,30] [--quick] [--model smollm2-135m-instruct]

For each arrival interval of ``--every`` (the trickle scenarios: one file every 3 s, one every 30 s)
it drops ``--files`` small chat JSONL files into a fresh project's inbox while ``daemon.py`` runs,
in three modes:

- **worker** (the default daemon): one long-lived trainer worker keeps the model loaded; files
  that arrive while a run trains go together into the next run;
- **batched** (``daemon.worker=false``): one ``train.py`` child per run, runs batched as above;
- **per-file** (``daemon.worker=false``, ``daemon.batch_max_files=1``): one ``train.py`` run, hence
  one process start and model load, per file: the one-process-per-run reference.

For each it reports the wall time from the first drop to the last file in ``queue/done``, the
number of runs, of model loads while files waited (a worker logs each reload; a ``train.py`` run is
one load) and the start-up share: loads x (interpreter + imports + model load + LoRA, measured here
in a fresh subprocess) / wall time. A daemon runs for days, so in worker mode the files are dropped
once the worker has loaded the model ("waiting for runs" in its log); that one load is reported apart. ``--quick`` (3 files of 4 examples) keeps a smoke run short. Results go to
stdout as a Markdown table.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ultimate_trainer.core.status import iter_jsonl  # noqa: E402

LOAD_PROBE = """
import time, sys
t = time.monotonic()
from ultimate_trainer.core import config
from ultimate_trainer.model import loading as model
cfg = config.load(sys.argv[1])
path = model.resolve_base(cfg)
model.load_tokenizer(path)
model.attach_lora(cfg, model.load_base_model(cfg, path, quantize=cfg.load_in_4bit))
print(time.monotonic() - t)
"""


def make_project(root: Path, model: str) -> Path:
    cfg = {
        "base_model": model, "load_in_4bit": True, "eval_steps": 0, "save_steps": 50,
        "paths": {"root": str(root), "model_cache": str(REPO / "models" / "cache")},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"batch_size": 4, "gradient_accumulation_steps": 1, "max_seq_length": 256,
                     "gradient_checkpointing": False, "device": "cpu",
                     "rehearsal_fraction": 0.0},
        "data": {"heldout_fraction": 0.0},
        "eval": {"at_start": False},
        "daemon": {"poll_interval": 0.5, "file_stable_seconds": 0.5, "start_monitors": False,
                   "consolidation_hour": None, "disk_warn_gb": 0.0, "disk_critical_gb": 0.0},
    }
    (root / "inbox").mkdir(parents=True)
    path = root / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def write_file(path: Path, n: int, tag: str) -> None:
    tmp = path.with_name(path.name + ".part")  # written under a temporary name, renamed when complete
    with open(tmp, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{tag}: what is {i} + {i}?"},
                                             {"role": "assistant", "content": str(2 * i)}]}) + "\n")
    os.rename(tmp, path)


def run_mode(name: str, extra: list[str], args: argparse.Namespace, workdir: Path) -> dict:
    root = workdir / name
    cfg = make_project(root, args.model)
    cmd = [sys.executable, str(REPO / "daemon.py"), "--config", str(cfg), *extra]
    log = open(root / "daemon.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    if not any("daemon.worker=false" in e for e in extra):
        # A daemon runs for days: its worker loads the model once, before files arrive. Wait for that,
        # so the window below holds only what files wait for (the load is reported apart).
        while "waiting for runs" not in (root / "daemon.log").read_text(errors="replace"):
            if proc.poll() is not None:
                raise SystemExit(f"{name}: daemon exited {proc.returncode}; see {root / 'daemon.log'}")
            time.sleep(0.2)
    t0 = time.monotonic()
    for i in range(args.files):
        write_file(root / "inbox" / f"f{i}.jsonl", args.examples, f"{name}{i}")
        if i < args.files - 1:
            time.sleep(args.every)
    done = root / "queue" / "done"
    while len(list(done.glob("*.jsonl"))) + len(list((root / "queue" / "failed").glob("*.jsonl"))) < args.files:
        if proc.poll() is not None:
            raise SystemExit(f"{name}: daemon exited {proc.returncode}; see {root / 'daemon.log'}")
        time.sleep(0.2)
    wall = time.monotonic() - t0
    (root / ".stop").touch()
    proc.wait(timeout=120)
    runs = sum(1 for r in iter_jsonl(root / "queue" / "journal.jsonl") if r.get("event") == "launch")
    log_text = (root / "daemon.log").read_text(errors="replace")
    worker = "started trainer worker" in log_text
    # in the window: a worker's reloads (its preload came before); one load per train.py run
    loads = log_text.count("loading the model:") if worker else runs
    return {"mode": name, "wall": wall, "runs": runs, "loads": loads, "preloaded": worker, "cfg": cfg}


MODES = [("worker", []),
         ("batched", ["--set", "daemon.worker=false"]),
         ("per-file", ["--set", "daemon.worker=false", "--set", "daemon.batch_max_files=1"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--examples", type=int, default=8, help="examples per file")
    ap.add_argument("--every", default="3,30", help="seconds between arrivals, comma-separated scenarios")
    ap.add_argument("--quick", action="store_true", help="3 files of 4 examples: a smoke run")
    ap.add_argument("--modes", default=",".join(m for m, _ in MODES), help="which of worker,batched,per-file")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    if args.quick:
        args.files, args.examples = 3, 4
    wanted = args.modes.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="daemon-bench-") as tmp:
        work = Path(tmp)
        for every in (float(e) for e in args.every.split(",")):
            args.every = every
            for name, extra in MODES:
                if name in wanted:
                    results.append({**run_mode(f"{name}-{every:g}s", extra, args, work), "every": every,
                                    "kind": name})
        probe = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(results[0]["cfg"])], cwd=REPO,
                               capture_output=True, text=True, check=True)
        load = float(probe.stdout.strip().splitlines()[-1])
    print(f"{args.files} files x {args.examples} examples, model {args.model}; start-up (interpreter + imports "
          f"+ model load + LoRA) measured at {load:.1f} s per load\n")
    print("| one file every | mode | runs | model loads while files waited | wall s | start-up share |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        loads = f"{r['loads']} (+1 before the first file)" if r["preloaded"] else str(r["loads"])
        print(f"| {r['every']:g} s | {r['kind']} | {r['runs']} | {loads} | {r['wall']:.1f} "
              f"| {min(r['loads'] * load / r['wall'], 1):.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
