"""An OpenAI-compatible API over the models training produces: ``/v1/models``, ``/v1/chat/completions``.

``python serve.py`` (port ``monitor.serve_port``, 8083; docs/SERVING.md). A request names a model as
the workbench does (``adopted``, the default: the newest consolidation the gate accepted; ``latest``;
``base``; ``checkpoint-<step>``; ``consolidated/<name>``). The name is resolved at every request, so a
newly adopted model answers the next request, with no restart.

The server is for this machine first: it binds 127.0.0.1, answers only Host headers that name it
(``core/hosts.py``), refuses a POST whose ``Origin`` is another site's or ``null``, and with
``--api-key`` (required to bind any other address) asks for ``Authorization: Bearer <key>``.

One answer is generated at a time; up to ``--queue`` more requests wait for their turn and any
beyond are refused at once with 429 (``Retry-After``); a model that cannot be loaded is 503. Training
keeps priority: the server runs at a lower CPU priority, and while training_status.json says a run
is alive it generates with one thread. A malformed request is a 400 in OpenAI's error shape, never a
traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from flask import Flask, Response, request, stream_with_context
from werkzeug.exceptions import HTTPException

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config
from ultimate_trainer.core.records import TrainingStatus
from ultimate_trainer.core.hosts import allowed_hosts, refusal, strip_port

log = logging.getLogger(__name__)

DEFAULT_MODEL = ck.ADOPTED
ROLES = ("system", "user", "assistant")
ACTIVE_STATES = ("loading", "tokenizing", "training", "evaluating", "saving")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def error_response(e: ApiError) -> Response:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    resp = Response(json.dumps(body), status=e.status, mimetype="application/json")
    for k, v in e.headers.items():
        resp.headers[k] = v
    return resp


class Admission:
    """One generation at a time and a bounded number waiting: ``enter`` says at once whether there is room."""

    def __init__(self, queue: int):
        self.capacity = 1 + queue
        self.inside = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.inside >= self.capacity:
                return False
            self.inside += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be a number from {lo} to {hi}", param=name)
    return float(v)


def _content(m: dict[str, Any], i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def parse_chat(body: Any, max_tokens_cap: int) -> ChatRequest:
    """The request's fields, checked; ApiError 400 naming the first wrong one."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "'model' must be a model name (GET /v1/models lists them)", param="model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param="messages")
        messages.append({"role": role, "content": _content(m, i)})
    if messages[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must not be the assistant's: there is nothing to answer",
                       param="messages")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "'n' must be 1 (one answer per request)", param="n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is None:
        limit = max_tokens_cap
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_tokens_cap:
        raise ApiError(400, f"'max_tokens' must be an integer from 1 to {max_tokens_cap}", param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(model.strip(), messages, limit, _number(body, "temperature", 0.0, 0.0, 2.0),
                       _number(body, "top_p", 1.0, 0.0, 1.0) or 1.0, stream, bool(opts.get("include_usage")))


def training_active(status_dir: Path) -> bool:
    """Whether training_status.json says a run is alive (a state of work and a live pid)."""
    ts = TrainingStatus.read(status_dir / st.TRAINING_STATUS)
    return ts is not None and ts.state in ACTIVE_STATES and st.pid_alive(ts.pid)


def _created(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def model_list(cfg: Config) -> list[dict[str, Any]]:
    """``adopted``, ``latest``, ``base``, then every complete checkpoint and adopted consolidation, newest first."""
    def entry(mid: str, created: int, **extra: Any) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": created, "owned_by": "ultimate-trainer", **extra}

    now = int(time.time())
    out = [entry(ck.ADOPTED, now, description="the newest consolidation the gate accepted (the base while none)"),
           entry(ck.LATEST, now, description="what training continues from: the newest checkpoint"),
           entry(ck.BASE, now, description=f"the base model {cfg.base_model}")]
    for c in reversed(ck.list_complete(cfg.path("checkpoints"))):
        out.append(entry(c.name, _created(c.path / ck.MARKER), global_step=c.global_step))
    for c in reversed(ck.list_consolidations(cfg.path("models"))):
        out.append(entry(ck.CONSOLIDATED + c.path.name, _created(c.path / ck.MANIFEST), global_step=c.global_step))
    return out


def create_app(cfg: Config, pool: Any, bind_host: str, *, api_key: str | None = None, queue: int = 4,
               max_tokens: int = 512, status_dir: Path | None = None, extra_hosts: list[str] | None = None,
               threads_idle: int | None = None) -> Flask:
    """The API over ``pool`` (a ``model.pool.ModelPool``, or anything with its ``get`` and ``stream``)."""
    app = Flask(__name__)
    hosts = allowed_hosts(bind_host, extra_hosts)
    admission = Admission(queue)
    status_dir = status_dir or cfg.path("status")
    threads_idle = threads_idle or cfg.monitor.workbench_threads
    app.config["ADMISSION"] = admission

    @app.before_request
    def _guard() -> Any:
        host = strip_port(request.headers.get("Host", ""))
        if host not in hosts:
            return error_response(ApiError(403, f"Host {host!r} is not served here", "permission_error"))
        why = refusal(request.method, {k.lower(): v for k, v in request.headers.items()})
        if why is not None:  # the workbench's same-origin rule: no other site's page drives generation
            return error_response(ApiError(403, why, "permission_error"))
        if api_key is not None and request.path.startswith("/v1/"):
            auth = request.headers.get("Authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_response(ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                                               "authentication_error", code="invalid_api_key"))
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError) -> Response:
        return error_response(e)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        return error_response(ApiError(e.code or 400, e.description or e.name))

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok", "busy": admission.inside, "capacity": admission.capacity,
                "training": training_active(status_dir)}

    @app.get("/v1/models")
    def models() -> Any:
        return {"object": "list", "data": model_list(cfg)}

    @app.get("/v1/models/<path:name>")
    def model(name: str) -> Any:
        for m in model_list(cfg):
            if m["id"] == name:
                return m
        raise ApiError(404, f"no model named {name!r}", param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    def chat() -> Any:
        body = request.get_json(silent=True)
        if body is None:
            raise ApiError(400, "the request body must be JSON (Content-Type: application/json)")
        req = parse_chat(body, max_tokens)
        if not admission.enter():
            raise ApiError(429, f"busy: one answer is being generated and {admission.capacity - 1} more wait; "
                                "retry shortly", "rate_limit_error", code="queue_full", headers={"Retry-After": "2"})
        try:
            loaded = _load(req.model)
        except BaseException:
            admission.leave()
            raise
        if req.stream:
            return Response(stream_with_context(_sse(req, loaded)), mimetype="text/event-stream",
                            headers={"X-Accel-Buffering": "no"})
        try:
            stats: dict[str, Any] = {}
            text = _generate(req, stats)
        finally:
            admission.leave()
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": loaded.spec.key, "system_fingerprint": loaded.spec.fingerprint,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": stats.get("finish_reason", "stop"), "logprobs": None}],
                "usage": _usage(stats)}

    def _load(name: str) -> Any:
        from ultimate_trainer.model.loading import ModelError

        try:
            return pool.get(name)
        except ValueError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        except ModelError as e:
            raise ApiError(503, f"the model cannot be loaded now: {e}", "server_error",
                           code="model_unavailable") from None
        except Exception as e:  # damaged files, out of memory: this model is unavailable, the server is fine
            log.exception("cannot load %s", name)
            raise ApiError(503, f"the model cannot be loaded now: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                           "server_error", code="model_unavailable") from None

    def _generate(req: ChatRequest, stats: dict[str, Any]) -> str:
        text = ""
        for _m, text in _pieces(req, stats):
            pass
        return text

    def _pieces(req: ChatRequest, stats: dict[str, Any]) -> Iterator[tuple[Any, str]]:
        import torch

        pool.threads = 1 if training_active(status_dir) else threads_idle  # training keeps priority
        torch.set_num_threads(pool.threads)
        yield from pool.stream(req.model, req.messages, req.max_tokens, req.temperature, req.top_p, stats=stats)

    def _sse(req: ChatRequest, loaded: Any) -> Iterator[str]:
        cid, created, key = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), loaded.spec.key

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> str:
            body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": key,
                                    "system_fingerprint": loaded.spec.fingerprint,
                                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                 "logprobs": None}]}
            if usage is not None:
                body = {**body, "choices": [], "usage": usage}
            return f"data: {json.dumps(body)}\n\n"

        try:
            stats: dict[str, Any] = {}
            yield chunk({"role": "assistant", "content": ""})
            sent = ""
            try:
                for _m, text in _pieces(req, stats):
                    if len(text) > len(sent) and text.startswith(sent):
                        yield chunk({"content": text[len(sent):]})
                        sent = text
            except Exception as e:  # the status line is sent already: the error goes in the stream
                log.exception("generation failed")
                err = {"error": {"message": f"generation failed: {type(e).__name__}", "type": "server_error",
                                 "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            yield chunk({}, stats.get("finish_reason", "stop"))
            if req.include_usage:
                yield chunk({}, usage=_usage(stats))
            yield "data: [DONE]\n\n"
        finally:
            admission.leave()

    return app


def _usage(stats: dict[str, Any]) -> dict[str, int]:
    p, c = int(stats.get("prompt_tokens", 0)), int(stats.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def lower_priority(niceness: int) -> None:
    """Give the CPU to training first: raise this process's niceness (it can never be lowered again)."""
    try:
        os.nice(niceness)
    except OSError as e:
        log.warning("could not lower the server's CPU priority: %s", e)
