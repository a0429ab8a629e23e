"""The stats API (port 8081) through Flask's test client, plus its entry script."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _stats_helpers import FakeNVML
from _web_helpers import FIXTURE_STATUS  # noqa: F401  (puts the repository root on sys.path)
from conftest import REPO
from ultimate_trainer.web import sampler as stats
from ultimate_trainer.core import status
from ultimate_trainer.web import stats_api

FIELDS = ["total_gb", "used_gb", "available_gb", "percent", "swap_used_gb", "training_process_gb",
          "daemon_process_gb", "oom_risk", "oom_reason", "gpu_available", "gpus"]
GPU_FIELDS = ["name", "memory_used_gb", "memory_total_gb", "utilization_percent", "temperature_c", "power_w"]


def client(tmp_path, th=stats.Thresholds(), nvml=None):
    sampler = stats.Sampler(tmp_path, th, gpu=stats.GpuReader(nvml or FakeNVML(fail_init=True)))
    return stats_api.create_app(sampler).test_client()


def test_memory_stats_schema_without_gpu(tmp_path):
    status.atomic_write_json(tmp_path / status.TRAINING_STATUS, {"state": "training", "pid": os.getpid()})
    status.atomic_write_json(tmp_path / status.DAEMON_STATUS, {"state": "training", "pid": os.getppid()})
    r = client(tmp_path).get("/api/memory_stats")
    assert r.status_code == 200 and r.mimetype == "application/json"
    d = r.get_json()
    assert all(k in d for k in FIELDS)
    assert d["gpu_available"] is False and d["gpus"] == []
    assert 0 < d["used_gb"] < d["total_gb"] and 0 <= d["percent"] <= 100
    assert d["training_process_gb"] > 0 and d["daemon_process_gb"] > 0
    assert d["oom_risk"] in ("LOW", "MEDIUM", "HIGH")


def test_memory_stats_schema_with_gpu(tmp_path):
    d = client(tmp_path, nvml=FakeNVML()).get("/api/memory_stats").get_json()
    assert d["gpu_available"] is True and len(d["gpus"]) == 2
    for g in d["gpus"]:
        assert all(g[k] is not None for k in GPU_FIELDS)
    assert d["gpus"][1]["memory_used_gb"] == 20.0 and d["gpus"][1]["power_w"] == 312.5


def test_processes_absent_are_null(tmp_path):
    d = client(tmp_path).get("/api/memory_stats").get_json()
    assert d["training_process_gb"] is None and d["daemon_process_gb"] is None


@pytest.mark.parametrize("th, level", [(stats.Thresholds(0.001, 0.002), "HIGH"),
                                       (stats.Thresholds(0.001, 99.999), "MEDIUM"),
                                       (stats.Thresholds(99.998, 99.999), "LOW")])
def test_oom_thresholds_are_applied_to_real_ram(tmp_path, th, level):
    d = client(tmp_path, th).get("/api/memory_stats").get_json()
    assert d["oom_risk"] == level


def test_health_orders_ram_before_a_worse_gpu_problem(tmp_path):
    c = client(tmp_path, stats.Thresholds(0.001, 99.999), FakeNVML(temps=(95, 60)))
    h = c.get("/api/health").get_json()
    assert h["level"] == "critical"
    assert h["reasons"][0]["source"] == "ram" and h["reasons"][0]["level"] == "warning"
    assert h["reasons"][1]["source"] == "gpu" and h["reasons"][1]["level"] == "critical"


def test_health_ok_when_nothing_is_wrong(tmp_path):
    assert client(tmp_path, stats.Thresholds(99.998, 99.999)).get("/api/health").get_json() == \
        {"level": "ok", "reasons": []}


def test_metrics_parse_as_prometheus_text(tmp_path):
    r = client(tmp_path, nvml=FakeNVML()).get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}
    assert fams["ut_memory_used_percent"].samples[0].value > 0
    assert fams["ut_memory_total_bytes"].samples[0].value > 2**30
    temps = fams["ut_gpu_temperature_celsius"].samples
    assert [(s.labels["gpu"], s.value) for s in temps] == [("0", 61.0), ("1", 64.0)]
    assert fams["ut_gpu_available"].samples[0].value == 1.0


def test_unknown_route_is_json_404(tmp_path):
    r = client(tmp_path).get("/nope")
    assert r.status_code == 404 and r.mimetype == "application/json" and r.get_json()["status"] == 404


def test_foreign_host_header_is_refused_and_writes_are_not_allowed(tmp_path):
    c = client(tmp_path)
    assert c.get("/api/health", headers={"Host": "attacker.example:8081"}).status_code == 403
    assert c.get("/api/health", headers={"Host": "127.0.0.1:8081"}).status_code == 200
    assert c.get("/api/health", headers={"Host": "[::1]:8081"}).status_code == 200
    assert c.post("/api/health").status_code == 405
    r = c.get("/api/health")
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("script", ["memory_stats_api.py", "monitor_server.py"])
def test_address_in_use_is_one_line_naming_port(tmp_path, script):
    busy = _busy_port()
    try:
        r = subprocess.run([sys.executable, str(REPO / script), "--config", str(REPO / "config.json"),
                            "--port", str(busy.getsockname()[1]), "--status-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        busy.close()
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "already in use" in lines[0] and "--port" in lines[0], r.stderr


def test_stats_server_samples_to_file_and_stops_cleanly_on_sigterm(tmp_path):
    import http.client
    import signal
    import time

    port = _busy_port()
    port_no = port.getsockname()[1]
    port.close()
    proc = subprocess.Popen([sys.executable, str(REPO / "memory_stats_api.py"), "--config", str(REPO / "config.json"),
                             "--port", str(port_no), "--status-dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        answer = None
        for _ in range(200):  # until the server listens (bounded, not a timing assertion)
            try:
                c = http.client.HTTPConnection("127.0.0.1", port_no, timeout=5)
                c.request("GET", "/api/memory_stats")
                r = c.getresponse()
                answer = (r.status, r.getheader("Content-Type"), r.read())
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        assert answer is not None and answer[0] == 200 and answer[1] == "application/json", proc.stderr
        assert status.read_json(tmp_path / status.MEMORY_STATUS)["schema_version"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_web_modules_do_not_import_torch():
    code = ("import sys; import ultimate_trainer.web.sampler, ultimate_trainer.web.monitor, ultimate_trainer.web.stats_api; "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0
