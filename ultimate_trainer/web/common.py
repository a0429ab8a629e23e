"""What both servers share: Host-header check, security headers, JSON errors, command line (the
waitress loop is core/wsgi.py, shared with serve.py).

Every JSON answer is strict JSON: a non-finite number (a NaN loss read from an old history file)
is served as ``null``, never as ``NaN``, which would make the page's ``JSON.parse`` reject it all.

The servers are read-only views of ``status/``: every route is GET/HEAD, debug is never on, and a
request whose Host header names neither the served host nor localhost is refused (a DNS-rebinding
page on another site cannot read the figures).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core.hosts import allowed_hosts, strip_port

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class FiniteJSONProvider(DefaultJSONProvider):
    """Flask's JSON with every non-finite float as ``null`` and ``allow_nan=False``."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return super().dumps(st.finite(obj), allow_nan=False, **kwargs)


def secure(app: Flask, bind_host: str, extra_hosts: list[str] | None = None) -> Flask:
    """Install the Host check, security headers, strict JSON and JSON error pages on ``app``."""
    settings = {"sort_keys": app.json.sort_keys, "ensure_ascii": app.json.ensure_ascii}
    app.json = FiniteJSONProvider(app)
    for k, v in settings.items():
        setattr(app.json, k, v)
    hosts = allowed_hosts(bind_host, extra_hosts)
    app.config["ALLOWED_HOSTS"] = hosts

    @app.before_request
    def _check_host() -> Any:
        host = strip_port(request.headers.get("Host", ""))
        if host not in app.config["ALLOWED_HOSTS"]:
            return json_error(403, f"Host {host!r} is not served here")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            return json_error(405, "read-only server: only GET is allowed")
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        return json_error(e.code or 500, e.description or e.name)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return json_error(500, f"internal error: {type(e).__name__}")

    return app


def json_error(code: int, message: str) -> Response:
    resp = jsonify({"error": message, "status": code})
    resp.status_code = code
    return resp


# --------------------------------------------------------------------------- command line and serving

def build_parser(description: str, default_port_key: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    config_mod.add_arguments(parser)
    parser.add_argument("--host", help="address to bind (default: monitor.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help=f"port to listen on (default: monitor.{default_port_key})")
    parser.add_argument("--status-dir", help="folder of the status files (default: paths.status)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="extra Host header to accept (e.g. a reverse proxy's name); repeatable")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def settings(args: argparse.Namespace, default_port_key: str) -> tuple[config_mod.Config, str, int, Path] | None:
    """Config plus the resolved (host, port, status dir), flags winning; None after a config error."""
    cfg = config_or_none(args)
    if cfg is None:
        return None
    host = args.host or cfg.monitor.host
    port = args.port if args.port is not None else getattr(cfg.monitor, default_port_key)
    status_dir = Path(args.status_dir) if args.status_dir else cfg.path("status")
    return cfg, host, port, status_dir
