"""Which requests a local web server answers: the Host rule (all servers) and the same-origin rule
(every server that accepts writes).

Host: a page on another site that points its own name at 127.0.0.1 sends that name as Host;
refusing every name but localhost and the bound address keeps such a page from reading (or, for the
workbench, driving) a server on this machine: the DNS-rebinding guard.

Same origin (``refusal``): a page on another origin, open in the user's browser, can still send
requests to 127.0.0.1 with the right Host (a form post, a ``fetch`` with ``text/plain`` or
``multipart/form-data``, an ``<img>``); the browser marks them with ``Origin`` and ``Sec-Fetch-*``.
Pure functions over header values, no web framework: each server applies them in its own layer.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})


def strip_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server on this machine: ``localhost`` or a loopback address
    (127.0.0.0/8, ``::1``, an IPv4-mapped ``::ffff:127.x.y.z``; bracketed or not). A wildcard or any
    other name is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # Python before 3.13 calls ::ffff:127.0.0.1 not loopback
    return (mapped or ip).is_loopback


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


# --------------------------------------------------------------------------- the same-origin rule

READ_METHODS = frozenset({"GET", "HEAD"})
# Bodies a cross-site page can send without a CORS preflight, and which no workbench route needs as
# such (uploads are multipart and pass only with a same-origin Origin or none at all).
FORM_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded"})
DEFAULT_PORTS = {"http": "80", "https": "443"}


def same_origin(origin: str, host: str) -> bool:
    """Whether ``Origin`` names the server the request was sent to (``Host``): the same host name and
    port, the scheme's default port filled in. ``null`` and anything unparsable are never the same."""
    origin, host = origin.strip().lower(), host.strip().lower()
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username is not None or parts.password is not None:
        return False
    default = DEFAULT_PORTS[parts.scheme]
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    want = f"{name}:{port if port is not None else default}"
    got = host if host.rsplit(":", 1)[-1].isdigit() and not host.endswith("]") else f"{host}:{default}"
    return bool(host) and got == want


def refusal(method: str, headers: Mapping[str, str]) -> str | None:
    """Why a request must be refused as not same-origin, or None when it may go on.

    ``headers`` maps lower-case header names to values (``host``, ``origin``, ``sec-fetch-site``,
    ``sec-fetch-mode``, ``sec-fetch-dest``, ``content-type``). The rule:

    - reads (GET, HEAD): a browser's request from another site or origin is served only as a
      navigation to a page (a link followed); its scripts, images and fetches get nothing;
    - everything else (POST, PUT, DELETE, OPTIONS preflights...): an ``Origin`` must name this very
      server (a foreign origin or ``null`` is refused), ``Sec-Fetch-Site`` when sent must be
      ``same-origin``, and a ``text/plain`` or form-encoded body is refused whatever its origin.

    A request with neither ``Origin`` nor ``Sec-Fetch-Site`` comes from a program, not a web page
    (browsers send ``Origin`` on every cross-origin request and on every POST), and goes on.
    """
    method = method.upper()
    site = headers.get("sec-fetch-site", "").strip().lower()
    if method in READ_METHODS:
        if site in ("", "same-origin", "none"):
            return None
        if headers.get("sec-fetch-mode", "").lower() == "navigate" \
                and headers.get("sec-fetch-dest", "document").lower() == "document":
            return None
        return f"a {site} request for this resource is refused: only this server's own page may fetch it"
    origin = headers.get("origin")
    if origin is not None and not same_origin(origin, headers.get("host", "")):
        shown = origin.strip()[:100] or "(empty)"
        return f"Origin {shown!r} is not this server: writes are accepted from its own page only"
    if site and site != "same-origin":
        return f"a {site} write is refused: writes are accepted from this server's own page only"
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype in FORM_TYPES:
        return f"a {ctype} body is refused: send application/json (or multipart/form-data to upload)"
    return None
