"""Long phases that are not training steps show their progress and honour a stop (a real SIGTERM).

The base answering the rehearsal prompts (a new base's first run) and the consolidation's gate
each take minutes on a real model; here a tiny random model is made slow enough by long answer
bounds, signalled while the phase is under way, and must end cleanly: exit code, nothing cached or
adopted, nothing half-written.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from conftest import REPO, chat, spawn_train, wait_for, write_jsonl
from ultimate_trainer.core import status as st
from ultimate_trainer.core.progress import Progress, Stopped


def test_progress_counts_estimates_the_time_left_and_stops_on_request():
    now = [100.0]
    seen: list[dict] = []
    stop = [False]
    p = Progress("rehearsal answers", 40, "prompts", on_update=seen.append, should_stop=lambda: stop[0],
                 clock=lambda: now[0])
    assert seen[-1]["done"] == 0 and seen[-1]["eta_seconds"] is None  # nothing to estimate from yet
    now[0] += 30.0
    p.advance(10)
    assert seen[-1]["done"] == 10 and seen[-1]["eta_seconds"] == 90.0  # 30 s for 10, 30 left
    p.check()  # no stop asked: nothing happens
    stop[0] = True
    assert p.stopped()
    try:
        p.check()
        raise AssertionError("check() did not raise")
    except Stopped as e:
        assert "10/40" in str(e)


def _status(root: Path) -> dict:
    return st.read_json(root / "status" / "training_status.json") or {}


def _stop_once_shown(proc: subprocess.Popen, shown: Callable[[], dict]) -> tuple[dict, int, str]:
    """Wait until the child shows its phase's first unit done (``shown()``), SIGTERM it: what it showed then,
    its exit code and its log."""
    try:
        wait_for(lambda: (shown().get("done") or 0) >= 1, timeout=300, proc=proc)
        progress = shown()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        return progress, code, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_while_the_base_answers_the_rehearsal_prompts_ends_the_run_at_once(tiny_model_dir, make_project,
                                                                                   tmp_path):
    """A new base's first run: progress with an ETA on the status file, and SIGTERM ends it, caching nothing."""
    # One prompt a batch with long answers (a random model never stops early): the 380 prompts would
    # take many minutes here, a batch a few seconds.
    cfg = make_project(tiny_model_dir, training__rehearsal_fraction=0.3, training__rehearsal_max_new_tokens=160,
                       eval__batch_size=1)
    root = cfg.parent
    data = write_jsonl(tmp_path / "data.jsonl", [chat(f"q{i}?", f"a{i}") for i in range(20)])
    shown, code, err = _stop_once_shown(spawn_train(cfg, data), lambda: _status(root).get("progress") or {})
    assert shown["phase"] == "rehearsal answers" and shown["unit"] == "prompts" and shown["total"] == 380
    assert isinstance(shown["eta_seconds"], (int, float)) and shown["eta_seconds"] > 0
    assert code == 0, err
    assert "rehearsal answers stopped at" in err and "nothing to save" in err
    assert "rehearsal answers:" in err  # the progress line in the log
    assert not list((root / ".work" / "rehearsal").glob("*.jsonl"))  # no half set of answers cached
    assert not list((root / "checkpoints").glob("checkpoint-*"))
    final = _status(root)
    assert final["state"] == "idle" and final["progress"] is None


def test_sigterm_during_the_probe_baseline_ends_the_run_at_once(tiny_model_dir, make_project, tmp_path):
    """The base's probe baseline (a new project's first evaluation): progress with an ETA, and SIGTERM
    ends it within a generated token, storing no half baseline."""
    cfg = make_project(tiny_model_dir, eval__probe_max_new_tokens=160, eval__batch_size=1)
    root = cfg.parent
    data = write_jsonl(tmp_path / "data.jsonl", [chat(f"q{i}?", f"a{i}") for i in range(20)])
    proc = spawn_train(cfg, data)

    def baseline_progress() -> dict:
        p = _status(root).get("progress") or {}
        return p if p.get("phase") == "probe baseline" else {}

    shown, code, err = _stop_once_shown(proc, baseline_progress)
    assert shown["unit"] == "questions" and shown["total"] > 1
    assert isinstance(shown["eta_seconds"], (int, float)) and shown["eta_seconds"] > 0
    assert code == 0, err
    assert "probe baseline stopped at" in err
    assert not (root / "status" / st.PROBE_BASELINE).exists()  # no baseline from half the questions
    assert not list((root / "checkpoints").glob("checkpoint-*"))
    assert _status(root)["progress"] is None


def test_sigterm_during_the_consolidation_gate_adopts_nothing_and_exits_stopped(tmp_path, tiny_model_dir):
    from test_consolidate import make_checkpoint

    from ultimate_trainer.trainer.consolidation.merge import STOPPED

    make_checkpoint(tmp_path, tiny_model_dir, four_bit=False)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"paths": {"root": str(tmp_path)}, "training": {"device": "cpu"},
                                  "eval": {"probe_max_new_tokens": 512, "batch_size": 1}}))
    merge_status = tmp_path / "status" / st.CONSOLIDATION_STATUS
    proc = subprocess.Popen([sys.executable, "-m", "ultimate_trainer.trainer.consolidation", "--config", str(config)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:  # the child logs each stage and the gate's progress
            lines.append(line)
            if "gate: the base:" in line:  # the gate has started scoring the base
                break
        # ... and shows it in its status file (the daemon's status and the page carry it): stage and phase, with an ETA
        def gate_progress() -> dict:
            p = (st.read_json(merge_status) or {}).get("progress") or {}
            return p if p.get("phase") == "gate: the base" else {}

        wait_for(lambda: gate_progress().get("done", 0) >= 1, timeout=300, proc=proc)
        shown = st.read_json(merge_status)
        assert shown["state"] == "running" and shown["pid"] == proc.pid and shown["checkpoint"] == "checkpoint-5"
        assert shown["stage"] == {"done": 1, "total": 5, "name": "score the base (gate)"}
        progress = shown["progress"]
        assert progress["phase"] == "gate: the base" and progress["unit"] == "prompts" and progress["total"] > 1
        assert isinstance(progress["eta_seconds"], (int, float)) and progress["eta_seconds"] > 0
        proc.send_signal(signal.SIGTERM)
        lines += proc.stderr.readlines()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines)
    assert code == STOPPED, err
    assert "consolidation stopped" in err and "gate: the base stopped at" in err
    consolidated = tmp_path / "models" / "consolidated"
    assert not consolidated.exists() or not any(consolidated.iterdir())  # no candidate, no temp folder
    final = st.read_json(merge_status)
    assert final["state"] == "stopped" and final["progress"] is None and "gate: the base stopped at" in final["result"]
