"""The CPU thread policy (ultimate_trainer.core.threads): the user's settings win; threads follow free cores."""

from __future__ import annotations

from ultimate_trainer.core import threads


def test_env_policy_sets_passive_waiting_unless_the_user_chose():
    env: dict[str, str] = {"KMP_BLOCKTIME": "200"}
    applied = threads.apply_env_policy(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and applied == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env["KMP_BLOCKTIME"] == "200"  # the user's value stays
    assert threads.user_fixed_threads({"OMP_NUM_THREADS": "3"}) and not threads.user_fixed_threads({})


def test_threads_follow_the_cores_others_leave_free():
    assert threads.free_cpus(0.0, 2) == 2
    assert threads.free_cpus(1.0, 2) == 1  # a busy neighbour: one thread, no waiting on a shared core
    assert threads.free_cpus(0.3, 2) == 2
    assert threads.free_cpus(5.0, 2) == 1  # never below one
    assert threads.free_cpus(2.4, 8) == 6
