"""The workbench's guard (workbench/guard.py) driven with real HTTP requests against a running
workbench: no write from another origin on any accepted Host name, no CORS header for a foreign
origin, only uploads of this page's sessions ever opened, bounded uploads under .work/ that are
removed, no 500 and no traceback for a malformed request. No model is loaded: a project whose
checkpoints are empty folders is enough for every route."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from _workbench_helpers import UvicornThread, light_project, raw_get
from conftest import wait_for, write_jsonl
from ultimate_trainer.core.config import load as load_config
from ultimate_trainer.workbench.guard import MAX_UPLOAD_BYTES, Uploads

EVIL = "http://evil.example"
SET = b'{"prompt": "1?", "response": "1"}\n{"prompt": "2?", "response": "2"}\n'


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ultimate_trainer.workbench.app import create_app

    root = tmp_path_factory.mktemp("wbsafe")
    cfg = load_config(light_project(root))
    stale = cfg.path("work") / "workbench" / "uploads" / "999999999"  # a workbench process long gone
    stale.mkdir(parents=True)
    (stale / "old.jsonl").write_bytes(SET)
    app = create_app(cfg, cfg.path("status"))
    with UvicornThread(app) as srv:
        yield cfg, srv, app
    assert not app.uploads.dir.exists()  # the server stopped: its uploads are gone


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[1].url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def fns(http):
    """Event ids by API name, from the page's own config."""
    config = http.get("/config").json()
    return {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}


def upload(http, content: bytes = SET, name: str = "set.jsonl", **headers) -> httpx.Response:
    return http.post("/gradio_api/upload", files={"files": (name, content)}, headers=headers)


def file_data(path: str) -> dict:
    return {"path": path, "orig_name": os.path.basename(path), "meta": {"_type": "gradio.FileData"}}


def evaluate_join(http, fns, path: str | None, session: str, **headers) -> httpx.Response:
    body = {"data": [["checkpoint-404", "checkpoint-405"], "uploaded JSONL", file_data(path) if path else None],
            "fn_index": fns["evaluate"], "session_hash": session, "event_data": None, "trigger_id": None}
    return http.post("/gradio_api/queue/join", json=body, headers=headers)


def assert_refused(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert words in r.json()["error"], r.text
    assert "traceback" not in r.text.lower()
    assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers


# --------------------------------------------------------------------------- origins and CORS

def host_names(port: int) -> list[str]:
    return [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]


def test_writes_from_another_origin_are_refused_on_every_host_name(served, http, fns):
    cfg, srv, app = served
    join = {"data": [None, None, None], "fn_index": fns["evaluate"], "session_hash": "s1"}
    writes = [("/gradio_api/upload", {"files": {"files": ("x.jsonl", SET)}}),
              ("/gradio_api/queue/join", {"json": join}),
              ("/gradio_api/call/evaluate", {"json": {"data": [None, None, None]}}),
              ("/gradio_api/cancel", {"json": {"session_hash": "s1", "fn_index": 0, "event_id": "e"}}),
              ("/gradio_api/reset", {"json": {"event_id": "e"}})]
    before = sorted(app.uploads.dir.rglob("*"))
    for host in host_names(srv.port):
        for origin in (EVIL, "null", f"http://127.0.0.1:{srv.port + 1}", f"http://localhost:{srv.port}x"):
            for path, kw in writes:
                r = http.post(path, headers={"Host": host, "Origin": origin}, **kw)
                assert_refused(r, 403, "is not this server")
        for site in ("cross-site", "same-site"):  # a browser that sends no Origin still says where it stands
            r = http.post("/gradio_api/queue/join", json=join, headers={"Host": host, "Sec-Fetch-Site": site})
            assert_refused(r, 403, f"a {site} write is refused")
        r = http.post("/gradio_api/queue/join", content=json.dumps(join),
                      headers={"Host": host, "Content-Type": "text/plain;charset=UTF-8"})
        assert_refused(r, 403, "text/plain body is refused")
        r = http.options("/gradio_api/upload", headers={"Host": host, "Origin": EVIL,
                                                         "Access-Control-Request-Method": "POST"})
        assert_refused(r, 403, "is not this server")
    assert sorted(app.uploads.dir.rglob("*")) == before  # nothing was stored


def test_the_same_origin_and_programs_may_write(served, http):
    _, srv, app = served
    for host in host_names(srv.port):
        origin = f"http://{host}"
        r = upload(http, Host=host, Origin=origin, **{"Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200, r.text
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    r = upload(http)  # gradio_client and curl send no Origin
    assert r.status_code == 200
    stored = r.json()[0]
    assert app.uploads.inside(stored) is not None


def test_no_cors_header_for_a_foreign_origin_ever(served, http):
    _, srv, _ = served
    for host in host_names(srv.port):
        for path in ("/", "/config", "/gradio_api/info", "/health", "/theme.css"):
            r = http.get(path, headers={"Host": host, "Origin": EVIL})
            assert not [h for h in r.headers if h.lower().startswith("access-control-")], (host, path, r.headers)


def test_cross_site_subresource_reads_are_refused_but_a_followed_link_is_served(served, http):
    r = http.get("/config", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
                                     "Sec-Fetch-Dest": "script"})
    assert_refused(r, 403, "only this server's own page")
    r = http.get("/", headers={"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate",
                               "Sec-Fetch-Dest": "document"})
    assert r.status_code == 200 and "<html" in r.text.lower()


# --------------------------------------------------------------------------- which files can be read

def test_a_server_side_path_is_refused_before_it_is_opened(served, http, fns, tmp_path):
    cfg, _, app = served
    secret = write_jsonl(tmp_path / "secret.jsonl", [{"prompt": "password?", "response": "hunter2"}])
    inside_project = cfg.path("root") / "config.json"
    copied_before = sorted(p.name for p in app.uploads.dir.rglob("*"))
    for path in (str(secret), str(inside_project), "/etc/hostname", f"{app.uploads.dir}/../../../config.json",
                 str(app.uploads.dir), "http://127.0.0.1:1/x.jsonl"):
        assert_refused(evaluate_join(http, fns, path, "s-outside"), 403, "only a file uploaded through this page")
        r = http.post("/gradio_api/call/evaluate",
                      json={"data": [["checkpoint-1", "checkpoint-2"], "uploaded JSONL", file_data(path)]})
        assert_refused(r, 403, "only a file uploaded through this page")
    # A file dropped into the upload folder by anything but the upload route is not an upload either.
    planted = app.uploads.dir / "planted.jsonl"
    planted.write_bytes(SET)
    assert_refused(evaluate_join(http, fns, str(planted), "s-outside"), 403, "only a file uploaded")
    planted.unlink()
    assert sorted(p.name for p in app.uploads.dir.rglob("*")) == copied_before  # nothing copied into the cache
    # The handler itself refuses a path outside the upload folder without opening it.
    from ultimate_trainer.workbench.app import Workbench

    wb = Workbench(cfg, cfg.path("status"), uploads=app.uploads)
    *_, notes = wb.evaluate(["checkpoint-1", "checkpoint-2"], "uploaded JSONL", str(secret))
    assert notes == "only a JSONL file uploaded through this page can be evaluated"


def test_an_upload_serves_the_session_that_uses_it_first(served, http, fns):
    path = upload(http, b'{"prompt": "s?", "response": "s"}\n', "mine.jsonl").json()[0]
    r = evaluate_join(http, fns, path, "session-a")
    assert r.status_code == 200 and "event_id" in r.json(), r.text
    assert evaluate_join(http, fns, path, "session-a").status_code == 200  # again, same session
    assert_refused(evaluate_join(http, fns, path, "session-b"), 403, "uploaded in another session")
    again = upload(http, b'{"prompt": "s?", "response": "s"}\n', "mine.jsonl").json()[0]
    assert again == path  # the same content: Gradio stores it at the same place
    assert evaluate_join(http, fns, path, "session-b").status_code == 200  # uploaded again, by b


def test_an_uploaded_set_is_evaluated_through_the_api(served, tmp_path):
    from gradio_client import Client, handle_file

    _, srv, _ = served
    evalset = write_jsonl(tmp_path / "set.jsonl", [{"prompt": "1?", "response": "1"}, {"prompt": "2?", "response": "2"}])
    client = Client(srv.url, verbose=False, analytics_enabled=False)
    *_, notes = client.predict(["checkpoint-404", "checkpoint-405"], "uploaded JSONL", handle_file(str(evalset)),
                               api_name="/evaluate")
    assert "set.jsonl: 2 examples" in notes and "checkpoint-404: cannot evaluate" in notes


def test_the_file_route_serves_uploads_and_nothing_else(served, http, tmp_path):
    cfg, srv, app = served
    path = upload(http, b'{"prompt": "f?", "response": "f"}\n', "served.jsonl").json()[0]
    r = http.get(f"/gradio_api/file={path}")
    assert r.status_code == 200 and r.content == b'{"prompt": "f?", "response": "f"}\n'
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    (app.uploads.dir / "planted.txt").write_text("not an upload")
    for p in (str(outside), str(cfg.path("root") / "config.json"), "/etc/hostname", str(app.uploads.dir / "planted.txt"),
              f"{path}/../../../../config.json", "../../etc/passwd", "http://example.com/x"):
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            code, body = raw_get(srv.port, route + p, f"127.0.0.1:{srv.port}")  # dot segments sent as they are
            assert code == 404 and "serves only files uploaded through its page" in body, (route + p, code, body)
    assert_refused(http.get("/gradio_api/proxy=http://127.0.0.1:1/x"), 404, "not served")


# --------------------------------------------------------------------------- upload size, place, cleanup

def test_uploads_are_bounded_and_stored_under_the_project_work_folder(served, http):
    cfg, _, app = served
    assert app.uploads.dir.parent == (cfg.path("work") / "workbench" / "uploads").resolve()
    assert not (cfg.path("work") / "workbench" / "uploads" / "999999999").exists()  # a dead process's, removed
    before = sorted(app.uploads.dir.rglob("*"))
    r = upload(http, b"x" * (MAX_UPLOAD_BYTES + 1))  # within the request's bound: Gradio's per-file limit
    assert r.status_code == 413 and "maximum allowed size of 4194304 bytes" in r.text, r.text
    assert_refused(upload(http, b"x" * (MAX_UPLOAD_BYTES + 100_000)), 413, "too large")  # refused unread

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(MAX_UPLOAD_BYTES // 65536 + 4):
            yield b"y" * 65536

    r = http.post("/gradio_api/upload", content=chunked(),
                  headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert_refused(r, 413, "too large")
    assert sorted(app.uploads.dir.rglob("*")) == before
    ok = upload(http, b"z" * (MAX_UPLOAD_BYTES - 1000), "big.jsonl")
    assert ok.status_code == 200 and ok.json()[0].startswith(str(app.uploads.dir))


def test_old_uploads_and_strays_are_swept(tmp_path):
    up = Uploads(tmp_path / "uploads", max_age=3600)
    up.prepare()
    kept, old, stray = up.dir / "a" / "kept.jsonl", up.dir / "b" / "old.jsonl", up.dir / "tmpabc"
    for f in (kept, old, stray):
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(SET)
    up.record([str(kept), str(old)])
    long_ago = time.time() - 7200
    up._files[old.resolve()] = (long_ago, None)
    os.utime(stray, (long_ago, long_ago))
    up.sweep()
    assert kept.exists() and not old.exists() and not old.parent.exists() and not stray.exists()
    up.close()
    assert not up.dir.exists()


def test_a_closed_session_s_uploads_are_removed(served, http, fns):
    _, srv, _ = served
    path = upload(http, b'{"prompt": "h?", "response": "h"}\n', "closing.jsonl").json()[0]
    opened, used = threading.Event(), threading.Event()

    def heartbeat() -> None:  # the page keeps this stream open; closing the tab ends it
        with httpx.Client(base_url=srv.url, timeout=60) as c, c.stream("GET", "/gradio_api/heartbeat/closing") as r:
            chunks = r.iter_bytes()  # kept: a dropped iterator would close the stream at once
            next(chunks)
            opened.set()
            used.wait(60)  # the tab closes once the session has used its upload

    t = threading.Thread(target=heartbeat)
    t.start()
    assert opened.wait(60)
    assert evaluate_join(http, fns, path, "closing").status_code == 200
    assert os.path.exists(path)
    used.set()
    t.join(60)
    wait_for(lambda: not os.path.exists(path), timeout=120)


# --------------------------------------------------------------------------- malformed requests

MALFORMED = [
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 999, "session_hash": "s"}, 400, "fn_index"),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": -1, "session_hash": "s"}, 400, "fn_index"),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 1.5, "session_hash": "s"}, 400, "fn_index"),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": True, "session_hash": "s"}, 400, "fn_index"),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": "0", "session_hash": "s"}, 400, "fn_index"),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 2 ** 80, "session_hash": "s"}, 400, "fn_index"),
    ("POST", "/gradio_api/queue/join", {"data": [], "session_hash": "s"}, 400, "fn_index"),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 0}, 400, "session_hash"),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": 7}, 400, "session_hash"),
    ("POST", "/gradio_api/queue/join", {"data": "x", "fn_index": 0, "session_hash": "s"}, 400, "data"),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "s", "trigger_id": "x"}, 400,
     "trigger_id"),
    ("POST", "/gradio_api/queue/join", b"{not json", 400, "not valid JSON"),
    ("POST", "/gradio_api/queue/join", b"\xff\xfe", 400, "not valid JSON"),
    ("POST", "/gradio_api/queue/join", [1, 2], 400, "JSON object"),
    ("POST", "/gradio_api/queue/join", b"x" * (2 * 1024 * 1024 + 1), 413, "too large"),
    ("POST", "/gradio_api/call/nope", {"data": []}, 404, "no API named"),
    ("POST", "/gradio_api/call/v2/evaluate", {"data": []}, 404, "not served"),
    ("POST", "/gradio_api/call/evaluate", {"data": "x"}, 400, "data must be a list"),
    ("POST", "/gradio_api/call/evaluate", {"data": [], "fn_index": 999}, 400, "fn_index"),
    ("POST", "/gradio_api/run/evaluate", {"data": []}, 404, "not served"),
    ("POST", "/gradio_api/api/evaluate", {"data": []}, 404, "not served"),
    ("POST", "/gradio_api/cancel", {}, 400, "fn_index"),
    ("POST", "/gradio_api/reset", {"event_id": 3}, 400, "event_id"),
    ("POST", "/gradio_api/component_server", {"session_hash": "s", "component_id": 1, "fn_name": "x", "data": 1},
     404, "not served"),
    ("POST", "/login", {}, 404, "not served"),
    ("PUT", "/gradio_api/queue/join", {"data": []}, 405, "only POST"),
    ("DELETE", "/", None, 404, "not served"),
]


@pytest.mark.parametrize("method, path, body, status, words", MALFORMED,
                         ids=[f"{m} {p} {i}" for i, (m, p, *_) in enumerate(MALFORMED)])
def test_a_malformed_request_gets_a_4xx_with_a_short_reason(http, method, path, body, status, words):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    r = http.request(method, path, content=content, headers={"Content-Type": "application/json"})
    assert_refused(r, status, words)
    assert len(r.text) < 300


@pytest.mark.parametrize("content", [
    b"garbage",
    b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nno file name\r\n--b--\r\n',
])
def test_a_malformed_upload_gets_a_400(http, content):
    r = http.post("/gradio_api/upload", content=content, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "traceback" not in r.text.lower(), r.text


def test_no_read_route_answers_500_or_a_traceback(http, served):
    _, _, app = served
    paths = ["/gradio_api/queue/data?session_hash=zzz", "/gradio_api/queue/data", "/gradio_api/call/evaluate/nope",
             "/gradio_api/call/nope/x", "/gradio_api/file=", "/gradio_api/file=%00", "/gradio_api/upload_progress",
             "/gradio_api/upload_progress?upload_id=x", "/gradio_api/info?all_endpoints=xx", "/config?deep_link=../../x",
             "/config?page=zz", "/gradio_api/deep_link?deep_link=x", "/manifest.json", "/pwa_icon/9999", "/monitoring",
             "/gradio_api/startup-events", "/custom_component/a/b/c/d", "/svelte/../../x", "/static/../../x",
             "/assets/nope.js", "/gradio_api/stream/s/r/1/playlist.m3u8", "/gradio_api/stream/s/r/1/seg.ts",
             "/gradio_api/user", "/gradio_api/token", "/gradio_api/openapi.json", "/gradio_api/runs", "/nope",
             "/%ff", "/gradio_api/queue/data?session_hash=" + "a" * 5000]
    for path in paths:
        with http.stream("GET", path) as r:
            text = "" if "event-stream" in r.headers.get("content-type", "") else r.read().decode("utf-8", "replace")
            assert r.status_code < 500, (path, r.status_code, text[:200])
            assert "traceback" not in text.lower() and 'file "/' not in text.lower(), (path, text[:300])


def test_a_failure_behind_the_guard_leaves_no_exception_text(tmp_path):
    """Whatever fails behind the guard (an exception, a 5xx with a traceback in its body) answers a
    short JSON error with its status, never the text."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    from ultimate_trainer.core.hosts import allowed_hosts
    from ultimate_trainer.workbench.guard import Guard

    inner = FastAPI()

    @inner.post("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail")

    @inner.get("/leak")
    def leak() -> PlainTextResponse:
        return PlainTextResponse('Traceback (most recent call last):\n  File "/secret.py"', status_code=503)

    up = Uploads(tmp_path / "uploads")
    up.prepare()
    with UvicornThread(Guard(inner, allowed_hosts("127.0.0.1"), up, set(), set(), {"/boom"})) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/boom", json={})
        assert r.status_code == 500 and r.json() == {"error": "internal server error", "status": 500}
        r = c.get("/leak")
        assert r.status_code == 503 and r.json() == {"error": "service unavailable", "status": 503}


def test_uploads_unused_for_their_time_are_swept_while_the_server_runs(tmp_path, monkeypatch):
    from ultimate_trainer.workbench import app as wb_app

    monkeypatch.setattr(wb_app, "SWEEP_EVERY_S", 0.2)
    cfg = load_config(light_project(tmp_path / "p", checkpoints=0))
    guard = wb_app.create_app(cfg, cfg.path("status"))
    with UvicornThread(guard) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        path = upload(c).json()[0]
        assert os.path.exists(path)
        guard.uploads.max_age = 0  # every upload is now past its time
        wait_for(lambda: not os.path.exists(path), timeout=60)
