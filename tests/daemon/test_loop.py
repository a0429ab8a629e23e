"""The daemon end to end with a stand-in trainer child (tests/_daemon_helpers.py), plus its arithmetic.

The daemon runs as a real subprocess (``--once``) so kill -9 hits a real process at real points;
the trainer child is the test double that follows train.py's contract without a model.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, wait_for
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core.checkpoints import mark_complete
from ultimate_trainer.core.status import pid_alive
from ultimate_trainer.daemon import schedule
from ultimate_trainer.daemon.loop import Daemon
from ultimate_trainer.daemon.cli import daemon_running, prune_checkpoints
from ultimate_trainer.daemon.journal import RunRecord

HELPER = REPO / "tests" / "_daemon_helpers.py"
FAST = ["daemon.file_stable_seconds=0", "daemon.start_monitors=false", "daemon.disk_warn_gb=0",
        "daemon.disk_critical_gb=0", "daemon.retry_initial_seconds=0", "daemon.consolidation_hour=null",
        "daemon.poll_interval=0.2"]


def lines(n: int, tag: str) -> str:
    return "".join(json.dumps({"text": f"{tag} {i}"}) + "\n" for i in range(n))


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "inbox").mkdir()
    return tmp_path


def daemon_cmd(proj: Path, *extra: str, sets: list[str] = FAST) -> list[str]:
    args = [sys.executable, str(HELPER), "daemon", "--config", str(proj / "config.json")]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


def start(proj: Path, *extra: str, env: dict | None = None, sets: list[str] = FAST) -> subprocess.Popen:
    return subprocess.Popen(daemon_cmd(proj, *extra, sets=sets), cwd=proj, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def steps(proj: Path) -> list[int]:
    d = proj / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in d.glob("checkpoint-*")) if d.exists() else []


def journal_events(proj: Path, event: str) -> list[dict]:
    path = proj / "queue" / "journal.jsonl"
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def assert_each_file_once(proj: Path, good: dict[str, int], bad: set[str]) -> None:
    q = proj / "queue"
    done = {p.name for p in (q / "done").glob("*.jsonl")}
    failed = {p.name for p in (q / "failed").glob("*.jsonl")}
    assert done == set(good) and failed == bad
    assert not list((q / "waiting").glob("*.jsonl")) and not list((q / "processing").glob("*.jsonl"))
    assert not (proj / "status" / "fake_violations.txt").exists(), (proj / "status" / "fake_violations.txt").read_text()
    # one step per example, each trained exactly once, the global step only ever counting up
    assert steps(proj) == list(range(1, sum(good.values()) + 1))


def test_once_processes_everything_and_exits_0(proj: Path) -> None:
    (proj / "inbox" / "a.jsonl").write_text(lines(3, "a"))
    (proj / "inbox" / "run1").mkdir()
    (proj / "inbox" / "run1" / "a.jsonl").write_text(lines(2, "b"))
    code, out = finish(start(proj, "--once"))
    assert code == 0, out
    assert_each_file_once(proj, {"a.jsonl": 3, "a_1.jsonl": 2}, set())
    st = json.loads((proj / "status" / "daemon_status.json").read_text())
    assert st["state"] == "stopped" and st["queue_files"] == 0 and st["done_files"] == 2
    assert {r["name"]: r["examples"] for r in st["recent_done"]} == {"a.jsonl": 3, "a_1.jsonl": 2}
    assert st["throughput"]["runs_in_window"] == 1  # both files in one run: one model load
    assert (proj / "queue" / "done" / "a.jsonl.report.json").exists()
    # docs/examples/daemon_status.json (linked from docs/STATUS.md) shows every field the daemon writes
    example = json.loads((REPO / "docs" / "examples" / "daemon_status.json").read_text())
    assert key_paths(st) == key_paths(example)


def key_paths(d: dict, prefix: str = "") -> set[str]:
    """Every key of a JSON object, nested objects as ``outer.inner`` (lists' items not entered)."""
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and not (prefix + k).startswith("monitors."):
            out |= key_paths(v, f"{prefix}{k}.")
    return out


def test_bad_file_is_quarantined_while_good_files_train(proj: Path) -> None:
    (proj / "inbox" / "good1.jsonl").write_text(lines(2, "g1"))
    (proj / "inbox" / "broken.jsonl").write_text("not json\n{also not\n")
    (proj / "inbox" / "good2.jsonl").write_text(lines(3, "g2"))
    code, out = finish(start(proj, "--once"))
    assert code == 0, out
    assert_each_file_once(proj, {"good1.jsonl": 2, "good2.jsonl": 3}, {"broken.jsonl"})
    assert "no usable example" in (proj / "queue" / "failed" / "broken.jsonl.error.txt").read_text()
    st = json.loads((proj / "status" / "daemon_status.json").read_text())
    assert [f["name"] for f in st["failed"]] == ["broken.jsonl"] and "no usable" in st["failed"][0]["reason"]


def test_duplicate_dropped_again_is_not_retrained(proj: Path) -> None:
    (proj / "inbox" / "a.jsonl").write_text(lines(2, "a"))
    assert finish(start(proj, "--once"))[0] == 0
    (proj / "inbox" / "again.jsonl").write_text(lines(2, "a"))
    assert finish(start(proj, "--once"))[0] == 0
    assert steps(proj) == [1, 2]
    assert "byte-identical to a.jsonl" in (proj / "queue" / "done" / "again.jsonl.duplicate.txt").read_text()
    (proj / "inbox" / "again.jsonl").write_text(lines(2, "a"))
    sets = [s for s in FAST] + ["daemon.skip_duplicates=false"]
    assert finish(start(proj, "--once", sets=sets))[0] == 0
    # configurable: handed to the trainer again when asked
    assert any("again_1.jsonl" in b["files"] for b in journal_events(proj, "batch"))
    assert not (proj / "queue" / "done" / "again_1.jsonl.duplicate.txt").exists()


@pytest.mark.parametrize("kill_at_step", [0, 3, 7])
def test_kill9_daemon_then_restart_loses_nothing_trains_nothing_twice(proj: Path, kill_at_step: int) -> None:
    good = {"a.jsonl": 4, "b.jsonl": 5}
    for n, k in good.items():
        (proj / "inbox" / n).write_text(lines(k, n))
    (proj / "inbox" / "bad.jsonl").write_text("nope\n")
    p = start(proj, "--once", env={"FAKE_STEP_SECONDS": "0.05"})
    if kill_at_step == 0:
        wait_for(lambda: bool(journal_events(proj, "launch")))
    else:
        wait_for(lambda: len(steps(proj)) >= kill_at_step)
    p.kill()
    p.wait()
    # the orphaned trainer was sent SIGTERM by the kernel; the restart waits for it and resumes the run
    code, out = finish(start(proj, "--once"))
    assert code == 0, out
    assert_each_file_once(proj, good, {"bad.jsonl"})


@pytest.mark.parametrize("kill_at_step", [1, 6])
def test_kill9_trainer_is_retried_and_resumes(proj: Path, kill_at_step: int) -> None:
    good = {"a.jsonl": 4, "b.jsonl": 5}
    for n, k in good.items():
        (proj / "inbox" / n).write_text(lines(k, n))
    p = start(proj, "--once", env={"FAKE_STEP_SECONDS": "0.05"})
    wait_for(lambda: len(steps(proj)) >= kill_at_step)
    os.kill(journal_events(proj, "launch")[-1]["pid"], signal.SIGKILL)
    code, out = finish(p)
    assert code == 0, out
    assert_each_file_once(proj, good, set())
    assert len(journal_events(proj, "crash")) == 1 and "signal 9" in journal_events(proj, "crash")[0]["reason"]


def test_one_process_per_run_still_retries_a_killed_trainer(proj: Path) -> None:
    good = {"a.jsonl": 4, "b.jsonl": 5}
    for n, k in good.items():
        (proj / "inbox" / n).write_text(lines(k, n))
    p = start(proj, "--once", env={"FAKE_STEP_SECONDS": "0.05"}, sets=FAST + ["daemon.worker=false"])
    wait_for(lambda: len(steps(proj)) >= 2)
    os.kill(journal_events(proj, "launch")[-1]["pid"], signal.SIGKILL)
    code, out = finish(p)
    assert code == 0, out
    assert_each_file_once(proj, good, set())
    assert not (proj / ".work" / "worker").exists()  # no worker was involved


def test_worker_serves_run_after_run_in_one_process(proj: Path) -> None:
    p = start(proj)  # daemon mode: files arrive one at a time, each its own run
    try:
        for i, n in enumerate(("a.jsonl", "b.jsonl", "c.jsonl")):
            (proj / "inbox" / n).write_text(lines(2, n))
            wait_for(lambda: len(journal_events(proj, "done")) == i + 1, proc=p)
        launches = journal_events(proj, "launch")
        assert len(launches) == 3 and len({e["pid"] for e in launches}) == 1
    finally:
        p.send_signal(signal.SIGTERM)
        code, out = finish(p)
    assert code == 0, out
    assert_each_file_once(proj, {"a.jsonl": 2, "b.jsonl": 2, "c.jsonl": 2}, set())
    assert not any(pid_alive(e["pid"]) for e in launches)  # the worker stops with the daemon


def test_each_run_tells_the_worker_which_files_are_queued_after_it(proj: Path) -> None:
    for n in ("a.jsonl", "b.jsonl", "c.jsonl"):
        (proj / "inbox" / n).write_text(lines(2, n))
    p = start(proj, "--once", sets=FAST + ["daemon.batch_max_files=2"])
    code, out = finish(p)
    assert code == 0, out
    requests = [json.loads(f.read_text()) for f in sorted((proj / ".work" / "worker" / "requests").glob("*.json"))]
    assert [[Path(f).name for f in r["files"]] for r in requests] == [["a.jsonl", "b.jsonl"], ["c.jsonl"]]
    # the hint: the second run's files, where they wait while the first trains; nothing after the last
    assert [[Path(f["path"]).parent.name + "/" + Path(f["path"]).name for f in r["next"]] for r in requests] == \
        [["waiting/c.jsonl"], []]
    # each with the journal's hash, size and lines: the prefetch child hashes nothing
    done_c = proj / "queue" / "done" / "c.jsonl"
    assert requests[0]["next"][0]["sha256"] == hashlib.sha256(done_c.read_bytes()).hexdigest()
    assert requests[0]["next"][0]["size"] == done_c.stat().st_size and requests[0]["next"][0]["lines"] == 2


@pytest.mark.parametrize("kill_at_step", [2, 6])
def test_kill9_daemon_and_worker_together_then_restart(proj: Path, kill_at_step: int) -> None:
    good = {"a.jsonl": 4, "b.jsonl": 5}
    for n, k in good.items():
        (proj / "inbox" / n).write_text(lines(k, n))
    p = start(proj, "--once", env={"FAKE_STEP_SECONDS": "0.05"})
    wait_for(lambda: len(steps(proj)) >= kill_at_step)
    worker = journal_events(proj, "launch")[-1]["pid"]
    os.kill(worker, signal.SIGKILL)
    p.kill()
    p.wait()
    wait_for(lambda: not pid_alive(worker))
    reached = steps(proj)[-1]
    code, out = finish(start(proj, "--once"))
    assert code == 0, out
    assert_each_file_once(proj, good, set())  # nothing lost, no step trained twice
    assert steps(proj)[-1] >= reached  # the global step never went back
    assert journal_events(proj, "launch")[-1]["pid"] != worker  # a new worker took the run over


def test_sigterm_stops_gracefully_and_restart_finishes(proj: Path) -> None:
    (proj / "inbox" / "a.jsonl").write_text(lines(30, "a"))
    p = start(proj, env={"FAKE_STEP_SECONDS": "0.05"})  # daemon mode, not --once
    wait_for(lambda: len(steps(proj)) >= 2)
    p.send_signal(signal.SIGTERM)
    code, out = finish(p)
    assert code == 0, out
    assert (proj / "queue" / "processing" / "a.jsonl").exists() and len(steps(proj)) < 30
    assert json.loads((proj / "status" / "daemon_status.json").read_text())["state"] == "stopped"
    code, out = finish(start(proj, "--once"))
    assert code == 0, out
    assert_each_file_once(proj, {"a.jsonl": 30}, set())


def test_stop_file_stops_the_daemon(proj: Path) -> None:
    (proj / "inbox" / "a.jsonl").write_text(lines(30, "a"))
    p = start(proj, env={"FAKE_STEP_SECONDS": "0.05"})
    wait_for(lambda: len(steps(proj)) >= 1)
    assert subprocess.run(daemon_cmd(proj, "--stop"), cwd=proj).returncode == 0
    code, out = finish(p)
    assert code == 0, out
    assert not (proj / ".stop").exists() and (proj / "queue" / "processing" / "a.jsonl").exists()


def test_stop_wait_returns_once_the_daemon_has_saved_and_exited(proj: Path) -> None:
    (proj / "inbox" / "a.jsonl").write_text(lines(40, "a"))
    p = start(proj, env={"FAKE_STEP_SECONDS": "0.1"})
    wait_for(lambda: len(steps(proj)) >= 1)
    r = subprocess.run(daemon_cmd(proj, "--stop", "--wait"), cwd=proj, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "the daemon has stopped" in r.stdout, r.stdout + r.stderr
    # By the time --wait returns, the daemon wrote its last status and let go of the queue lock.
    assert json.loads((proj / "status" / "daemon_status.json").read_text())["state"] == "stopped"
    assert not daemon_running(config_mod.from_dict({"paths": {"root": str(proj)}}))
    code, out = finish(p)
    assert code == 0, out
    assert (proj / "queue" / "processing" / "a.jsonl").exists() and len(steps(proj)) < 40
    # Nothing to stop: one line, exit 1 (systemd's ExecStop runs it with '-', so that is no failure).
    r = subprocess.run(daemon_cmd(proj, "--stop", "--wait"), cwd=proj, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no daemon is running here" in r.stdout


def test_wait_without_stop_is_a_usage_error(proj: Path) -> None:
    r = subprocess.run(daemon_cmd(proj, "--wait"), cwd=proj, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--wait goes with --stop" in r.stderr


def test_crashing_trainer_backs_off_splits_then_fails_files(proj: Path) -> None:
    for n in ("a.jsonl", "b.jsonl"):
        (proj / "inbox" / n).write_text(lines(2, n))
    code, out = finish(start(proj, "--once", env={"FAKE_EXIT": "1"}, sets=FAST + ["daemon.max_attempts=2"]))
    assert code == 0, out
    assert {p.name for p in (proj / "queue" / "failed").glob("*.jsonl")} == {"a.jsonl", "b.jsonl"}
    # 2 crashes of the pair, then 2 of each file alone: never a tight endless loop
    assert len(journal_events(proj, "crash")) == 6
    assert "exited 1 (2 attempts)" in (proj / "queue" / "failed" / "a.jsonl.error.txt").read_text()


def test_model_error_keeps_files_queued(proj: Path) -> None:
    (proj / "inbox" / "a.jsonl").write_text(lines(2, "a"))
    code, out = finish(start(proj, "--once", env={"FAKE_EXIT": "4"}))
    assert code == 1
    assert (proj / "queue" / "processing" / "a.jsonl").exists()
    assert "model cannot be loaded" in json.loads((proj / "status" / "daemon_status.json").read_text())["last_error"]


def test_disk_critical_pauses_intake_and_training(proj: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(proj)
    (proj / "inbox" / "a.jsonl").write_text(lines(2, "a"))
    sets = [s for s in FAST if "disk" not in s] + ["daemon.disk_warn_gb=1e12", "daemon.disk_critical_gb=1e12"]
    cfg = config_mod.load(proj / "config.json", sets)
    d = Daemon(cfg, str(proj / "config.json"), sets, once=False)
    assert d.tick() is None
    assert d.state == "paused_disk" and (proj / "inbox" / "a.jsonl").exists()
    st = json.loads((proj / "status" / "daemon_status.json").read_text())
    assert st["state"] == "paused_disk" and st["disk"]["level"] == "critical"


def test_prune_keeps_newest_and_consolidation_sources(proj: Path) -> None:
    for g in (1, 2, 3, 4):
        c = proj / "checkpoints" / f"checkpoint-{g}"
        c.mkdir(parents=True)
        mark_complete(c, {"global_step": g})
    m = proj / "models" / "consolidated" / "20260101-030000"
    m.mkdir(parents=True)
    (m / "manifest.json").write_text(json.dumps({"global_step": 2, "source_checkpoint": "checkpoint-2"}))
    cfg = config_mod.load(None, [f"paths.root={proj}"])
    removed = prune_checkpoints(cfg, keep=1)
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-3"]
    assert steps(proj) == [2, 4]


# ---------------------------------------------------------------------- arithmetic

def test_throughput_uses_only_runs_in_window() -> None:
    now = 100_000.0
    runs = [RunRecord(now - 10 * 3600, 3600, 10**9, 999), RunRecord(now - 60, 1800, 50 * 10**6, 100),
            RunRecord(now - 30, 1800, 50 * 10**6, 300)]
    tp = schedule.throughput(runs, 6.0, now)
    assert tp == {"mb_per_hour": 100.0, "examples_per_hour": 400.0, "window_hours": 6.0, "runs_in_window": 2}
    assert schedule.queue_eta(25 * 10**6, tp["mb_per_hour"]) == pytest.approx(900.0)
    assert schedule.queue_eta(1, None) is None


def test_consolidation_due_after_the_hour_including_missed_ones() -> None:
    tz = dt.timezone.utc
    now = dt.datetime(2026, 5, 2, 10, 0, tzinfo=tz)
    assert schedule.consolidation_due(3, dt.datetime(2026, 5, 2, 3, 5, tzinfo=tz), None, now) is False
    assert schedule.consolidation_due(3, dt.datetime(2026, 5, 1, 3, 5, tzinfo=tz), None, now) is True
    # down for two days: the missed one runs at the next start
    assert schedule.consolidation_due(3, dt.datetime(2026, 4, 29, 3, 5, tzinfo=tz), None, now) is True
    # never consolidated: counted from the daemon's first start
    assert schedule.consolidation_due(3, None, dt.datetime(2026, 5, 2, 4, 0, tzinfo=tz), now) is False
    assert schedule.consolidation_due(3, None, dt.datetime(2026, 5, 1, 4, 0, tzinfo=tz), now) is True
    assert schedule.consolidation_due(None, None, dt.datetime(2026, 1, 1, tzinfo=tz), now) is False
    assert schedule.next_consolidation(3, False, now) == dt.datetime(2026, 5, 3, 3, 0, tzinfo=tz)


# ---------------------------------------------------------------------- with the real train.py

def test_real_trainer_once_then_kill9_trainer_resumes(make_project: Callable[..., Path], tiny_model_dir: Path) -> None:
    from conftest import chat, write_jsonl

    cfg_path = make_project(tiny_model_dir, eval_steps=0, save_steps=1)
    root = cfg_path.parent
    (root / "inbox" / "sub").mkdir(parents=True)
    write_jsonl(root / "inbox" / "a.jsonl", [chat(f"q{i}", f"a{i}") for i in range(10)])
    write_jsonl(root / "inbox" / "sub" / "b.jsonl", [chat(f"x{i}", f"y{i}") for i in range(10)])
    write_jsonl(root / "inbox" / "bad.jsonl", ["not json", "{]"])
    sets = FAST + ["daemon.retry_initial_seconds=0"]
    args = [sys.executable, str(REPO / "daemon.py"), "--once", "--config", str(cfg_path)]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in (root / "queue" / "done").glob("*.jsonl")} == {"a.jsonl", "b.jsonl"}
    assert {p.name for p in (root / "queue" / "failed").glob("*.jsonl")} == {"bad.jsonl"}
    first = steps(root)
    assert first and json.loads((root / "status" / "daemon_status.json").read_text())["recent_done"][-1]["global_step"] == first[-1]

    # a second drop: kill -9 the real trainer after its first checkpoint; the daemon retries and it resumes
    write_jsonl(root / "inbox" / "c.jsonl", [chat(f"c{i}", f"d{i}") for i in range(16)])
    p = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(steps(root)) > len(first), timeout=300)
    os.kill(journal_events(root, "launch")[-1]["pid"], signal.SIGKILL)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert (root / "queue" / "done" / "c.jsonl").exists() and len(journal_events(root, "crash")) == 1
    after = steps(root)
    assert after[-1] > first[-1]
    ts = json.loads((root / "status" / "training_status.json").read_text())
    assert ts["run_step"] == ts["run_total_steps"] and ts["global_step"] == after[-1]


def test_disk_going_critical_mid_run_pauses_then_resumes(proj: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from _daemon_helpers import trainer_cmd, worker_cmd

    monkeypatch.chdir(proj)
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.05")
    (proj / "inbox" / "a.jsonl").write_text(lines(30, "a"))
    cfg = config_mod.load(proj / "config.json", FAST)
    d = Daemon(cfg, str(proj / "config.json"), FAST, once=True, trainer_cmd=trainer_cmd, worker_cmd=worker_cmd)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(d.run()))
    t.start()
    try:
        wait_for(lambda: len(steps(proj)) >= 2)
        d.d.disk_warn_gb = d.d.disk_critical_gb = 1e12  # the free space is real; the line moves above it
        wait_for(lambda: not t.is_alive())
    finally:
        d.stop_event.set()
        t.join(30)
    assert result == [1]  # --once cannot wait for room: exits 1 with the run still queued
    assert (proj / "queue" / "processing" / "a.jsonl").exists() and len(steps(proj)) < 30
    assert not journal_events(proj, "crash")
    code, out = finish(start(proj, "--once"))
    assert code == 0, out
    assert_each_file_once(proj, {"a.jsonl": 30}, set())


def _free_ports(n: int) -> list[int]:
    import socket

    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as c:
        return c.connect_ex(("127.0.0.1", port)) == 0


def test_monitors_start_as_children_and_stop_with_the_daemon(proj: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ultimate_trainer.core.config import REPO_DIR as CODE_DIR
    from ultimate_trainer.daemon.children import ChildSet

    ports = _free_ports(3)
    monkeypatch.chdir(proj)
    sets = [f"monitor.port={ports[0]}", f"monitor.stats_port={ports[1]}", f"monitor.workbench_port={ports[2]}"]
    cfg = config_mod.load(proj / "config.json", sets)
    kids = ChildSet()
    kids.start_monitors(cfg, ["--config", str(proj / "config.json"), *[a for s in sets for a in ("--set", s)]], CODE_DIR)
    try:
        st = kids.status(cfg)
        assert st["monitor"]["running"] and st["stats_api"]["running"] and st["workbench"]["running"]
        assert (st["monitor"]["port"], st["stats_api"]["port"], st["workbench"]["port"]) == tuple(ports)
        wait_for(lambda: all(_listening(p) for p in ports), timeout=120)
        procs = list(kids.procs.values())
    finally:
        kids.stop_all()
    assert all(p.poll() is not None for p in procs)
    assert not kids.status(cfg)["monitor"]["running"] and not kids.status(cfg)["workbench"]["running"]


def test_daemon_starts_and_stops_the_workbench_and_a_second_daemon_starts_none(proj: Path) -> None:
    import urllib.request

    import psutil

    ports = _free_ports(3)
    sets = [s for s in FAST if not s.startswith("daemon.start_monitors")] + [
        f"monitor.port={ports[0]}", f"monitor.stats_port={ports[1]}", f"monitor.workbench_port={ports[2]}"]

    def workbenches() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if any(c.endswith("workbench.py") for c in cmd) and f"monitor.workbench_port={ports[2]}" in cmd:
                out.append(p)
        return out

    first = start(proj, sets=sets)
    try:
        wait_for(lambda: _listening(ports[2]), timeout=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/health", timeout=120) as resp:
            assert json.loads(resp.read())["ok"] is True  # the workbench itself answers there
        assert len(workbenches()) == 1
        second = start(proj, sets=sets)
        code, out = finish(second)
        assert code == 1 and "another daemon is running" in out, out
        assert len(workbenches()) == 1 and _listening(ports[2])
        first.send_signal(signal.SIGTERM)
        code, out = finish(first)
        assert code == 0, out
    finally:
        if first.poll() is None:
            first.kill()
    wait_for(lambda: not workbenches() and not _listening(ports[2]), timeout=30)


def test_diverged_run_fails_the_blamed_file_without_retrying_and_trains_the_rest(proj: Path) -> None:
    (proj / "inbox" / "a.jsonl").write_text(lines(2, "a"))
    (proj / "inbox" / "poison.jsonl").write_text(lines(3, "p"))
    code, out = finish(start(proj, "--once", env={"FAKE_DIVERGE": "poison.jsonl"}))
    assert code == 0, out
    assert_each_file_once(proj, {"a.jsonl": 2}, {"poison.jsonl"})
    assert journal_events(proj, "crash") == []  # not a crash: no back-off, no retry of the same data
    why = (proj / "queue" / "failed" / "poison.jsonl.error.txt").read_text()
    assert "diverged" in why and "non-finite loss" in why


def test_real_worker_kill9_with_its_daemon_then_restart_finishes_once(make_project: Callable[..., Path],
                                                                      tiny_model_dir: Path) -> None:
    from conftest import chat, write_jsonl
    from ultimate_trainer.core import checkpoints as ck

    cfg_path = make_project(tiny_model_dir, eval_steps=0, save_steps=1, training__packing="off")
    root = cfg_path.parent
    write_jsonl(root / "inbox" / "a.jsonl", [chat(f"q{i}", f"a{i}") for i in range(40)])  # ~16 steps
    args = [sys.executable, str(REPO / "daemon.py"), "--once", "--config", str(cfg_path)]
    for s in FAST:
        args += ["--set", s]
    p = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(steps(root)) >= 2, timeout=300, proc=p)
    worker = journal_events(root, "launch")[-1]["pid"]
    os.kill(worker, signal.SIGKILL)
    p.kill()
    p.communicate(timeout=60)
    reached = steps(root)[-1]
    assert not ck.newest_complete(root / "checkpoints").meta["run_complete"], "finished before the kill"
    r = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (root / "queue" / "done" / "a.jsonl").exists()
    final = steps(root)
    assert final[-1] >= reached and final == sorted(set(final))  # the global step never went back
    ts = json.loads((root / "status" / "training_status.json").read_text())
    assert ts["run_step"] == ts["run_total_steps"] and ts["global_step"] == final[-1]
    assert ts["pid"] == journal_events(root, "launch")[-1]["pid"] != worker
    # the resumed run continued the killed one: its steps add up to the run's total, none twice
    assert final[-1] == ts["run_total_steps"]
