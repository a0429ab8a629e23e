"""The memory/GPU stats API (port 8081), answered from the sampler's latest sample.

Routes:

- ``GET /api/memory_stats``  RAM, swap, trainer and daemon RSS, OOM risk, GPUs (docs/MONITORING.md)
- ``GET /api/health``        ``{"level": "ok|warning|critical", "reasons": [...]}``, RAM reasons first
- ``GET /metrics``           the same figures in Prometheus text format, plus the training metrics
                             read from the status files (``web/training_metrics.py``)
- anything else              JSON 404
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

from flask import Flask, Response, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ultimate_trainer.web import sampler as stats
from ultimate_trainer.web import common
from ultimate_trainer.web.training_metrics import TrainingCollector
from ultimate_trainer.core import wsgi
from ultimate_trainer.core.logs import setup_logging

log = logging.getLogger(__name__)

OOM_LEVELS = {"LOW": 0, "MEDIUM": 1, "HIGH": 2}


class _SampleCollector:
    """Turns the latest sample into gauges at scrape time (no second copy of the figures to keep in sync)."""

    def __init__(self, sampler: stats.Sampler):
        self.sampler = sampler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.sampler.latest()

        def gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily | None:
            return GaugeMetricFamily(name, doc, value=value) if isinstance(value, (int, float)) else None

        singles = [
            gauge("ut_memory_total_bytes", "System RAM.", _bytes(s["total_gb"])),
            gauge("ut_memory_used_bytes", "System RAM in use (total - available).", _bytes(s["used_gb"])),
            gauge("ut_memory_available_bytes", "System RAM available.", _bytes(s["available_gb"])),
            gauge("ut_memory_used_percent", "System RAM in use, percent.", s["percent"]),
            gauge("ut_swap_used_bytes", "Swap in use.", _bytes(s["swap_used_gb"])),
            gauge("ut_training_process_bytes", "Trainer RSS including children.", _bytes(s["training_process_gb"])),
            gauge("ut_daemon_process_bytes", "Daemon RSS including children.", _bytes(s["daemon_process_gb"])),
            gauge("ut_oom_risk", "OOM risk: 0 LOW, 1 MEDIUM, 2 HIGH.", OOM_LEVELS.get(s["oom_risk"])),
            gauge("ut_gpu_available", "1 when NVML answered.", int(bool(s["gpu_available"]))),
            gauge("ut_health_level", "Overall health: 0 ok, 1 warning, 2 critical.",
                  stats.LEVELS.index(s["health"]["level"])),
        ]
        yield from (g for g in singles if g is not None)
        per_gpu = {
            "memory_used_gb": ("ut_gpu_memory_used_bytes", "GPU memory in use.", _bytes),
            "memory_total_gb": ("ut_gpu_memory_total_bytes", "GPU memory.", _bytes),
            "utilization_percent": ("ut_gpu_utilization_percent", "GPU utilization.", None),
            "temperature_c": ("ut_gpu_temperature_celsius", "GPU temperature.", None),
            "power_w": ("ut_gpu_power_watts", "GPU power draw.", None),
        }
        for key, (name, doc, conv) in per_gpu.items():
            fam = GaugeMetricFamily(name, doc, labels=["gpu", "name"])
            for g in s["gpus"]:
                v = g.get(key)
                if isinstance(v, (int, float)):
                    fam.add_metric([str(g.get("index")), str(g.get("name") or "")], conv(v) if conv else v)
            yield fam


def _bytes(gb: float | None) -> float | None:
    return None if gb is None else gb * stats.GIB


def create_app(sampler: stats.Sampler, bind_host: str = "127.0.0.1", extra_hosts: list[str] | None = None) -> Flask:
    """The stats app over a (started or not) sampler; without a running thread each request samples."""
    app = Flask(__name__)
    app.json.sort_keys = False  # keep the documented field order
    common.secure(app, bind_host, extra_hosts)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SampleCollector(sampler))  # type: ignore[arg-type]
    registry.register(TrainingCollector(sampler.status_dir))  # type: ignore[arg-type]

    @app.get("/api/memory_stats")
    def memory_stats() -> Response:
        s = dict(sampler.latest())
        s.pop("health", None)
        return jsonify(s)

    @app.get("/api/health")
    def health() -> Response:
        return jsonify(sampler.latest()["health"])

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.get("/")
    def index() -> Response:
        return jsonify({"endpoints": ["/api/memory_stats", "/api/health", "/metrics"]})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = common.build_parser("Memory/GPU stats API (JSON and Prometheus) over the status files.", "stats_port")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    resolved = common.settings(args, "stats_port")
    if resolved is None:
        return 2
    cfg, host, port, status_dir = resolved
    th = stats.Thresholds(cfg.monitor.oom_medium_percent, cfg.monitor.oom_high_percent)
    sampler = stats.Sampler(Path(status_dir), th, cfg.monitor.sample_interval)
    # Bind first: a port in use is reported before NVML or the sampler thread start.
    server = wsgi.bind(create_app(sampler, host, args.allow_host), host, port, "memory_stats_api")
    if server is None:
        return 1
    sampler.start()
    try:
        return wsgi.run(server, "memory_stats_api")
    finally:
        sampler.stop()
