"""RAM/GPU sampling, OOM risk and overall health: what ``memory_stats_api.py`` serves.

A :class:`Sampler` thread reads psutil and NVML every ``monitor.sample_interval`` seconds, keeps the
latest sample in memory (requests are answered from it, so they cost no system calls) and writes it
to ``status/memory_status.json`` atomically, plus one line to ``history/memory.jsonl`` every
``MEMORY_HISTORY_SECONDS`` so the monitor's export can show memory over time.

The trainer's and the daemon's pids come from their status files; a process's memory is its RSS
plus that of all its children (the trainer may spawn tokenizer workers).

No torch here: the web servers import this module.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from ultimate_trainer.core import status
from ultimate_trainer.core.records import TrainingStatus
from ultimate_trainer.core.times import now_iso

log = logging.getLogger(__name__)

GIB = 1024 ** 3
MEMORY_HISTORY = "history/memory.jsonl"
MEMORY_HISTORY_SECONDS = 30.0
# Health limits that are not user settings: they describe hardware, not a workload.
GPU_MEM_WARN_PERCENT = 90.0
GPU_MEM_CRITICAL_PERCENT = 97.0
GPU_TEMP_WARN_C = 83.0
GPU_TEMP_CRITICAL_C = 90.0
SWAP_WARN_PERCENT = 50.0
LEVELS = ("ok", "warning", "critical")


@dataclass(frozen=True)
class Thresholds:
    """System RAM percentages at which the OOM risk becomes MEDIUM and HIGH (config ``monitor``)."""

    medium_percent: float = 70.0
    high_percent: float = 85.0


def oom_risk(percent: float, th: Thresholds) -> tuple[str, str]:
    """(``LOW``/``MEDIUM``/``HIGH``, one-line reason) for a system RAM use of ``percent``."""
    if percent >= th.high_percent:
        return "HIGH", f"system RAM {percent:.1f}% used, at or above the HIGH threshold {th.high_percent:g}%"
    if percent >= th.medium_percent:
        return "MEDIUM", f"system RAM {percent:.1f}% used, at or above the MEDIUM threshold {th.medium_percent:g}%"
    return "LOW", f"system RAM {percent:.1f}% used, below the MEDIUM threshold {th.medium_percent:g}%"


# --------------------------------------------------------------------------- processes

def process_tree_rss(pid: int | None) -> int | None:
    """Resident bytes of ``pid`` and all its descendants, or None when it is not running."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        children = proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for child in children:
        try:
            total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a child that exited between listing and reading
    return total


def training_pid(training: TrainingStatus | None, daemon: dict[str, Any] | None) -> int | None:
    """The live trainer's pid: ``training_status.json`` unless idle/error/dead, else the daemon's current run."""
    if training is not None and training.state not in ("idle", "error") and status.pid_alive(training.pid):
        return training.pid
    run = (daemon or {}).get("current_run")
    if isinstance(run, dict) and status.pid_alive(run.get("pid")):
        return run["pid"]
    return None


def daemon_pid(daemon: dict[str, Any] | None) -> int | None:
    pid = (daemon or {}).get("pid")
    return pid if status.pid_alive(pid) else None


# --------------------------------------------------------------------------- GPUs

class GpuReader:
    """NVML through ``nvidia-ml-py``. Without a driver every read returns ``(False, reason, [])``.

    ``nvml`` is the ``pynvml`` module; tests pass a stand-in because this machine has no GPU.
    """

    def __init__(self, nvml: Any = None):
        self._nvml = nvml
        self._ready = False
        self.reason: str | None = None
        try:
            if self._nvml is None:
                import pynvml  # nvidia-ml-py
                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._ready = True
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU, not a failure
            self.reason = f"no NVIDIA driver ({e})" if str(e) else "no NVIDIA driver"
            log.info("GPU stats unavailable: %s", self.reason)

    def read(self) -> tuple[bool, str | None, list[dict[str, Any]]]:
        if not self._ready:
            return False, self.reason, []
        n = self._nvml
        try:
            count = n.nvmlDeviceGetCount()
        except Exception as e:
            return False, f"NVML error: {e}", []
        gpus = []
        for i in range(count):
            gpus.append(self._device(i))
        return True, None, gpus

    def _device(self, index: int) -> dict[str, Any]:
        n = self._nvml
        gpu: dict[str, Any] = {"index": index, "name": None, "memory_used_gb": None, "memory_total_gb": None,
                               "memory_percent": None, "utilization_percent": None, "temperature_c": None,
                               "power_w": None, "power_limit_w": None}
        try:
            h = n.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:
            gpu["error"] = str(e)
            return gpu

        def get(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception:  # NotSupported on some boards: leave the figure null
                return None

        name = get(lambda: n.nvmlDeviceGetName(h))
        gpu["name"] = name.decode() if isinstance(name, bytes) else name
        mem = get(lambda: n.nvmlDeviceGetMemoryInfo(h))
        if mem is not None:
            gpu["memory_used_gb"] = round(mem.used / GIB, 3)
            gpu["memory_total_gb"] = round(mem.total / GIB, 3)
            gpu["memory_percent"] = round(100.0 * mem.used / mem.total, 1) if mem.total else None
        util = get(lambda: n.nvmlDeviceGetUtilizationRates(h))
        gpu["utilization_percent"] = util.gpu if util is not None else None
        gpu["temperature_c"] = get(lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
        power = get(lambda: n.nvmlDeviceGetPowerUsage(h))  # milliwatts
        gpu["power_w"] = round(power / 1000.0, 1) if power is not None else None
        limit = get(lambda: n.nvmlDeviceGetEnforcedPowerLimit(h))
        gpu["power_limit_w"] = round(limit / 1000.0, 1) if limit is not None else None
        return gpu

    def close(self) -> None:
        if self._ready:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._ready = False


# --------------------------------------------------------------------------- one sample

def _gb(n: int | float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def take_sample(status_dir: str | Path, th: Thresholds, gpu: GpuReader) -> dict[str, Any]:
    """The ``/api/memory_stats`` payload (see docs/STATUS.md, ``memory_status.json``)."""
    sd = Path(status_dir)
    training = TrainingStatus.read(sd / status.TRAINING_STATUS)
    daemon = status.read_json(sd / status.DAEMON_STATUS)
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    tpid, dpid = training_pid(training, daemon), daemon_pid(daemon)
    level, reason = oom_risk(vm.percent, th)
    gpu_ok, gpu_reason, gpus = gpu.read()
    sample = {
        "total_gb": _gb(vm.total),
        "used_gb": _gb(vm.total - vm.available),
        "available_gb": _gb(vm.available),
        "percent": round(vm.percent, 1),
        "swap_used_gb": _gb(sw.used),
        "swap_percent": round(sw.percent, 1),
        "training_pid": tpid,
        "training_process_gb": _gb(process_tree_rss(tpid)),
        "daemon_pid": dpid,
        "daemon_process_gb": _gb(process_tree_rss(dpid)),
        "oom_risk": level,
        "oom_reason": reason,
        "oom_thresholds": {"medium_percent": th.medium_percent, "high_percent": th.high_percent},
        "gpu_available": gpu_ok,
        "gpu_reason": gpu_reason,
        "gpus": gpus,
        "sampled_at": now_iso(),
    }
    sample["health"] = health(sample, training, daemon)
    return sample


# --------------------------------------------------------------------------- health

def _reason(level: str, source: str, message: str) -> dict[str, str]:
    return {"level": level, "source": source, "message": message}


def health(memory: dict[str, Any] | None, training: TrainingStatus | None = None,
           daemon: dict[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
    """One overall level (``ok``/``warning``/``critical``) and its reasons: RAM first, then by severity.

    Pure: every input is a status file's content (or None when the file is not written yet).
    """
    ram: list[dict[str, str]] = []
    other: list[dict[str, str]] = []
    if memory:
        risk = memory.get("oom_risk")
        if risk == "HIGH":
            ram.append(_reason("critical", "ram", f"OOM risk HIGH: {memory.get('oom_reason')}"))
        elif risk == "MEDIUM":
            ram.append(_reason("warning", "ram", f"OOM risk MEDIUM: {memory.get('oom_reason')}"))
        swap = memory.get("swap_percent")
        if isinstance(swap, (int, float)) and swap >= SWAP_WARN_PERCENT:
            ram.append(_reason("warning", "ram", f"swap {swap:.0f}% used: the machine is paging"))
        for g in memory.get("gpus") or []:
            label = f"GPU {g.get('index')} ({g.get('name') or 'unknown'})"
            mp, temp = g.get("memory_percent"), g.get("temperature_c")
            if isinstance(mp, (int, float)) and mp >= GPU_MEM_WARN_PERCENT:
                lvl = "critical" if mp >= GPU_MEM_CRITICAL_PERCENT else "warning"
                other.append(_reason(lvl, "gpu", f"{label} memory {mp:.0f}% used"))
            if isinstance(temp, (int, float)) and temp >= GPU_TEMP_WARN_C:
                lvl = "critical" if temp >= GPU_TEMP_CRITICAL_C else "warning"
                other.append(_reason(lvl, "gpu", f"{label} at {temp:.0f} °C"))
    if training is not None and training.given != frozenset():  # an empty object says nothing yet
        state = None if "state" in training.missing else training.state
        if state == "error":
            other.append(_reason("critical", "trainer", f"trainer error: {training.error or 'unknown'}"))
        elif state not in (None, "idle") and not status.pid_alive(training.pid):
            other.append(_reason("warning", "trainer", f"trainer stopped while {state} (pid {training.pid} gone)"))
        ret = training.retention or {}
        if ret.get("forgetting") and isinstance(ret.get("ratio"), (int, float)):
            other.append(_reason("warning", "retention", f"forgetting: the probe keeps {ret['ratio']:.1%} of the "
                                 f"base's score (warns under {ret.get('warn_below', 0.95):.0%})"))
    if daemon:
        disk = daemon.get("disk") or {}
        if disk.get("level") in ("warning", "critical"):
            other.append(_reason(disk["level"], "disk", f"disk: {disk.get('free_gb')} GB free"))
        dstate = daemon.get("state")
        if dstate == "error":
            other.append(_reason("critical", "daemon", f"daemon error: {daemon.get('last_error') or 'unknown'}"))
        elif dstate in ("paused_disk", "backoff"):
            other.append(_reason("warning", "daemon", f"daemon {dstate.replace('_', ' ')}"
                                 + (f": {daemon['last_error']}" if daemon.get("last_error") else "")))
    other.sort(key=lambda r: -LEVELS.index(r["level"]))
    reasons = ram + other
    level = max((r["level"] for r in reasons), key=LEVELS.index, default="ok")
    return {"level": level, "reasons": reasons}


# --------------------------------------------------------------------------- the sampler thread

class Sampler:
    """Samples every ``interval`` seconds in a daemon thread; :meth:`latest` never blocks on I/O."""

    def __init__(self, status_dir: str | Path, thresholds: Thresholds, interval: float = 1.0,
                 gpu: GpuReader | None = None, write: bool = True):
        self.status_dir = Path(status_dir)
        self.thresholds = thresholds
        self.interval = interval
        self._gpu = gpu
        self.write = write
        self._latest: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_history = 0.0

    @property
    def gpu(self) -> GpuReader:
        if self._gpu is None:  # NVML is opened on first use, not when the sampler is built
            self._gpu = GpuReader()
        return self._gpu

    def sample_once(self) -> dict[str, Any]:
        sample = take_sample(self.status_dir, self.thresholds, self.gpu)
        with self._lock:
            self._latest = sample
        if self.write:
            self._write(sample)
        return sample

    def _write(self, sample: dict[str, Any]) -> None:
        # A full disk or a read-only status dir must not stop the sampler: the API still answers.
        try:
            doc = {"schema_version": status.SCHEMA_VERSION, "updated_at": sample["sampled_at"], **sample}
            status.atomic_write_json(self.status_dir / status.MEMORY_STATUS, doc)
            now = time.monotonic()
            if now - self._last_history >= MEMORY_HISTORY_SECONDS:
                self._last_history = now
                status.append_jsonl(self.status_dir / MEMORY_HISTORY, {
                    "time": sample["sampled_at"], "percent": sample["percent"], "used_gb": sample["used_gb"],
                    "training_process_gb": sample["training_process_gb"], "oom_risk": sample["oom_risk"],
                    "gpu_memory_used_gb": sum(g.get("memory_used_gb") or 0 for g in sample["gpus"]) or None,
                })
        except OSError as e:
            log.warning("%s: cannot write (%s)", self.status_dir / status.MEMORY_STATUS, e)

    def latest(self) -> dict[str, Any]:
        with self._lock:
            latest = self._latest
        return latest if latest is not None else self.sample_once()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample_once()
            except Exception:  # one bad sample must not end the thread the API depends on
                log.exception("sampling failed")

    def start(self) -> "Sampler":
        """Take the first sample now (so the server never answers before one exists), then sample in a thread."""
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="stats-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._gpu is not None:
            self._gpu.close()
