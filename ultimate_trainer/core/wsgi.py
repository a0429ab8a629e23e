"""A WSGI app served by waitress until Ctrl-C or SIGTERM: the loop of every Flask server (monitor,
stats API) and of serve.py. No web framework here: any WSGI callable; waitress is imported on use."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from ultimate_trainer.core.hosts import bind_error

log = logging.getLogger(__name__)


def bind(app: Any, host: str, port: int, name: str, threads: int = 8) -> Any | None:
    """A waitress server listening on host:port, or None after a one-line message (address in use names --port)."""
    from waitress.server import create_server

    try:
        return create_server(app, host=host, port=port, threads=threads, ident=name,
                             clear_untrusted_proxy_headers=True)
    except OSError as e:
        print(bind_error(name, host, port, e), file=sys.stderr)
        return None


def url(server: Any, path: str = "/") -> str:
    """Where ``server`` listens; a name that resolves to several addresses gives a multi-socket server
    without ``effective_*``, shown as ``?``."""
    host = getattr(server, "effective_host", "?")
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{getattr(server, 'effective_port', '?')}{path}"


def run(server: Any, name: str, path: str = "/") -> int:
    """Serve until interrupted (Ctrl-C, or SIGTERM from the daemon or systemd); the server is closed; exit code 0."""
    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread (tests): Ctrl-C handling is the caller's
        pass
    log.info("%s serving on %s", name, url(server, path))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def serve(app: Any, host: str, port: int, name: str, threads: int = 8, path: str = "/") -> int:
    """``bind`` then ``run``; 1 when the address cannot be bound."""
    server = bind(app, host, port, name, threads)
    return 1 if server is None else run(server, name, path)
