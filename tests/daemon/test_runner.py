"""The child runner: exit code + run state -> what the daemon does; one SIGTERM forwarded, never two."""

from __future__ import annotations

import signal
import sys
import threading
import time

import pytest

from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.daemon.runner import ChildRunner, Outcome, describe_exit, outcome


@pytest.mark.parametrize("code, complete, stopped_for, expected", [
    (Exit.OK, True, None, Outcome.DONE),
    (Exit.OK, True, "stop", Outcome.DONE),               # finished before the stop reached it
    (Exit.OK, False, "stop", Outcome.STOPPED),           # saved mid-run on SIGTERM
    (-signal.SIGTERM, False, "stop", Outcome.STOPPED),
    (-signal.SIGTERM, False, "disk", Outcome.PAUSED_DISK),
    (Exit.DATA, False, None, Outcome.UNUSABLE),
    (Exit.DIVERGED, False, None, Outcome.DIVERGED),
    (Exit.CONFIG, False, None, Outcome.SETUP_ERROR),
    (Exit.MODEL, False, None, Outcome.SETUP_ERROR),
    (Exit.OK, False, None, Outcome.CRASHED),             # exit 0 without finishing: not a success
    (Exit.CRASH, False, "stop", Outcome.CRASHED),
    (-signal.SIGKILL, False, None, Outcome.CRASHED),
])
def test_outcome_of_every_exit(code, complete, stopped_for, expected):
    assert outcome(code, complete, stopped_for) is expected


def test_exit_descriptions():
    assert describe_exit(-9) == "killed by signal 9"
    assert describe_exit(1) == "exited 1"
    assert describe_exit(2) == "exited 2 (configuration error)"
    assert describe_exit(4) == "exited 4 (model cannot be loaded)"


CHILD = """
import signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
print("ready", flush=True)
end = time.monotonic() + 20
while time.monotonic() < end and not got:
    time.sleep(0.02)
time.sleep(0.5)  # a second SIGTERM, if one were sent, would arrive now and be counted
sys.exit(10 + len(got))
"""


def test_a_stop_forwards_exactly_one_sigterm():
    stop = threading.Event()
    calls = []
    runner = ChildRunner(stop, lambda signalled: calls.append(signalled))
    runner.launch([sys.executable, "-c", CHILD])
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    assert runner.wait() == 11  # one SIGTERM, and the child finished on its own terms
    assert runner.stopped_for == "stop" and time.monotonic() - t0 < 15
    assert calls and calls[0] is False


def test_a_reason_from_watch_stops_the_child_once():
    stop = threading.Event()
    runner = ChildRunner(stop, lambda signalled: None if signalled else "disk")
    runner.launch([sys.executable, "-c", CHILD])
    assert runner.wait() == 11
    assert runner.stopped_for == "disk"


def test_diverged_files_are_the_ones_the_guard_blamed():
    from ultimate_trainer.core.records import TrainingStatus

    status = TrainingStatus.from_json({"pid": 7, "diverged": {"reason": "diverged: 3 anomalies", "files": ["b.jsonl"]}})
    assert status.diverged_files(7, ["a.jsonl", "b.jsonl"]) == (["b.jsonl"], "diverged: 3 anomalies")
    assert status.diverged_files(8, ["a.jsonl", "b.jsonl"]) == (["a.jsonl", "b.jsonl"], None)  # another trainer
    other = TrainingStatus.from_json({"pid": 7, "diverged": {"files": ["zzz"]}})
    assert other.diverged_files(7, ["a.jsonl"])[0] == ["a.jsonl"]
