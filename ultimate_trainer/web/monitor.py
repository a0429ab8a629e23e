"""The live monitor page (port 8080): one static page that polls JSON built from ``status/``.

Routes:

- ``GET /``                 the page (static HTML; its script and style are static files, so the CSP
                            needs no 'unsafe-inline')
- ``GET /static/<file>``    app.js, charts.js, layout.js (the panel layout), style.css, layout.css, favicon.svg
- ``GET /api/state``        the status files merged (see ``state.build_state``), with accuracy per skill
                            (``skills.py``) and the workbench's port for the link; polled every refresh
- ``GET /api/history``      downsampled whole-history series for the loss and accuracy charts
- ``GET /api/export.json``  every logged step with accuracy and memory figures, plus the current state
- ``GET /api/export.csv``   the same steps as CSV
- anything else             JSON 404
"""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask, Response, jsonify, send_from_directory, stream_with_context

from ultimate_trainer.web import common
from ultimate_trainer.web import export
from ultimate_trainer.web.history import History
from ultimate_trainer.web.skills import SkillTracker
from ultimate_trainer.web.state import build_state
from ultimate_trainer.core import wsgi
from ultimate_trainer.core.logs import setup_logging

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


def create_app(status_dir: str | Path, refresh_seconds: float = 2.0, bind_host: str = "127.0.0.1",
               extra_hosts: list[str] | None = None, workbench_port: int | None = None) -> Flask:
    status_dir = Path(status_dir)
    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    common.secure(app, bind_host, extra_hosts)
    history = History(status_dir)
    skills = SkillTracker(status_dir)

    @app.get("/")
    def index() -> Response:
        resp = send_from_directory(STATIC_DIR, "index.html", mimetype="text/html")
        resp.headers["Content-Type"] = "text/html; charset=utf-8"
        return resp

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return send_from_directory(STATIC_DIR, "favicon.svg", mimetype="image/svg+xml")

    @app.get("/api/state")
    def state() -> Response:
        return jsonify(build_state(status_dir, history, refresh_seconds, skills, workbench_port))

    @app.get("/api/history")
    def hist() -> Response:
        return jsonify(history.snapshot())

    def download(body: object, mimetype: str, name: str) -> Response:
        return Response(stream_with_context(body), mimetype=mimetype,  # type: ignore[arg-type]
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/api/export.json")
    def export_json() -> Response:
        current = build_state(status_dir, history, refresh_seconds, skills, workbench_port)
        return download(export.iter_json(status_dir, current), "application/json", "training-history.json")

    @app.get("/api/export.csv")
    def export_csv() -> Response:
        return download(export.iter_csv(status_dir), "text/csv", "training-history.csv")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = common.build_parser("Live training monitor page over the status files.", "port")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    resolved = common.settings(args, "port")
    if resolved is None:
        return 2
    cfg, host, port, status_dir = resolved
    app = create_app(status_dir, cfg.monitor.refresh_seconds, host, args.allow_host, cfg.monitor.workbench_port)
    return wsgi.serve(app, host, port, "monitor_server")
