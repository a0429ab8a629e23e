"""Notifications through apprise, received by a local HTTP endpoint (127.0.0.1 only)."""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ultimate_trainer.daemon.notify import Notifier, events_between


class Endpoint:
    """A JSON webhook on 127.0.0.1: every POST body lands in ``received``; ``gate`` holds answers back."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict] = queue.Queue()
        self.gate = threading.Event()
        self.gate.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.gate.wait(30)
                outer.received.put(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self) -> dict:
        return self.received.get(timeout=30)

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    ep = Endpoint()
    yield ep
    ep.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def daemon(done: int = 0, failed: list | None = None, state: str = "idle", disk: str = "ok") -> dict:
    failed = failed or []
    return {"state": state, "done_files": done, "recent_done": [{"name": f"f{i}.jsonl", "global_step": 10 * i}
                                                                for i in range(1, done + 1)],
            "failed_files": len(failed), "failed": failed, "disk": {"level": disk, "free_gb": 3.2},
            "last_error": "boom" if state == "error" else None, "consolidation": {"history": []}}


def test_events_are_read_from_status_changes():
    old = {"daemon": daemon(1), "training": {"accuracy": {"trend": "stable"}, "stability": {"anomalies": 0}},
           "memory": {"oom_risk": "MEDIUM"}}
    new = {"daemon": daemon(2, [{"name": "bad.jsonl", "reason": "train.py diverged"}], state="error", disk="critical"),
           "training": {"state": "error", "error": "diverged: 3 anomalies",
                        "accuracy": {"trend": "regressing", "last_50": 60.0, "overall": 80.0},
                        "stability": {"anomalies": 2, "last_anomaly": {"kind": "loss spike", "global_step": 7,
                                                                       "files": ["bad.jsonl"]}}},
           "memory": {"oom_risk": "HIGH", "oom_reason": "RAM 91 %"}}
    found = dict(events_between(old, new))
    assert set(found) == {"run_done", "file_failed", "daemon_error", "disk_critical", "anomaly",
                          "accuracy_regressing", "trainer_error", "oom_high"}
    assert "f2.jsonl" in found["run_done"] and "bad.jsonl: train.py diverged" in found["file_failed"]
    assert "loss spike at step 7 in bad.jsonl" in found["anomaly"]
    assert events_between(new, new) == []  # nothing changed: nothing to say


def test_notifications_reach_a_local_json_webhook_rate_limited(endpoint):
    clock = Clock()
    n = Notifier([endpoint.url], min_interval=600, clock=clock, timeout=5)
    n.observe(daemon(3), {}, {})  # the starting point: old news is not sent
    n.observe(daemon(4), {}, {})
    got = endpoint.next()
    assert got["title"] == "Ultimate Trainer: run done" and "f4.jsonl" in got["message"]

    n.observe(daemon(5), {}, {})  # the same kind within the interval: held back, counted
    n.observe(daemon(5, [{"name": "x.jsonl", "reason": "no usable example"}]), {}, {})  # another kind goes out
    assert "x.jsonl: no usable example" in endpoint.next()["message"]
    clock.t += 601
    n.observe(daemon(6, [{"name": "x.jsonl", "reason": "no usable example"}]), {}, {})
    later = endpoint.next()
    assert "f6.jsonl" in later["message"] and "+1 more since the last run_done message" in later["message"]
    n.close()
    assert endpoint.received.empty() and n.delivered == 3 and n.failed == 0


def test_what_the_rate_limit_held_back_is_delivered_at_close(endpoint):
    # daemon.py --once exits right after its last run: no later message of that kind would carry the news.
    clock = Clock()
    n = Notifier([endpoint.url], min_interval=600, clock=clock, timeout=5)
    n.observe(daemon(0), {}, {})
    n.observe(daemon(1), {}, {})
    assert "f1.jsonl" in endpoint.next()["message"]
    n.observe(daemon(2), {}, {})  # held back by the rate limit
    n.observe(daemon(3), {}, {})  # held back too
    assert endpoint.received.empty() or endpoint.received.qsize() == 0
    n.close()
    last = endpoint.next()
    assert last["title"] == "Ultimate Trainer: run done"
    assert "f3.jsonl" in last["message"] and "+1 more since the last run_done message" in last["message"]
    assert endpoint.received.empty() and n.delivered == 2


def test_observe_never_waits_for_delivery(endpoint):
    endpoint.gate.clear()  # the endpoint takes the request but does not answer yet
    n = Notifier([endpoint.url], min_interval=0, timeout=20)
    n.observe(daemon(0), {}, {})
    n.observe(daemon(1), {}, {})
    n.observe(daemon(2), {}, {})  # returns although the first delivery is still in flight
    assert n.delivered == 0
    endpoint.gate.set()
    assert "f1.jsonl" in endpoint.next()["message"] and "f2.jsonl" in endpoint.next()["message"]
    n.close()


def test_an_undeliverable_notification_is_logged_not_raised(caplog):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    n = Notifier([f"json://127.0.0.1:{port}/hook", "notaservice://x"], min_interval=0, timeout=2)
    n.notify("daemon_error", "the daemon stopped with an error: boom")
    n.close()
    assert n.failed == 1 and n.delivered == 0
    assert "could not deliver" in caplog.text and "notaservice://" in caplog.text


def test_daemon_sends_run_done_and_file_failed(endpoint, tmp_path: Path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "config.json").write_text(json.dumps({"notify": {"urls": [endpoint.url], "min_interval_seconds": 0}}))
    (tmp_path / "inbox").mkdir()
    sets = ["daemon.file_stable_seconds=0", "daemon.start_monitors=false", "daemon.disk_warn_gb=0",
            "daemon.disk_critical_gb=0", "daemon.consolidation_hour=null", "daemon.poll_interval=0.2"]
    cmd = [sys.executable, str(REPO / "tests" / "_daemon_helpers.py"), "daemon", "--config",
           str(tmp_path / "config.json"), "--once"] + [a for s in sets for a in ("--set", s)]
    # The daemon starts with nothing to do (its first status is the starting point), then the files arrive.
    (tmp_path / "inbox" / "good.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "inbox" / "broken.jsonl").write_text("not json\n")
    r = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "FAKE_STEP_SECONDS": "0.3"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    messages = []
    while not endpoint.received.empty():
        messages.append(endpoint.received.get())
    titles = {m["title"] for m in messages}
    assert {"Ultimate Trainer: run done", "Ultimate Trainer: file failed"} <= titles, messages
    assert any("broken.jsonl" in m["message"] for m in messages)
