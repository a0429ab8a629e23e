"""How many CUDA GPUs this process may use, without importing torch (NVML, as the stats API reads them).

The daemon asks it to know whether ``training.num_processes=auto`` means several ranks, which the
long-lived worker (one process) cannot serve.
"""

from __future__ import annotations

import os


def visible_cuda_gpus() -> int:
    """GPUs NVML sees, narrowed by ``CUDA_VISIBLE_DEVICES``; 0 without a driver."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return len([d for d in mask.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver, or NVML missing: no CUDA GPU to use
        return 0


def several_processes(num_processes: int | str) -> bool:
    """Whether ``training.num_processes`` asks for more than one training process here."""
    if num_processes == "auto":
        return visible_cuda_gpus() > 1
    return int(num_processes) > 1
