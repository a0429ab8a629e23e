"""The decisions of trainer/distributed.py that need no second process: step size, optimizer state, exit codes."""

from __future__ import annotations

import pytest

from ultimate_trainer.core import config
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.records import CheckpointMarker
from ultimate_trainer.trainer import distributed as d


def test_accumulation_is_shared_by_the_ranks_when_it_divides():
    assert d.accumulation(4, 1) == (4, 1)
    assert d.accumulation(4, 2) == (2, 1)  # a step still means batch_size x 4
    assert d.accumulation(3, 2) == (3, 2)  # cannot split: the step doubles (and the run plan says so)
    assert d.accumulation(1, 4) == (1, 4)


def test_optimizer_state_loads_across_world_sizes_unless_sharded():
    def marker(**fields):
        return CheckpointMarker.from_json(fields)

    ddp2 = marker(world_size=2, distributed="ddp")
    one = marker(world_size=1, distributed=None)
    assert d.optimizer_state_problem(one, 2, "ddp") is None
    assert d.optimizer_state_problem(ddp2, 1, "ddp") is None
    assert d.optimizer_state_problem(marker(), 2, "ddp") is None  # markers from before this field: one process
    fsdp2 = marker(world_size=2, distributed="fsdp")
    assert d.optimizer_state_problem(fsdp2, 2, "fsdp") is None
    assert "fresh optimizer" in d.optimizer_state_problem(fsdp2, 4, "fsdp")
    assert "fresh optimizer" in d.optimizer_state_problem(one, 2, "deepspeed")


def test_run_exit_keeps_the_ranks_codes_and_names_a_rank_that_left_none(tmp_path, capsys):
    (tmp_path / "rank-0.code").write_text("3\n")
    (tmp_path / "rank-1.code").write_text("3\n")
    assert d._run_exit(1, tmp_path, 2) == Exit.DATA  # torchrun says 1; the daemon must see 3
    for f in tmp_path.iterdir():
        f.unlink()
    (tmp_path / "rank-0.code").write_text("1\n")
    assert d._run_exit(1, tmp_path, 2) == Exit.CRASH
    assert "rank 1 of 2 ended without an exit code" in capsys.readouterr().err
    for f in tmp_path.iterdir():
        f.unlink()
    assert d._run_exit(0, tmp_path, 2) == Exit.OK


@pytest.mark.parametrize("value, problem", [
    ("auto", None), (2, None), (0, "training.num_processes: 0 is below the minimum 1"),
    ("two", 'training.num_processes: expected "auto" | integer, got "two"'),
])
def test_num_processes_is_auto_or_a_positive_integer(value, problem):
    try:
        cfg = config.from_dict({"training": {"num_processes": value}})
    except config.ConfigError as e:
        assert e.problems == [problem]
    else:
        assert problem is None and cfg.training.num_processes == value


def test_auto_is_one_process_on_the_cpu():
    assert d.processes_wanted(config.from_dict({"training": {"device": "cpu"}})) == 1
    assert d.processes_wanted(config.from_dict({"training": {"num_processes": 3, "device": "cpu"}})) == 3


def test_a_failed_collective_reads_as_a_rank_that_stopped_answering():
    cfg = config.from_dict({"training": {"collective_timeout_seconds": 60}})
    reason = d.collective_failure("RuntimeError: Application timeout caused pair closure", cfg, d.World(0, 0, 2))
    assert reason and "another rank stopped answering" in reason and "= 60" in reason
    assert d.collective_failure("ValueError: bad", cfg, d.World(0, 0, 2)) is None
    assert d.collective_failure("RuntimeError: timeout", cfg, d.World()) is None  # one process: no ranks to blame
