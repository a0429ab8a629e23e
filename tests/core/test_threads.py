"""The CPU thread policy (ultimate_trainer.core.threads): the user's settings win; threads follow free cores."""

from __future__ import annotations

from ultimate_trainer.core import threads


def test_a_users_thread_count_switches_the_adaptation_off():
    assert threads.user_fixed_threads({"OMP_NUM_THREADS": "3"}) and not threads.user_fixed_threads({})


def test_threads_follow_the_cores_others_leave_free():
    assert threads.free_cpus(0.0, 2) == 2
    assert threads.free_cpus(1.0, 2) == 1  # a busy neighbour: one thread, no waiting on a shared core
    assert threads.free_cpus(0.3, 2) == 2
    assert threads.free_cpus(5.0, 2) == 1  # never below one
    assert threads.free_cpus(2.4, 8) == 6
