"""``python serve.py``: the OpenAI-compatible API on 127.0.0.1:8083 (docs/SERVING.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core import wsgi
from ultimate_trainer.core.hosts import is_loopback
from ultimate_trainer.core.logs import setup_logging
from ultimate_trainer.serve.api import create_app, lower_priority

log = logging.getLogger(__name__)

KEY_ENV = "UT_SERVE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="OpenAI-compatible API over the trained models (docs/SERVING.md).")
    config_mod.add_arguments(ap)
    ap.add_argument("--host", help="address to bind (default: monitor.host, 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: monitor.serve_port, 8083)")
    ap.add_argument("--api-key", help=f"require 'Authorization: Bearer <key>' (default: ${KEY_ENV}); "
                                      "required to bind an address other than loopback")
    ap.add_argument("--queue", type=int, default=4, help="requests that may wait for their turn (default 4); "
                                                          "more get 429")
    ap.add_argument("--max-tokens", type=int, default=512, help="the most tokens one answer may have (default 512)")
    ap.add_argument("--nice", type=int, default=10, help="CPU niceness added to this process (default 10)")
    ap.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="extra Host header to accept (a reverse proxy's name); repeatable")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = config_or_none(args)
    if cfg is None:
        return Exit.CONFIG
    host = args.host or cfg.monitor.host
    port = args.port if args.port is not None else cfg.monitor.serve_port
    key = args.api_key or os.environ.get(KEY_ENV) or None
    if not is_loopback(host) and key is None:
        print(f"serve: binding {host} opens the API beyond this machine; set --api-key (or ${KEY_ENV})",
              file=sys.stderr)
        return Exit.CONFIG
    if args.queue < 0 or args.max_tokens < 1:
        print("serve: --queue must be 0 or more and --max-tokens 1 or more", file=sys.stderr)
        return Exit.CONFIG
    from ultimate_trainer.model.pool import ModelPool

    lower_priority(args.nice)
    pool = ModelPool(cfg)
    app = create_app(cfg, pool, host, api_key=key, queue=args.queue, max_tokens=args.max_tokens,
                     extra_hosts=args.allow_host)
    return wsgi.serve(app, host, port, "serve", threads=args.queue + 3, path="/v1")
