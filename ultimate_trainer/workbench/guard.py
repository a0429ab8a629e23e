"""What stands between the network and the workbench's Gradio app: an ASGI middleware, plus the
folder the page's uploads go to.

Gradio answers far more than the page uses (legacy predict routes, a URL proxy, a file route over
several folders, CORS headers that echo a foreign origin when the Host is not a localhost alias) and
answers 500 with its exception text to a malformed body. Nothing here patches Gradio; every request
passes these checks first, in this order:

1. Host: localhost or the bound address only (core/hosts.py), else 403 (websockets: closed).
2. Same origin (core/hosts.py ``refusal``): no write from another origin, a ``null`` Origin, a
   cross-site ``Sec-Fetch-Site`` or a ``text/plain``/form body; no cross-site subresource read. 403.
3. Routes: a write (any method but GET/HEAD) reaches only ``WRITE_ROUTES`` (queue join, upload,
   cancel, reset, ``/call/<api name>``) or the workbench's own routes, else 404. Reads of routes the
   page never needs (``BLOCKED_READS``: the URL proxy, run history, monitoring...) are 404.
4. Bodies: at most ``MAX_JSON_BYTES`` of JSON (an upload: ``MAX_UPLOAD_BYTES``), read here before
   Gradio sees a byte (413 beyond); JSON that does not parse, a non-object, an ``fn_index`` or
   ``trigger_id`` that names no event, an API name that is not served: 400/404 with the reason.
5. Files: every file a body names (any object with a ``path``) must be an upload this server
   stored, used by the session that first used it after its upload (``Uploads.claim``); anything
   else is refused before Gradio opens or copies it. ``/gradio_api/file=...`` serves only those
   uploads.
6. Answers: CORS headers never leave (the page is same-origin and needs none); an exception or a
   5xx from Gradio leaves as a short JSON error with its status and without its text (logged here).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ultimate_trainer.core.hosts import READ_METHODS, refusal, strip_port

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 4 * 1024 * 1024   # one evaluation set of 500 examples is far smaller
MAX_JSON_BYTES = 2 * 1024 * 1024     # a long chat history, twice over
MAX_STORED_BYTES = 64 * 1024 * 1024  # all uploads kept at once
UPLOAD_MAX_AGE_S = 3600              # an upload unused for an hour is deleted
MULTIPART_SLACK = 64 * 1024          # multipart boundaries and part headers around the file

API = "/gradio_api"
WRITE_ROUTES = frozenset({f"{API}/queue/join", f"{API}/upload", f"{API}/cancel", f"{API}/reset"})
CALL_ROUTE = re.compile(rf"^{API}/call/([^/]+)$")  # not /call/v2/: keyword bodies Gradio cannot check
FILE_ROUTE = re.compile(rf"^{API}/file(?:=|/)(.*)$", re.S)
BLOCKED_READS = re.compile(rf"^(?:{API}/(?:proxy=|run-history|runs|deep_link|dev/|profiling|vibe|mcp|monitoring)"
                           rf"|/monitoring|/logout|/login)")
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
           (b"x-frame-options", b"DENY")]


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": message, "status": status}).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "server error"


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------- uploads

class Uploads:
    """This process's upload folder, ``<paths.work>/workbench/uploads/<pid>/`` (Gradio's
    ``GRADIO_TEMP_DIR``): which files the upload route stored, which session claimed each, and the
    cleanup (unused for ``max_age`` seconds, the session's files when its tab closes, the whole
    folder when the server stops, and folders of processes that are gone when one starts)."""

    def __init__(self, root: Path, max_age: float = UPLOAD_MAX_AGE_S, max_stored: int = MAX_STORED_BYTES):
        self.root = Path(root)
        self.dir = (self.root / str(os.getpid())).resolve()
        self.max_age, self.max_stored = max_age, max_stored
        self._files: dict[Path, tuple[float, str | None]] = {}  # file -> (stored at, claiming session)
        self._lock = threading.Lock()

    def prepare(self) -> Path:
        """Remove the folders of workbench processes that no longer run; create this one's (0700)."""
        import psutil

        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.isdigit() and d.resolve() != self.dir and not psutil.pid_exists(int(d.name)):
                    shutil.rmtree(d, ignore_errors=True)
        if self.dir.exists():  # a reused pid: whatever is there is a dead process's
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, mode=0o700)
        return self.dir

    def inside(self, path: str | Path) -> Path | None:
        """The real path of ``path`` when it lies inside this folder (links followed), else None."""
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):
            return None
        return real if real.is_relative_to(self.dir) and real != self.dir else None

    def record(self, paths: list[Any]) -> None:
        """Files the upload route just stored; a file stored again is free to be claimed again."""
        now = time.time()
        with self._lock:
            for p in paths:
                real = self.inside(p) if isinstance(p, str) else None
                if real is not None:
                    self._files[real] = (now, None)

    def claim(self, path: str, session: str) -> str | None:
        """Why ``path`` may not be used by ``session``, or None (and the session now holds it)."""
        real = self.inside(path)
        with self._lock:
            entry = self._files.get(real) if real is not None else None
            if entry is None or not real.is_file():
                return "only a file uploaded through this page can be used"
            stored, owner = entry
            if owner is not None and owner != session:
                return "that file was uploaded in another session: upload it again"
            self._files[real] = (time.time(), session)
        return None

    def served(self, path: str) -> bool:
        """Whether the file route may serve ``path``: an upload stored here."""
        real = self.inside(path)
        with self._lock:
            return real is not None and real in self._files and real.is_file()

    def stored_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file()) if self.dir.is_dir() else 0

    def release(self, session: str) -> None:
        """Delete the files ``session`` claimed (its tab closed)."""
        with self._lock:
            gone = [f for f, (_, owner) in self._files.items() if owner == session]
            for f in gone:
                del self._files[f]
        for f in gone:
            self._remove(f)

    def sweep(self) -> None:
        """Delete uploads unused for ``max_age`` seconds, and strays (half-written parts) as old."""
        cutoff = time.time() - self.max_age
        with self._lock:
            old = [f for f, (at, _) in self._files.items() if at < cutoff]
            for f in old:
                del self._files[f]
            known = set(self._files)
        for f in old:
            self._remove(f)
        if self.dir.is_dir():
            for f in self.dir.rglob("*"):
                try:
                    if f.is_file() and f not in known and f.stat().st_mtime < cutoff:
                        self._remove(f)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self._files.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove(self, f: Path) -> None:
        try:
            f.unlink(missing_ok=True)
            if f.parent != self.dir:
                f.parent.rmdir()  # the per-content folder Gradio made, once empty
        except OSError:
            pass


# --------------------------------------------------------------------------- the middleware

def _file_paths(value: Any, out: list[str]) -> list[str]:
    """Every ``path`` a JSON body names (Gradio's file objects), however deep."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str):
            out.append(value["path"])
        for v in value.values():
            _file_paths(v, out)
    elif isinstance(value, list):
        for v in value:
            _file_paths(v, out)
    return out


def _multipart_refusal(content_type: str, body: bytes) -> str | None:
    """Why an upload body is not one Gradio can store (every ``files`` part a named file), or None."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        return "a multipart body needs a boundary"
    parts: list[dict[bytes, bytes]] = []
    field: list[bytes] = []
    value: list[bytes] = []

    def header_end() -> None:
        parts[-1][b"".join(field).lower()] = b"".join(value)
        field.clear()
        value.clear()

    callbacks = {"on_part_begin": lambda: parts.append({}),
                 "on_header_field": lambda d, a, b: field.append(d[a:b]),
                 "on_header_value": lambda d, a, b: value.append(d[a:b]),
                 "on_header_end": header_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as e:
        return f"not a multipart body: {str(e)[:80]}"
    for part in parts:
        _, disp = parse_options_header(part.get(b"content-disposition", b""))
        if disp.get(b"name") == b"files" and not disp.get(b"filename"):
            return "each uploaded part needs a file name"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Guard:
    """ASGI middleware in front of the workbench (see the module's docstring for the rules).

    ``fn_ids``, ``api_names``: the page's Gradio events (``fn_index``) and API names; ``own_writes``:
    the paths of the workbench's own non-Gradio routes that accept writes (they pass the Host and
    same-origin rules and the body bound like the rest, and check their bodies themselves).
    """

    def __init__(self, app: Any, hosts: frozenset[str], uploads: Uploads, fn_ids: set[int],
                 api_names: set[str], own_writes: set[str] | None = None):
        self.app, self.hosts, self.uploads = app, hosts, uploads
        self.fn_ids, self.api_names, self.own_writes = fn_ids, api_names, own_writes or set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for k, v in scope.get("headers") or []:
            name = k.decode("latin-1").lower()
            if name in headers and name in ("host", "origin"):
                headers[name] = "\0"  # two Hosts or two Origins: refused below as unknown
            else:
                headers.setdefault(name, v.decode("latin-1"))
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        host = strip_port(headers.get("host", ""))
        if host not in self.hosts:
            why = (403, f"Host {host[:100]!r} is not served here")
        elif scope["type"] == "websocket":
            why = (403, "websockets are not served")
        else:
            reason = refusal(method, headers)
            why = (403, reason) if reason else None
        if why is not None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await self._respond(send, *_error(*why))
        try:
            body = await self._check(scope, method, headers, receive)
        except Refused as e:
            return await self._respond(send, *_error(e.status, e.message))
        return await self._forward(scope, receive, send, body)

    # ----------------------------------------------------------------- the checks
    async def _check(self, scope: dict[str, Any], method: str, headers: dict[str, str], receive: Any
                     ) -> bytes | None:
        """Refuse what may not reach Gradio; a write's whole body (read here), else None."""
        path = scope.get("path", "")
        norm = path.rstrip("/") or "/"
        if method in READ_METHODS:
            if BLOCKED_READS.match(norm):
                raise Refused(404, "not served by the workbench")
            m = FILE_ROUTE.match(path)
            if m and not self.uploads.served(m.group(1)):
                raise Refused(404, "no such file: the workbench serves only files uploaded through its page")
            return None
        if method == "OPTIONS":
            raise Refused(405, "no cross-origin access: the page and its server share one origin")
        call = CALL_ROUTE.match(norm)
        if norm not in WRITE_ROUTES and not call and norm not in self.own_writes:
            raise Refused(404, "not served by the workbench")
        if method != "POST":
            raise Refused(405, "only POST is accepted here")
        if call and call.group(1) not in self.api_names:
            raise Refused(404, f"no API named {call.group(1)[:60]!r}")
        upload = norm == f"{API}/upload"
        cap = MAX_UPLOAD_BYTES + MULTIPART_SLACK if upload else MAX_JSON_BYTES
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if upload and ctype != "multipart/form-data":
            raise Refused(400, "an upload is multipart/form-data")
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            raise Refused(400, "bad Content-Length") from None
        if declared > cap:
            raise Refused(413, f"request too large: at most {cap // 1024} KiB")
        body = await self._read(receive, cap)
        if upload:
            why = _multipart_refusal(headers.get("content-type", ""), body)
            if why is not None:
                raise Refused(400, why)
            self.uploads.sweep()
            if self.uploads.stored_bytes() + len(body) > self.uploads.max_stored:
                raise Refused(507, "the upload folder is full: try again in an hour")
            return body
        if norm in self.own_writes:
            return body  # the workbench's own route validates its own body
        self._check_json(norm, body)
        return body

    async def _read(self, receive: Any, cap: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise Refused(413, f"request too large: at most {cap // 1024} KiB")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _check_json(self, route: str, body: bytes) -> None:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise Refused(400, "the body must be a JSON object")
        session = data.get("session_hash")
        if session is not None and (not isinstance(session, str) or not 0 < len(session) <= 128):
            raise Refused(400, "session_hash must be a string of 1 to 128 characters")
        if route == f"{API}/queue/join" and session is None:
            raise Refused(400, "session_hash is required")
        if "fn_index" in data and data["fn_index"] is not None or route in (f"{API}/queue/join", f"{API}/cancel"):
            if not _is_int(data.get("fn_index")) or data["fn_index"] not in self.fn_ids:
                raise Refused(400, "fn_index names no event of this page")
        trigger = data.get("trigger_id")
        if trigger is not None and not _is_int(trigger):
            raise Refused(400, "trigger_id must be an integer")
        if "data" in data and not isinstance(data["data"], list) and not route.startswith(f"{API}/call/v2/"):
            raise Refused(400, "data must be a list")
        if route in (f"{API}/cancel", f"{API}/reset") and not isinstance(data.get("event_id"), str):
            raise Refused(400, "event_id must be a string")
        paths = _file_paths(data, [])
        owner = session if session is not None else f"call-{uuid.uuid4().hex}"  # a /call: one use
        for p in paths:
            why = self.uploads.claim(p, owner)
            if why is not None:
                raise Refused(403, f"file refused: {why}")

    # ----------------------------------------------------------------- forwarding
    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any, body: bytes | None) -> None:
        if body is not None:
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # the disconnect, when it comes

            receive_app = replay
        else:
            receive_app = receive
        upload = scope.get("path", "").rstrip("/") == f"{API}/upload"
        state = {"started": False, "failed": False, "status": 0, "captured": []}

        async def guarded_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                if message["status"] >= 500:
                    state["failed"] = True
                    return  # replaced below, once its body has been swallowed
                state["started"] = True
                message["headers"] = [(k, v) for k, v in message.get("headers", [])
                                      if not k.lower().startswith(b"access-control-")] + HEADERS
                return await send(message)
            if message["type"] == "http.response.body":
                if state["failed"]:
                    if not message.get("more_body"):
                        log.warning("%s %s: Gradio answered %d", scope.get("method"), scope.get("path"),
                                    state["status"])
                        state["failed"] = False
                        await self._respond(send, *_error(state["status"], _phrase(state["status"])))
                        state["started"] = True
                    return
                if upload and state["status"] == 200:
                    state["captured"].append(message.get("body", b""))
                    if not message.get("more_body"):
                        self._record_upload(b"".join(state["captured"]))
            return await send(message)

        try:
            await self.app(scope, receive_app, guarded_send)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not state["started"]:
                await self._respond(send, *_error(500, _phrase(500)))

    def _record_upload(self, body: bytes) -> None:
        try:
            paths = json.loads(body)
        except ValueError:
            return
        if isinstance(paths, list):
            self.uploads.record(paths)

    @staticmethod
    async def _respond(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *HEADERS]})
        await send({"type": "http.response.body", "body": body})
