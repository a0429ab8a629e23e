"""A stand-in for the ``pynvml`` module: this machine has no NVIDIA driver, so GPU reads are faked here
(and only here; RAM and process figures in the tests are real)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """Two GPUs; ``temps`` sets their temperatures, ``used`` their memory in bytes. ``fail_init`` mimics no driver."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, temps: tuple[int, ...] = (61, 64), used: tuple[int, ...] = (8 * 2**30, 20 * 2**30),
                 total: int = 80 * 2**30, fail_init: bool = False, power_unsupported: bool = False):
        self.temps, self.used, self.total = temps, used, total
        self.fail_init, self.power_unsupported = fail_init, power_unsupported
        self.shutdown_called = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_called = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.temps)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> Any:
        return b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.used[h], total=self.total, free=self.total - self.used[h])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=87 + h, memory=40)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return self.temps[h]

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if self.power_unsupported:
            raise FakeNVMLError("Not Supported")
        return 312_500 + h  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return 700_000
