"""A test double for the train.py *child process*, and a runner for the daemon with it injected.

``python tests/_daemon_helpers.py trainer FILE... [--config P] [--set K=V ...]`` follows train.py's
contract without a model: one optimizer step per usable line (a JSON object), a complete checkpoint
``checkpoint-<global_step>/ut_checkpoint.json`` after every step, reports in status/reports,
training_status.json, SIGTERM = finish the step, save, exit 0, exit 3 when a file has no usable line,
and a run resumed on the same files continues from its newest checkpoint. It refuses to write a
checkpoint that exists (that would be training something twice) by appending to
``status/fake_violations.txt`` and exiting 1, so tests can assert nothing was trained twice.

Environment knobs: FAKE_STEP_SECONDS (sleep per step), FAKE_EXIT (exit with this code at start),
FAKE_DIVERGE=NAME (when NAME is among the files: the divergence guard's exit 5, blaming NAME).

``python tests/_daemon_helpers.py worker --worker-dir DIR [--config P] [--set K=V ...]`` is the same
trainer behind the real worker protocol (core/worker_files.py): it takes requests until SIGTERM,
answers each with a result, and ends after a run that did not exit 0 or 3, like trainer/worker.py.

``python tests/_daemon_helpers.py daemon [daemon.py args]`` runs the real daemon with these children
(the worker unless ``daemon.worker=false``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

from ultimate_trainer.core import checkpoints as ck  # noqa: E402
from ultimate_trainer.core import config as config_mod  # noqa: E402
from ultimate_trainer.core import worker_files  # noqa: E402
from ultimate_trainer.core.exitcodes import Exit  # noqa: E402
from ultimate_trainer.core.status import TRAINING_STATUS, atomic_write_json, report_path  # noqa: E402
from ultimate_trainer.core.times import now_iso  # noqa: E402


def trainer_cmd(files: list[Path], cfg_args: list[str]) -> list[str]:
    return [sys.executable, str(HERE), "trainer", *map(str, files), *cfg_args]


def worker_cmd(worker_dir: Path, cfg_args: list[str]) -> list[str]:
    return [sys.executable, str(HERE), "worker", "--worker-dir", str(worker_dir), *cfg_args]


def fake_worker(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker-dir", required=True, type=Path)
    args, cfg_args = ap.parse_known_args(argv)  # the rest (--config/--set) goes to each run
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        req = worker_files.next_request(args.worker_dir)
        if req is None:
            time.sleep(0.02)
            continue
        code = fake_trainer([*map(str, req.files), *cfg_args], stop)
        ending = bool(stop) or code not in (Exit.OK, Exit.DATA)
        worker_files.write_result(args.worker_dir, req.seq, code=int(code), pid=os.getpid(), exiting=ending)
        if ending:
            return code
    return Exit.OK


def fake_trainer(argv: list[str], stop: list[int] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--manifest")  # the daemon describes the run (core/manifest.py); this fake reads the files
    config_mod.add_arguments(ap)
    args = ap.parse_args(argv)
    cfg = config_mod.from_args(args)
    if os.environ.get("FAKE_EXIT"):
        return int(os.environ["FAKE_EXIT"])
    status, ckdir = cfg.path("status"), cfg.path("checkpoints")
    if stop is None:
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    files, unusable = [], False
    for f in map(Path, args.files):
        data = f.read_bytes()
        examples = 0
        for line in data.splitlines():
            try:
                examples += isinstance(json.loads(line), dict)
            except ValueError:
                pass
        digest = hashlib.sha256(data).hexdigest()
        atomic_write_json(report_path(status, f), {
            "file": str(f), "sha256": digest, "examples": examples, "usable": examples > 0,
            "error": None if examples else "no usable example", "created_at": now_iso()})
        unusable |= examples == 0
        files.append({"name": f.name, "sha256": digest, "examples": examples})
    if unusable:
        return Exit.DATA
    blamed = os.environ.get("FAKE_DIVERGE")
    if blamed and blamed in [Path(f).name for f in args.files]:
        reason = f"diverged: 2 anomalies in this run (last: non-finite loss at step 1); files: {blamed}"
        atomic_write_json(status / TRAINING_STATUS, {
            "schema_version": 1, "state": "error", "pid": os.getpid(), "error": reason,
            "diverged": {"reason": reason, "files": [blamed], "run_id": "fake"}})
        return Exit.DIVERGED
    run_id = hashlib.sha256("".join(sorted(x["sha256"] for x in files)).encode()).hexdigest()[:16]
    total = sum(x["examples"] for x in files)
    newest = ck.newest_complete(ckdir)
    gstep = newest.global_step if newest else 0
    run_step = newest.meta["run_step"] if newest and newest.meta["run_id"] == run_id else 0

    def write_status(state: str) -> None:
        atomic_write_json(status / TRAINING_STATUS, {
            "schema_version": 1, "state": state, "current_files": [str(f) for f in args.files], "run_id": run_id,
            "global_step": gstep, "run_step": run_step, "run_total_steps": total, "pid": os.getpid(), "error": None})

    while run_step < total and not stop:
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0")))
        gstep, run_step = gstep + 1, run_step + 1
        target = ckdir / f"checkpoint-{gstep}"
        if target.exists():
            with open(status / "fake_violations.txt", "a") as fh:
                fh.write(f"{target} exists: step trained twice\n")
            return Exit.CRASH
        tmp = ckdir / f".tmp-checkpoint-{gstep}-{os.getpid()}"
        tmp.mkdir(parents=True)
        ck.mark_complete(tmp, ck.marker_meta(
            global_step=gstep, run_id=run_id, run_step=run_step, run_total_steps=total,
            files=[{"name": x["name"], "sha256": x["sha256"]} for x in files], base_model="fake", load_in_4bit=False))
        os.rename(tmp, target)
        write_status("training")
    write_status("idle")
    return Exit.OK


def run_daemon(argv: list[str]) -> int:
    from ultimate_trainer.daemon.cli import main

    return main(argv, trainer_cmd=trainer_cmd, worker_cmd=worker_cmd)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"trainer": fake_trainer, "worker": fake_worker, "daemon": run_daemon}[mode](rest))
