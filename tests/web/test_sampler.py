"""ultimate_trainer.web.sampler: OOM thresholds, process-tree memory, GPU reading, health ordering, the sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from _stats_helpers import FakeNVML
from _web_helpers import FIXTURE_STATUS  # noqa: F401  (puts the repository root on sys.path)
from ultimate_trainer.web import sampler as stats
from ultimate_trainer.core import status
from ultimate_trainer.core.records import TrainingStatus

TH = stats.Thresholds(70.0, 85.0)


@pytest.mark.parametrize("percent, level", [(0.0, "LOW"), (69.9, "LOW"), (70.0, "MEDIUM"), (84.9, "MEDIUM"),
                                            (85.0, "HIGH"), (100.0, "HIGH")])
def test_oom_risk_uses_the_configured_thresholds(percent, level):
    got, reason = stats.oom_risk(percent, TH)
    assert got == level
    assert f"{percent:.1f}%" in reason


def test_oom_risk_with_other_thresholds():
    th = stats.Thresholds(50.0, 60.0)
    assert stats.oom_risk(55.0, th)[0] == "MEDIUM"
    assert stats.oom_risk(65.0, th)[0] == "HIGH"
    assert stats.oom_risk(65.0, TH)[0] == "LOW"


def test_process_tree_rss_counts_children():
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * (200 * 2**20); print('ready', flush=True);"
                              " sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        own = psutil.Process().memory_info().rss
        tree = stats.process_tree_rss(os.getpid())
        assert tree is not None and tree - own >= 150 * 2**20
    finally:
        child.stdin.close()
        child.wait(timeout=10)


def test_process_tree_rss_of_no_process_is_none():
    assert stats.process_tree_rss(None) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert stats.process_tree_rss(dead.pid) is None


def ts(**fields):
    return TrainingStatus.from_json(fields)


def test_training_pid_only_for_a_live_working_trainer():
    me = os.getpid()
    assert stats.training_pid(ts(state="training", pid=me), None) == me
    assert stats.training_pid(ts(state="idle", pid=me), None) is None
    assert stats.training_pid(ts(state="error", pid=me), None) is None
    # A trainer that died without updating its file: the daemon's current run is asked instead.
    assert stats.training_pid(ts(state="training", pid=2**22 + 12345), {"current_run": {"pid": me}}) == me
    assert stats.training_pid(None, {"current_run": None}) is None


def test_gpu_reader_without_driver_reports_unavailable():
    r = stats.GpuReader(FakeNVML(fail_init=True))
    ok, reason, gpus = r.read()
    assert ok is False and gpus == [] and "NVML Shared Library Not Found" in reason


def test_gpu_reader_converts_units_and_tolerates_unsupported_fields():
    fake = FakeNVML(power_unsupported=True)
    r = stats.GpuReader(fake)
    ok, reason, gpus = r.read()
    assert ok and reason is None and len(gpus) == 2
    g = gpus[0]
    assert g["name"] == "NVIDIA H100 80GB HBM3"  # bytes from old drivers are decoded
    assert g["memory_used_gb"] == 8.0 and g["memory_total_gb"] == 80.0 and g["memory_percent"] == 10.0
    assert g["utilization_percent"] == 87 and g["temperature_c"] == 61
    assert g["power_w"] is None and g["power_limit_w"] == 700.0
    r.close()
    assert fake.shutdown_called


def test_health_puts_ram_first_even_when_other_problems_are_worse():
    memory = {"oom_risk": "MEDIUM", "oom_reason": "system RAM 75.0% used", "swap_percent": 0.0,
              "gpus": [{"index": 0, "name": "H100", "memory_percent": 50.0, "temperature_c": 95}]}
    daemon = {"disk": {"level": "warning", "free_gb": 12.0}}
    h = stats.health(memory, None, daemon)
    assert h["level"] == "critical"
    assert [r["source"] for r in h["reasons"]] == ["ram", "gpu", "disk"]
    assert [r["level"] for r in h["reasons"]] == ["warning", "critical", "warning"]


def test_health_levels():
    assert stats.health(None) == {"level": "ok", "reasons": []}
    assert stats.health({"oom_risk": "LOW", "gpus": []})["level"] == "ok"
    high = stats.health({"oom_risk": "HIGH", "oom_reason": "x", "gpus": []})
    assert high["level"] == "critical" and high["reasons"][0]["source"] == "ram"
    err = stats.health(None, ts(state="error", error="CUDA out of memory", pid=os.getpid()))
    assert err["level"] == "critical" and "CUDA out of memory" in err["reasons"][0]["message"]
    stale = stats.health(None, ts(state="training", pid=2**22 + 12345))
    assert stale["level"] == "warning" and stale["reasons"][0]["source"] == "trainer"


def test_sampler_writes_memory_status_and_history(tmp_path):
    sd = tmp_path / "status"
    status.atomic_write_json(sd / status.TRAINING_STATUS, {"state": "training", "pid": os.getpid()})
    s = stats.Sampler(sd, TH, interval=0.1, gpu=stats.GpuReader(FakeNVML()))
    sample = s.sample_once()
    doc = json.loads((sd / status.MEMORY_STATUS).read_text())
    assert doc["schema_version"] == 1 and doc["updated_at"] == sample["sampled_at"]
    assert doc["training_pid"] == os.getpid() and doc["training_process_gb"] > 0
    assert doc["gpu_available"] is True and len(doc["gpus"]) == 2
    assert doc["health"]["level"] in stats.LEVELS
    hist = status.tail_jsonl(sd / stats.MEMORY_HISTORY, 10)
    assert len(hist) == 1 and hist[0]["percent"] == sample["percent"]
    s.sample_once()  # within MEMORY_HISTORY_SECONDS: no second history line
    assert len(status.tail_jsonl(sd / stats.MEMORY_HISTORY, 10)) == 1
    assert s.latest() is not sample


def test_sampler_survives_an_unwritable_status_dir(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the status folder should be")
    s = stats.Sampler(blocker, TH, gpu=stats.GpuReader(FakeNVML(fail_init=True)))
    sample = s.sample_once()  # the write fails (logged); the sample is still served
    assert sample["total_gb"] > 0 and s.latest() is sample


def test_sampler_thread_keeps_the_latest_sample(tmp_path):
    s = stats.Sampler(tmp_path, TH, interval=0.05, gpu=stats.GpuReader(FakeNVML(fail_init=True))).start()
    try:
        first = s.latest()
        assert (tmp_path / status.MEMORY_STATUS).exists()
        assert first["oom_risk"] in ("LOW", "MEDIUM", "HIGH")
    finally:
        s.stop()
    assert not s._thread.is_alive()
