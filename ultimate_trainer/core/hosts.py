"""Which Host headers a local web server answers (all three servers): the DNS-rebinding guard.

A page on another site that points its own name at 127.0.0.1 sends that name as Host; refusing
every name but localhost and the bound address keeps such a page from reading (or, for the
workbench, driving) a server on this machine.
"""

from __future__ import annotations

import errno

import socket

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})


def strip_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(bind_host: str, extra: list[str] | None = None) -> frozenset[str]:
    """Host names a request may carry: localhost, the bound address, and when bound to every
    interface, this machine's names and addresses."""
    names = set(LOCAL_NAMES) | {h.lower() for h in extra or []}
    names.add(strip_port(bind_host) if bind_host not in WILDCARD else "")
    if bind_host in WILDCARD:
        import psutil
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        for addrs in psutil.net_if_addrs().values():
            names |= {a.address.split("%", 1)[0].lower() for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}
    names.discard("")
    return frozenset(names)


def bind_error(name: str, host: str, port: int, e: OSError) -> str:
    """The one line a server prints when it cannot listen; "in use" names the ``--port`` remedy."""
    if e.errno == errno.EADDRINUSE:
        return f"{name}: {host}:{port} is already in use; choose another with --port"
    return f"{name}: cannot listen on {host}:{port}: {e.strerror or e}"


def origin_allowed(origin: str | None, hosts: frozenset[str]) -> bool:
    """Whether a request's ``Origin`` header may drive a server (POSTs): the cross-site guard.

    No header: not a browser's cross-origin request (curl, SDKs), allowed. ``null`` (a sandboxed frame,
    a file:// page) and any origin whose host is not one ``allowed_hosts`` names: refused, so a page on
    another site cannot make this machine generate (or export) through the user's browser.
    """
    if origin is None:
        return True
    origin = origin.strip().lower()
    if "://" not in origin:
        return False  # "null" and anything that is not scheme://host[:port]
    scheme, rest = origin.split("://", 1)
    if scheme not in ("http", "https") or not rest or "/" in rest:
        return False
    return strip_port(rest) in hosts
