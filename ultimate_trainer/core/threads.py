"""CPU threads that survive a busy neighbour.

Why a trainer next to another CPU-heavy process slowed down several times more than the CPU it
lost: PyTorch runs every operator on an OpenMP team of one thread per core, and each operator ends
at a barrier that waits for the team's slowest thread. With a neighbour on one of the two cores, the
thread on that core runs only when the scheduler gives it a time slice, so each of the thousands of
small operators of a step waits for it, while the other thread spins at the barrier.

The policy: the trainer's ``ThreadGovernor`` (trainer/speed.py) sets torch's intra-op thread count
every few seconds to the cores other processes leave free (``free_cpus``): alone on 2 cores, 2
threads; next to a busy neighbour, 1 thread, which then shares its core fairly. Measured with
``bench/cpu_neighbour.py`` (docs/PERFORMANCE.md): next to a one-core neighbour a step took 3.6x
as long with OpenMP's defaults, 1.9x with the governor (the CPU lost explains 2x), and the same
time alone. Passive OpenMP waits (``OMP_WAIT_POLICY=PASSIVE``) were measured too: 1.6x next to the
neighbour but 16-38 % slower alone, so they are not set.

``OMP_NUM_THREADS`` set by the user wins: a fixed count switches the adaptation off.
"""

from __future__ import annotations

import os



def user_fixed_threads(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("OMP_NUM_THREADS"))


def free_cpus(busy_elsewhere: float, cpus: int) -> int:
    """Intra-op threads for the cores others leave: ``busy_elsewhere`` is other processes' load in
    cores over the last interval. Never below 1; a core more than half free counts as free."""
    return max(1, min(cpus, int(cpus - busy_elsewhere + 0.5)))
