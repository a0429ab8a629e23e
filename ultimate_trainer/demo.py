"""``make demo``: the whole system on the built-in model and generated sample data.

1. writes a fresh batch of demo files into ``inbox/`` (``sample_data``; batch N uses seed N, so a
   second demo brings new data instead of a duplicate the daemon would skip);
2. runs ``daemon.py --once --config configs/demo.json``: it trains them with QLoRA on
   SmolLM2-135M-Instruct, evaluating on held-out items, with the monitor page up on :8080;
3. prints the held-out accuracy at the start and at the end of this demo.

    python -m ultimate_trainer.demo [--config configs/demo.json] [--set KEY=VALUE ...] [--keep-running]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from ultimate_trainer.core import config
from ultimate_trainer.data import sample as sample_data
from ultimate_trainer.core import status as st
from ultimate_trainer.core.records import TrainingStatus

REPO = config.REPO_DIR


def _demo_batches(cfg: config.Config) -> int:
    """How many demo batches were dropped before (any that still sits in the inbox or the spool)."""
    names = set()
    for folder in (cfg.path("inbox"), cfg.path("queue")):
        if folder.is_dir():
            names |= {p.name.split("-")[1] for p in folder.rglob("demo*-bookings-*.jsonl") if "-" in p.name}
    return len(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    parser.set_defaults(config=str(REPO / "configs" / "demo.json"))
    parser.add_argument("--keep-running", action="store_true",
                        help="keep the daemon (and the page) running after the demo data is trained")
    args = parser.parse_args(argv)
    cfg = config.config_or_none(args)
    if cfg is None:
        return 2

    batch = _demo_batches(cfg) + 1
    inbox = cfg.path("inbox")
    written = sample_data.write_demo_data(inbox / f"demo{batch:03d}", seed=batch)
    for path in written:
        path.rename(path.with_name(f"demo-{batch:03d}-{path.name}"))
    evals_before = len(list(st.iter_jsonl(cfg.path("status") / st.EVALS_HISTORY)))
    print(f"demo: wrote {len(written)} sample files into {inbox}/demo{batch:03d}/ (batch {batch})")
    print(f"demo: training {cfg.base_model} (4-bit: {cfg.load_in_4bit}); "
          f"watch at http://{cfg.monitor.host}:{cfg.monitor.port}/  (Ctrl-C stops cleanly)", flush=True)

    cmd = [sys.executable, str(REPO / "daemon.py"), "--config", args.config]
    for item in args.overrides:
        cmd += ["--set", item]
    if not args.keep_running:
        cmd.append("--once")
    try:
        code = subprocess.call(cmd, cwd=REPO)
    except KeyboardInterrupt:  # the daemon got the same ^C and saved; give it time to finish
        code = 0

    evals = list(st.iter_jsonl(cfg.path("status") / st.EVALS_HISTORY))[evals_before:]
    if evals:
        first, last = evals[0], evals[-1]
        print(f"demo: held-out accuracy {first['accuracy']}% at step {first['global_step']} -> "
              f"{last['accuracy']}% at step {last['global_step']} ({len(evals)} evaluations)")
    status = TrainingStatus.read(cfg.path("status") / st.TRAINING_STATUS) or TrainingStatus()
    for ex in status.recent_examples[-3:]:
        mark = "ok " if ex.get("correct") else "bad"
        print(f"  [{mark}] {ex.get('prompt')!r} -> {ex.get('generated')!r} (expected {ex.get('expected')!r})")
    print(f"demo: checkpoints in {cfg.path('checkpoints')}; files in {cfg.path('queue')}/done/")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
