"""serve.py, driven with the official ``openai`` client against a tiny model on a real waitress server."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import openai
import pytest

from _export_helpers import tiny_model
from _workbench_helpers import add_checkpoint
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core import status as st
from ultimate_trainer.model.pool import ModelPool
from ultimate_trainer.serve.api import create_app
from ultimate_trainer.serve.cli import main as serve_main

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Served:
    def __init__(self, app):
        from waitress.server import create_server

        self.server = create_server(app, host="127.0.0.1", port=0, threads=6)
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model(root / "model", "llama")
    (root / "config.json").write_text(json.dumps({
        "base_model": str(model_dir), "load_in_4bit": False, "paths": {"root": str(root)},
        "training": {"device": "cpu"}, "consolidation": {"gate": False}, "monitor": {"workbench_threads": 1}}))
    add_checkpoint(root, model_dir, 4, "r1", [], 4, 4, seed=3)
    broken = add_checkpoint(root, model_dir, 2, "r0", [], 2, 2, seed=4)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    cfg = config_mod.load(root / "config.json")
    return cfg, ModelPool(cfg, capacity=2, threads=1)


@pytest.fixture(scope="module")
def served(project):
    cfg, pool = project
    app = create_app(cfg, pool, "127.0.0.1", queue=1, max_tokens=16)
    with Served(app) as s:
        yield s, app


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url, api_key="unused", max_retries=0, timeout=120)


def _greedy(pool: ModelPool, key: str, messages, n: int) -> str:
    return pool.answers(key, [messages], n, 1)[1][0]


def test_models_lists_adopted_latest_base_and_the_checkpoints(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:3] == ["adopted", "latest", "base"]
    assert "checkpoint-4" in ids and "checkpoint-2" in ids


def test_a_chat_completion_answers_like_the_trained_model(client, project):
    _cfg, pool = project
    r = client.chat.completions.create(model="checkpoint-4", messages=QUESTION, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip() == _greedy(pool, "checkpoint-4", QUESTION, 8)
    assert r.model == "checkpoint-4" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_sends_the_same_answer_in_pieces_then_the_usage(client):
    whole = client.chat.completions.create(model="latest", messages=QUESTION, max_tokens=8).choices[0].message.content
    chunks = list(client.chat.completions.create(model="latest", messages=QUESTION, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert {c.model for c in chunks} == {"checkpoint-4"}  # latest, resolved


def test_adopted_follows_a_new_consolidation_without_a_restart(client, project):
    from ultimate_trainer.trainer.consolidation.merge import consolidate

    cfg, _pool = project
    before = client.chat.completions.create(messages=QUESTION, max_tokens=4, model="adopted")
    assert before.model == "base"  # nothing adopted yet: the base
    folder, adopted = consolidate(cfg)
    assert adopted
    after = client.chat.completions.create(messages=QUESTION, max_tokens=4, model="adopted")
    assert after.model == f"consolidated/{folder.name}"
    assert f"consolidated/{folder.name}" in [m.id for m in client.models.list().data]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"messages": QUESTION, "max_tokens": 10_000}, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": "8"}, "max_tokens"),
    ({"messages": QUESTION, "temperature": -1}, "temperature"),
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": QUESTION, "stream": "yes"}, "stream"),
])
def test_malformed_requests_are_400s_that_name_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body={"model": "base", **body}, cast_to=object)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def _raw(port: int, request: bytes) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def _post(port: int, body: bytes, headers: str = "") -> tuple[int, str]:
    return _raw(port, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                       ).encode() + body)


def test_broken_json_unknown_models_and_unknown_paths_answer_without_a_traceback(served):
    port = served[0].port
    for body in (b"{not json", b"[1, 2]", b"null", "\u00ff".encode("latin-1")):
        code, text = _post(port, body)
        assert code == 400 and "Traceback" not in text and json.loads(text)["error"]["message"]
    code, text = _post(port, json.dumps({"model": "checkpoint-999", "messages": QUESTION}).encode())
    assert code == 404 and json.loads(text)["error"]["code"] == "model_not_found"
    code, text = _raw(port, f"GET /v1/nothing HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    assert code == 404 and json.loads(text)["error"]


def test_a_model_that_cannot_load_is_a_503(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="checkpoint-2", messages=QUESTION, max_tokens=4)
    assert e.value.status_code == 503 and "cannot be loaded" in e.value.message


def test_foreign_host_and_foreign_or_null_origins_are_refused(served):
    port = served[0].port
    code, _ = _raw(port, b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert code == 403
    body = json.dumps({"model": "base", "messages": QUESTION, "max_tokens": 2}).encode()
    # the workbench's same-origin rule (core/hosts.refusal): another site, null, another local port
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{int(port) + 1}"):
        code, text = _post(port, body, f"Origin: {origin}\r\n")
        assert code == 403 and "own page only" in text
    code, text = _post(port, body, f"Origin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: cross-site\r\n")
    assert code == 403 and "cross-site" in text
    code, _ = _post(port, body, f"Origin: http://127.0.0.1:{port}\r\n")
    assert code == 200


def test_when_one_answer_runs_and_the_queue_is_full_the_next_request_gets_429(client, served):
    admission = served[1].config["ADMISSION"]
    assert admission.capacity == 2  # one generating + queue=1 waiting
    assert admission.enter() and admission.enter()  # both places taken, as by two requests in flight
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="base", messages=QUESTION, max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers["Retry-After"]
    finally:
        admission.leave()
        admission.leave()
    assert client.chat.completions.create(model="base", messages=QUESTION, max_tokens=2).choices


def test_an_api_key_is_required_when_set(project):
    cfg, pool = project
    with Served(create_app(cfg, pool, "127.0.0.1", api_key="s3cret")) as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url, api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=s.url, api_key="s3cret", max_retries=0).models.list().data


def test_while_training_runs_generation_uses_one_thread(client, project):
    cfg, pool = project
    pool.threads = 3
    status_file = cfg.path("status") / st.TRAINING_STATUS
    st.atomic_write_json(status_file, {"state": "training", "pid": os.getpid()})
    try:
        client.chat.completions.create(model="base", messages=QUESTION, max_tokens=2)
        assert pool.threads == 1
    finally:
        st.atomic_write_json(status_file, {"state": "idle", "pid": os.getpid()})
    client.chat.completions.create(model="base", messages=QUESTION, max_tokens=2)
    assert pool.threads == cfg.monitor.workbench_threads


def test_binding_beyond_loopback_without_an_api_key_is_refused(project, capsys, monkeypatch):
    cfg, _pool = project
    monkeypatch.delenv("UT_SERVE_API_KEY", raising=False)
    assert serve_main(["--config", str(Path(cfg.path("root")) / "config.json"), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_an_address_in_use_is_one_line_naming_port(project, capsys):
    """serve.py binds through the servers' shared loop (core/wsgi.py): the same one-line refusal."""
    import socket

    cfg, _pool = project
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        rc = serve_main(["--config", str(Path(cfg.path("root")) / "config.json"), "--port",
                         str(busy.getsockname()[1]), "--nice", "0"])
    finally:
        busy.close()
    assert rc == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("serve: ") and "already in use" in lines[0] and "--port" in lines[0]
