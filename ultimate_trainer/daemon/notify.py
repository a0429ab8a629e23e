"""Notifications: the daemon tells the user what happened while nobody watched, through ``apprise``.

``notify.urls`` lists apprise URLs (Slack, Discord, Telegram, ntfy, e-mail, Matrix, a JSON webhook
``json://host/path``...). Events are read from the status files, the contract every process
writes (docs/STATUS.md): each time the daemon writes its own status, ``Notifier.observe`` compares
the daemon's, the trainer's and the stats API's latest files with what it saw before:

==========================  =================================================================
event                       when
==========================  =================================================================
``run_done``                ``daemon_status.json`` ``done_files`` grew
``file_failed``             ``failed_files`` grew (names and reasons of the new ones)
``anomaly``                 ``training_status.json`` ``stability.anomalies`` grew
``accuracy_regressing``     ``accuracy.trend`` became ``regressing``
``retention_falling``       ``retention.trend`` became ``falling`` (when the status has one)
``oom_high``                ``memory_status.json`` ``oom_risk`` became ``HIGH``
``disk_critical``           ``disk.level`` became ``critical``
``consolidation_adopted``   a consolidation was added to ``consolidation.history``
``consolidation_refused``   ``consolidation.last_refused`` changed (when the status has one)
``trainer_error``           the trainer's ``state`` became ``error`` (its ``error`` says why)
``daemon_error``            the daemon's ``state`` became ``error``
==========================  =================================================================

The first observation only records the starting point: a restart does not repeat old news. Each
event kind is sent at most once per ``notify.min_interval_seconds``; what is held back is counted
and mentioned in the next message of that kind; when the daemon exits (``--once`` included) the
newest held-back message of each kind is sent before it goes, so nothing it knew is lost. Delivery runs on one background thread: ``observe``
never waits for the network, and a notification that cannot be delivered is logged, never raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from ultimate_trainer.core.config import NOTIFY_EVENTS

log = logging.getLogger(__name__)

EVENTS = NOTIFY_EVENTS
QUEUE_LIMIT = 100  # a network outage must not grow memory: older messages are dropped first
TITLE = "Ultimate Trainer"


def _get(d: Any, *path: str) -> Any:
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else 0.0


def events_between(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str]]:
    """``(event, message)`` for what changed from ``old`` to ``new`` (each: ``daemon``, ``training``, ``memory``)."""
    out: list[tuple[str, str]] = []
    od, nd = old.get("daemon") or {}, new.get("daemon") or {}
    ot, nt = old.get("training") or {}, new.get("training") or {}
    om, nm = old.get("memory") or {}, new.get("memory") or {}

    grown = int(_num(nd.get("done_files")) - _num(od.get("done_files")))
    if nd and grown > 0:
        done = [r for r in (nd.get("recent_done") or [])[-grown:] if isinstance(r, dict)]
        names, step = [r.get("name") for r in done], done[-1].get("global_step") if done else None
        out.append(("run_done", f"{grown} file(s) trained: {', '.join(map(str, names))} (global step {step})"))
    grown = int(_num(nd.get("failed_files")) - _num(od.get("failed_files")))
    if nd and grown > 0:
        failed = [f for f in (nd.get("failed") or [])[-grown:] if isinstance(f, dict)]
        out.append(("file_failed", "; ".join(f"{f.get('name')}: {f.get('reason')}" for f in failed)
                    or f"{grown} file(s) failed"))
    if nd.get("state") == "error" and od.get("state") != "error":
        out.append(("daemon_error", f"the daemon stopped with an error: {nd.get('last_error') or 'see its log'}"))
    if _get(nd, "disk", "level") == "critical" and _get(od, "disk", "level") != "critical":
        out.append(("disk_critical", f"free disk {_get(nd, 'disk', 'free_gb')} GB is critical: training paused"))
    old_hist, new_hist = _get(od, "consolidation", "history") or [], _get(nd, "consolidation", "history") or []
    if nd and len(new_hist) > len(old_hist) and isinstance(new_hist[-1], dict):
        out.append(("consolidation_adopted", f"consolidated model adopted: {new_hist[-1].get('path')} "
                                             f"(global step {new_hist[-1].get('global_step')})"))
    refused = _get(nd, "consolidation", "last_refused")
    if refused and refused != _get(od, "consolidation", "last_refused"):
        why = refused.get("reason") if isinstance(refused, dict) else refused
        out.append(("consolidation_refused", f"consolidation refused, training goes on with the current base: {why}"))

    grown = int(_num(_get(nt, "stability", "anomalies")) - _num(_get(ot, "stability", "anomalies")))
    if nt and grown > 0:
        last = _get(nt, "stability", "last_anomaly") or {}
        out.append(("anomaly", f"{grown} anomalous step(s) skipped; last: {last.get('kind')} at step "
                               f"{last.get('global_step')} in {', '.join(last.get('files') or []) or '?'}"))
    if _get(nt, "accuracy", "trend") == "regressing" and _get(ot, "accuracy", "trend") != "regressing":
        out.append(("accuracy_regressing", f"held-out accuracy is regressing: last 50 {_get(nt, 'accuracy', 'last_50')}%"
                                           f" against {_get(nt, 'accuracy', 'overall')}% overall"))
    if _get(nt, "retention", "trend") == "falling" and _get(ot, "retention", "trend") != "falling":
        out.append(("retention_falling", f"base-knowledge retention is falling: {_get(nt, 'retention', 'ratio')} of the "
                                         f"base's probe score at step {_get(nt, 'retention', 'global_step')}"))
    if nt.get("state") == "error" and (ot.get("state") != "error" or nt.get("error") != ot.get("error")):
        out.append(("trainer_error", f"the trainer stopped with an error: {nt.get('error')}"))

    if nm.get("oom_risk") == "HIGH" and om.get("oom_risk") != "HIGH":
        out.append(("oom_high", f"OOM risk HIGH: {nm.get('oom_reason') or ''}".strip()))
    return out


def apprise_sender(urls: list[str], timeout: float) -> Callable[[str, str], bool]:
    """Send through apprise to every URL; True when all of them took the message."""
    import apprise

    asset = apprise.AppriseAsset(app_id="UltimateTrainer", app_desc=TITLE)
    ap = apprise.Apprise(asset=asset)
    for url in urls:
        if not ap.add(url):
            log.error("notify.urls: apprise does not understand %r; it is left out", url.split("://")[0] + "://...")
    for server in ap:  # a dead endpoint must not hold the worker for minutes
        server.socket_connect_timeout = server.socket_read_timeout = timeout

    def send(title: str, body: str) -> bool:
        return bool(ap.notify(title=title, body=body))

    return send


class Notifier:
    """Turns status changes into rate-limited messages, delivered by a background thread."""

    def __init__(self, urls: list[str], min_interval: float, events: list[str] | None = None,
                 timeout: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 send: Callable[[str, str], bool] | None = None):
        self.enabled = bool(urls)
        self.events = set(events if events is not None else EVENTS)
        self.min_interval, self.clock = min_interval, clock
        self._send = send if send is not None or not urls else apprise_sender(urls, timeout)
        self._last: dict[str, dict[str, Any]] | None = None
        self._sent_at: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._held_last: dict[str, str] = {}  # the newest message held back per kind, sent at close if no other is
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0

    def observe(self, daemon: dict | None, training: dict | None, memory: dict | None) -> None:
        """Compare the newest status files with the last ones seen; queue a message per new event."""
        if not self.enabled:
            return
        now = {"daemon": daemon or {}, "training": training or {}, "memory": memory or {}}
        before, self._last = self._last, now
        if before is None:
            return
        try:
            found = events_between(before, now)
        except Exception:  # a status file of an unexpected shape must not stop the daemon
            log.exception("notify: cannot compare the status files")
            return
        for event, message in found:
            self.notify(event, message)

    def notify(self, event: str, message: str) -> None:
        if not self.enabled or event not in self.events:
            return
        now = self.clock()
        if now - self._sent_at.get(event, -1e18) < self.min_interval:
            self._held[event] = self._held.get(event, 0) + 1
            self._held_last[event] = message
            return
        self._sent_at[event] = now
        held = self._held.pop(event, 0)
        self._held_last.pop(event, None)
        if held:
            message += f" (+{held} more since the last {event} message)"
        self._put((f"{TITLE}: {event.replace('_', ' ')}", message))

    def _put(self, item: tuple[str, str]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="notify", daemon=True)
            self._thread.start()
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # drop the oldest
                except queue.Empty:
                    pass

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            title, body = item
            try:
                ok = self._send(title, body)
            except Exception as e:  # the library or the network: log, never raise
                ok = False
                log.warning("notify: %s: %s", title, e)
            if ok:
                self.delivered += 1
            else:
                self.failed += 1
                log.warning("notify: could not deliver %r", title)

    def flush_held(self) -> None:
        """Queue the newest held-back message of each kind (the rate limit has no later message to ride on)."""
        for event, message in list(self._held_last.items()):
            more = self._held.pop(event, 1) - 1
            self._held_last.pop(event)
            if more:
                message += f" (+{more} more since the last {event} message)"
            self._put((f"{TITLE}: {event.replace('_', ' ')}", message))

    def close(self, timeout: float = 15.0) -> None:
        """Send what the rate limit held back, deliver what is queued (waiting at most ``timeout`` seconds),
        then stop the thread."""
        if self.enabled:
            self.flush_held()
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
