"""The container's health check: does the stats API (started by the daemon) answer ``/api/health``?

``python deploy/healthcheck.py [--config PATH] [--set KEY=VALUE ...] [--timeout S]``

Exit 0 when it answers with a health level (``ok``, ``warning`` or ``critical``), 1 when it does not
answer, answers an error or something that is not a health report. One line says which, with the
level and its reasons: ``docker inspect`` shows it. A ``critical`` level is still healthy *as a
service*: it describes training (RAM, GPU memory, disk, a trainer error), which the page and
``/metrics`` already show and which a restart would not cure. The address is the config's
(``monitor.host``, ``monitor.stats_port``), so the check follows a changed port.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ultimate_trainer.core.config import add_arguments, config_or_none  # noqa: E402
from ultimate_trainer.core.hosts import WILDCARD  # noqa: E402

LEVELS = ("ok", "warning", "critical")


def health_url(host: str, port: int) -> str:
    """The stats API's health route as seen from this machine (a wildcard bind is reached on loopback)."""
    host = "127.0.0.1" if host in WILDCARD else host
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/api/health"


def check(url: str, timeout: float) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
    try:
        with opener.open(url, timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"{url}: not answering ({getattr(e, 'reason', e)})"
    except ValueError as e:
        return False, f"{url}: not JSON ({e})"
    level = body.get("level") if isinstance(body, dict) else None
    if level not in LEVELS:
        return False, f"{url}: no health level in the answer"
    reasons = "; ".join(str(r.get("message", r)) for r in body.get("reasons") or [] if isinstance(r, dict))
    return True, f"stats API answers: {level}" + (f" ({reasons})" if reasons else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Exit 0 when the stats API answers /api/health, else 1.")
    add_arguments(ap)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    args = ap.parse_args(argv)
    cfg = config_or_none(args)
    if cfg is None:
        return 1
    healthy, line = check(health_url(cfg.monitor.host, cfg.monitor.stats_port), args.timeout)
    print(line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
