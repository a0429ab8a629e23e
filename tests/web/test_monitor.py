"""The monitor app (port 8080) through Flask's test client: state merge, history, export, security."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from _web_helpers import FIXTURE_STATUS, live_status_dir
from ultimate_trainer.core import status
from ultimate_trainer.web import history as hist
from ultimate_trainer.web.monitor import STATIC_DIR, create_app


@pytest.fixture()
def live(tmp_path):
    return live_status_dir(tmp_path / "status")


def get(sd, path, **kw):
    return create_app(sd).test_client().get(path, **kw)


def test_state_merges_the_status_files(live):
    r = get(live, "/api/state")
    assert r.status_code == 200 and r.mimetype == "application/json"
    st = r.get_json()
    assert st["waiting"] is False
    t = st["training"]
    assert t["global_step"] == 1120 and t["alive"] is True and t["stale"] is False
    assert t["accuracy"]["overall"] == 77.5
    assert st["daemon"]["queue_files"] == 3 and st["daemon"]["failed"][1]["name"] == "crashy.jsonl"
    assert st["memory"]["stale"] is False and st["memory"]["oom_risk"] == "MEDIUM"
    assert st["health"]["level"] == "warning" and st["health"]["reasons"][0]["source"] == "ram"
    assert st["loss_trend"] == "falling"
    assert st["history_counts"] == {"steps": 120, "evals": 10}  # the torn last line is skipped
    (rep,) = st["reports"]  # only the file with problems
    assert rep["bad"][0] == "broken<img src=x onerror=alert(1)>.jsonl:1: not valid JSON (Expecting value)"


def test_state_marks_a_dead_trainer_stale():
    st = get(FIXTURE_STATUS, "/api/state").get_json()  # the fixture's pid 999999 is not running
    assert st["training"]["stale"] is True
    assert st["memory"]["stale"] is True  # written long ago: the stats API is not running
    assert any("pid 999999 gone" in r["message"] for r in st["health"]["reasons"])


@pytest.mark.parametrize("content", [None, "", '{"state": "trai', "[1, 2]"])
def test_missing_empty_or_half_written_files_mean_waiting(tmp_path, content):
    if content is not None:
        for name in (status.TRAINING_STATUS, status.DAEMON_STATUS, status.MEMORY_STATUS):
            (tmp_path / name).write_text(content, encoding="utf-8")
    c = create_app(tmp_path).test_client()
    st = c.get("/api/state").get_json()
    assert st["waiting"] is True and st["training"] is None and st["daemon"] is None and st["memory"] is None
    assert st["health"] == {"level": "ok", "reasons": []}
    h = c.get("/api/history").get_json()
    assert h["steps"]["count"] == 0 and h["steps"]["points"] == []
    assert c.get("/").status_code == 200


def test_examples_come_from_history_when_the_status_lacks_them(live):
    doc = json.loads((live / status.TRAINING_STATUS).read_text())
    del doc["recent_examples"]
    status.atomic_write_json(live / status.TRAINING_STATUS, doc)
    ex = get(live, "/api/state").get_json()["training"]["recent_examples"]
    assert [e["source"] for e in ex][-1] == "geo.jsonl:44" and len(ex) == 4


def _steps(path, start, n, loss=lambda i: 1.0):
    for i in range(start, start + n):
        status.append_jsonl(path, {"time": "2026-11-24T20:00:00+0000", "global_step": i, "loss": loss(i)})


def test_history_is_bounded_and_follows_appends(tmp_path):
    path = tmp_path / status.STEPS_HISTORY
    _steps(path, 1, 5000, loss=lambda i: float(i))
    c = create_app(tmp_path).test_client()
    h = c.get("/api/history").get_json()
    pts = h["steps"]["points"]
    assert h["steps"]["count"] == 5000 and len(pts) <= hist.CHART_POINTS
    assert pts[-1]["global_step"] == 5000
    # Each point is the mean of its bucket, so the weighted means add back up to the total.
    assert sum(p["n"] for p in pts) == 5000
    assert sum(p["loss"] * p["n"] for p in pts) == pytest.approx(sum(range(1, 5001)))
    with open(path, "ab") as f:
        f.write(b'{"global_step": 5001, "loss"')  # a writer in the middle of a line
    assert c.get("/api/history").get_json()["steps"]["count"] == 5000
    _steps(path, 5001, 10)  # the next append repairs the torn line
    h = c.get("/api/history").get_json()
    assert h["steps"]["count"] == 5010 and h["steps"]["points"][-1]["global_step"] == 5010


def test_history_restarts_when_the_file_is_replaced(tmp_path):
    path = tmp_path / status.STEPS_HISTORY
    _steps(path, 1, 50)
    c = create_app(tmp_path).test_client()
    assert c.get("/api/history").get_json()["steps"]["count"] == 50
    path.unlink()
    _steps(path, 1, 7)
    assert c.get("/api/history").get_json()["steps"]["count"] == 7


@pytest.mark.parametrize("losses, trend", [([2.0] * 20 + [1.0] * 20, "falling"), ([1.0] * 20 + [1.5] * 20, "rising"),
                                           ([1.0] * 20 + [1.01] * 20, "flat"), ([1.0] * 39, None),
                                           # converged and jittering: large relative swings, no trend
                                           ([0.0005, 0.0008] * 10 + [0.0009, 0.0013, 0.0005, 0.0011] * 5, "flat"),
                                           # noisy but clearly falling
                                           ([3.0, 2.0, 2.6, 1.8] * 5 + [1.0, 0.4, 0.8, 0.5] * 5, "falling")])
def test_loss_trend(losses, trend):
    assert hist.loss_trend([{"loss": x} for x in losses]) == trend


def test_export_csv_joins_accuracy_and_memory(live):
    r = get(live, "/api/export.csv")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert 'filename="training-history.csv"' in r.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert len(rows) == 120
    first, last = rows[0], rows[-1]
    assert first["eval_accuracy"] == "" and first["ram_percent"] == "55.0"  # no eval before step 1001 yet
    assert last["global_step"] == "1120" and last["accuracy_overall"] == "77.5" and last["val_loss"] != ""
    assert last["ram_percent"] == "67.0" and last["training_process_gb"] == "8.0"


def test_export_csv_defuses_spreadsheet_formulas(tmp_path):
    status.append_jsonl(tmp_path / status.STEPS_HISTORY, {"global_step": 1, "run_id": "=HYPERLINK(\"x\")", "loss": -1.5})
    rows = list(csv.reader(io.StringIO(get(tmp_path, "/api/export.csv").get_data(as_text=True))))
    assert rows[1][2] == "'=HYPERLINK(\"x\")" and rows[1][3] == "-1.5"


def test_export_json_has_history_and_current_state(live):
    r = get(live, "/api/export.json")
    assert r.mimetype == "application/json"
    doc = json.loads(r.get_data(as_text=True))
    assert len(doc["steps"]) == 120 and len(doc["evals"]) == 10 and len(doc["memory"]) == 41
    assert doc["steps"][-1]["accuracy_last_50"] == 81.0
    assert doc["current"]["training"]["global_step"] == 1120
    assert "猫" in json.dumps(doc, ensure_ascii=False)


def test_page_is_utf8_with_a_strict_csp_and_no_inline_script(live):
    r = get(live, "/")
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    html = r.get_data(as_text=True)
    assert '<meta charset="utf-8">' in html and "🧠" in html
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all("src=" in s for s in scripts)
    assert "http://" not in html and "https://" not in html  # works offline: nothing from a CDN
    for name in ("app.js", "charts.js", "layout.js", "style.css", "layout.css"):
        assert get(live, f"/static/{name}").status_code == 200


def test_page_script_never_parses_data_as_html():
    for js in STATIC_DIR.glob("*.js"):
        code = js.read_text(encoding="utf-8")
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in code, f"{js.name} uses {sink}"


def test_security_refusals_are_json(live):
    c = create_app(live).test_client()
    r = c.get("/api/state", headers={"Host": "rebind.attacker.example"})
    assert r.status_code == 403 and r.mimetype == "application/json"
    assert c.get("/api/state", headers={"Host": "localhost:8080"}).status_code == 200
    r = c.get("/no/such/page")
    assert r.status_code == 404 and r.get_json()["status"] == 404
    assert c.delete("/api/state").status_code == 405


def test_wildcard_bind_accepts_this_machines_names_only(live):
    import socket

    c = create_app(live, bind_host="0.0.0.0").test_client()
    assert c.get("/api/state", headers={"Host": f"{socket.gethostname()}:8080"}).status_code == 200
    assert c.get("/api/state", headers={"Host": "evil.example:8080"}).status_code == 403



def test_state_has_accuracy_per_skill_with_a_trend_and_the_workbench_port(live):
    r = create_app(live, workbench_port=8082).test_client().get("/api/state")
    st = r.get_json()
    assert st["workbench_port"] == 8082
    # The fixture's answers carry no skill: each file is its own skill. The last evaluation is step 1120.
    assert st["skills"]["step"] == 1120
    assert [(s["skill"], s["correct"], s["total"]) for s in st["skills"]["skills"]] == [
        ("geo.jsonl", 0, 1), ("日本語.jsonl", 1, 1)]
    # New evaluations with metadata.skill recorded: the breakdown follows, with a trend per skill.
    for step, ok in ((1130, [True, False]), (1140, [True, True])):
        for i, correct in enumerate(ok):
            status.append_jsonl(live / status.EXAMPLES_HISTORY, {
                "global_step": step, "correct": correct, "source": f"math.jsonl:{i}", "skill": "arithmetic"})
    st = create_app(live).test_client().get("/api/state").get_json()
    assert st["workbench_port"] is None
    (arith,) = st["skills"]["skills"]
    assert arith == {"skill": "arithmetic", "correct": 2, "total": 2, "accuracy": 100.0,
                     "trend": [[1130, 50.0], [1140, 100.0]]}


def test_state_and_page_carry_the_world_size_and_each_ranks_memory(live):
    doc = json.loads((live / status.TRAINING_STATUS).read_text())
    ranks = [{"rank": r, "local_rank": r, "host": "node-a", "pid": 100 + r, "rss_bytes": 2 * 2**30, "device": f"cuda:{r}",
              "device_memory_allocated_bytes": 3 * 2**30, "device_memory_reserved_bytes": 4 * 2**30,
              "device_memory_peak_bytes": 5 * 2**30} for r in range(2)]
    status.atomic_write_json(live / status.TRAINING_STATUS, {**doc, "world_size": 2, "ranks": ranks})
    t = get(live, "/api/state").get_json()["training"]
    assert t["world_size"] == 2 and t["ranks"] == ranks
    page = get(live, "/").get_data(as_text=True)
    script = (STATIC_DIR / "app.js").read_text()
    assert 'id="ranks"' in page and 'setText("ranks", ranksText(t))' in script


def _strict(text: str):
    """Parse as a browser does: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_a_nan_in_old_history_files_is_served_as_null(live):
    # (after the fixture's torn last line) A line as versions before issue 23 wrote it for a skipped non-finite step: bare NaN, loss 0.0.
    with open(live / status.STEPS_HISTORY, "a") as f:
        f.write('\n{"global_step": 1121, "loss": 0.0, "grad_norm": NaN, "learning_rate": Infinity}\n')
    status.append_jsonl(live / status.STEPS_HISTORY, {"global_step": 1122, "loss": None, "loss_text": "nan",
                                                      "grad_norm": float("nan"), "skipped": True})
    app = create_app(live).test_client()
    for path in ("/api/history", "/api/state", "/api/export.json"):
        r = app.get(path)
        assert r.status_code == 200, path
        _strict(r.get_data(as_text=True))  # every answer parses in a browser
    doc = _strict(app.get("/api/export.json").get_data(as_text=True))
    assert doc["steps"][-2]["grad_norm"] is None and doc["steps"][-2]["learning_rate"] is None
    assert doc["steps"][-1]["loss"] is None and doc["steps"][-1]["skipped"] is True
    points = _strict(app.get("/api/history").get_data(as_text=True))["steps"]["points"]
    assert points[-1]["skipped"] == 1 and points[-1]["loss"] is None  # no 0.0 dip on the chart


def test_state_carries_the_running_merges_progress_and_not_a_dead_ones(live):
    """The merge child's consolidation_status.json is read directly (fresh, and there without a daemon)."""
    import os

    doc = {"schema_version": 1, "state": "running", "pid": os.getpid(), "updated_at": "2026-12-06T10:00:00+0000",
           "checkpoint": "checkpoint-900", "global_step": 900,
           "stage": {"done": 1, "total": 5, "name": "score the base (gate)"},
           "progress": {"phase": "gate: the base", "done": 12, "total": 40, "unit": "prompts",
                        "elapsed_seconds": 60.0, "eta_seconds": 140.0, "started_at": "2026-12-06T09:59:00+0000"}}
    status.atomic_write_json(live / status.CONSOLIDATION_STATUS, doc)
    merge = get(live, "/api/state").get_json()["consolidation"]
    assert merge["running"] is True and merge["progress"]["eta_seconds"] == 140.0
    assert merge["stage"]["name"] == "score the base (gate)"
    status.atomic_write_json(live / status.CONSOLIDATION_STATUS, {**doc, "pid": 999999})  # killed: not running
    assert get(live, "/api/state").get_json()["consolidation"]["running"] is False
