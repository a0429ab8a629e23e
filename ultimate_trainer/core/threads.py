"""CPU threads that survive a busy neighbour.

Why a trainer next to another CPU-heavy process slowed down 10-25x instead of ~2x: PyTorch runs
every operator on an OpenMP team of one thread per core, and each operator ends at a barrier that
waits for the team's slowest thread. With a neighbour on one of the two cores, the thread on that
core only runs when the scheduler gives it a time slice (milliseconds), so each of the thousands of
small operators of a step waits up to a slice; meanwhile the other threads spin at the barrier
(OpenMP's default wait policy), burning the very CPU the late thread needs. A step of ~20 k
operators x a few ms of waiting is the 19-50 s per step that was measured.

The policy, applied at trainer start before torch is imported (``apply_env_policy``) and kept up
to date while training (``ThreadGovernor`` in trainer/speed.py):

- ``OMP_WAIT_POLICY=PASSIVE`` (and ``KMP_BLOCKTIME=0`` for Intel's OpenMP): a thread that waits
  at a barrier sleeps instead of spinning, so waiting never takes CPU from the thread it waits for;
- the intra-op thread count follows the cores other processes leave free (``free_cpus``), measured
  every few seconds: alone on 2 cores, 2 threads; next to a busy neighbour, 1 thread, which then
  shares its core fairly and slows down about in proportion to the CPU it lost.

Any of ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``KMP_BLOCKTIME``, ``GOMP_SPINCOUNT`` set by the
user wins: a fixed ``OMP_NUM_THREADS`` also switches the adaptive count off.
"""

from __future__ import annotations

import os

ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def apply_env_policy(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the OpenMP wait policy unless the user chose one; returns what was set. Call before torch loads."""
    env = os.environ if environ is None else environ
    applied = {}
    for key, value in ENV_DEFAULTS.items():
        if key not in env:
            env[key] = value
            applied[key] = value
    return applied


def user_fixed_threads(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("OMP_NUM_THREADS"))


def free_cpus(busy_elsewhere: float, cpus: int) -> int:
    """Intra-op threads for the cores others leave: ``busy_elsewhere`` is other processes' load in
    cores over the last interval. Never below 1; a core more than half free counts as free."""
    return max(1, min(cpus, int(cpus - busy_elsewhere + 0.5)))
