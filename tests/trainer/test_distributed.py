"""Several training processes on this CPU (gloo): the same training, the same continuity, a clean failure.

Every test runs the real ``train.py`` on the tiny random model; with ``training.num_processes=2``
it relaunches itself under torchrun (c10d rendezvous on 127.0.0.1). Marked ``distributed``: each
starts two or three Python processes that load torch, slow on a 2-core machine but part of ``make test``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, chat, optimizer_step, run_train, step_losses, wait_for, write_jsonl
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.trainer.distributed import free_port

pytestmark = pytest.mark.distributed

TWO = ["--set", "training.num_processes=2"]
ONE = ["--set", "training.num_processes=1"]
# One process: 2 examples a forward pass x 2 passes a step. Two processes: each rank one pass of 2
# examples a step, so a step still trains the same 4 examples in the same order.
SAME_GLOBAL_BATCH = dict(eval_steps=0, save_steps=100, training__gradient_accumulation_steps=2,
                         training__packing="off", data__heldout_fraction=0.0)
LOSS_TOLERANCE = 1e-4     # absolute, per step: the two runs add the same gradients in another order
ADAPTER_TOLERANCE = 1e-5  # absolute, per weight, after every step of the run


def records(n: int, tag: str) -> list[dict]:
    return [chat(f"{tag} question {i} about {i % 5}?", f"{tag} answer {i * 7}") for i in range(n)]




def status(root: Path) -> dict:
    return json.loads((root / "status" / "training_status.json").read_text())


@pytest.mark.parametrize("packing", ["off", "on"])
def test_two_processes_train_what_one_process_trains(tiny_model_dir, make_project, tmp_path, packing):
    """Padded (``off``) and padding-free (``on``: each pass's examples back to back in one row)."""
    data = write_jsonl(tmp_path / "data.jsonl", records(48, "ddp"))  # 12 steps of 4 examples
    layout = {**SAME_GLOBAL_BATCH, "training__packing": packing}
    one = make_project(tiny_model_dir, root=tmp_path / "one", **layout)
    two = make_project(tiny_model_dir, root=tmp_path / "two", **layout)

    r = run_train(one, data, extra=ONE)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(two, data, extra=TWO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "launching through torchrun" in r.stderr

    a, b = step_losses(one.parent), step_losses(two.parent)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= LOSS_TOLERANCE, (step, a[step], b[step])
    ca, cb = ck.newest_complete(one.parent / "checkpoints"), ck.newest_complete(two.parent / "checkpoints")
    assert ca.global_step == cb.global_step == 12
    assert cb.meta["world_size"] == 2 and cb.meta["distributed"] == "ddp" and cb.meta["examples_per_step"] == 4
    wa, wb = load_file(ca.path / "adapter_model.safetensors"), load_file(cb.path / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=ADAPTER_TOLERANCE, msg=name)
    # rank 0 alone wrote the status, and it names both ranks
    s = status(two.parent)
    assert s["world_size"] == 2 and [r["rank"] for r in s["ranks"]] == [0, 1]
    assert all(r["rss_bytes"] > 0 and r["device"] == "cpu" for r in s["ranks"])


def test_two_processes_distil_the_rehearsal_as_one_process_does(tiny_model_dir, make_project, tmp_path):
    """``training.rehearsal_loss`` distill under DDP: each rank's teacher pass (the model with its adapter
    off, past the DDP wrapper) gives the losses and the adapter of one process (whose loss is the chunked
    one). Against the base's answers trained by cross-entropy, the first step's objective is lower: a fresh
    adapter is the base, so its rehearsal targets cost nothing; its logged ``loss`` is the plain
    cross-entropy, the same as that run's at the same step and model."""
    from conftest import seed_rehearsal

    data = write_jsonl(tmp_path / "data.jsonl", records(41, "kd"))  # with 19 rehearsal lines, 15 whole steps
    answers = [chat(f"general question {i}?", f"general answer number {i}.", system="You are a helpful assistant.")
               for i in range(30)]
    layout = {**SAME_GLOBAL_BATCH, "training__rehearsal_fraction": 0.3, "training__learning_rate": 0.01}
    roots = {}
    for name, extra in (("one", ONE), ("two", TWO), ("answers", ONE + ["--set", 'training.rehearsal_loss="answers"'])):
        cfg = make_project(tiny_model_dir, root=tmp_path / name, **layout)
        seed_rehearsal(cfg, answers)
        r = run_train(cfg, data, extra=extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "not its distribution" not in r.stderr
        roots[name] = cfg.parent
    a, b, c = (step_losses(roots[k], objective=True) for k in ("one", "two", "answers"))
    assert sorted(a) == sorted(b) == sorted(c) and len(a) >= 10
    for step in a:
        assert abs(a[step] - b[step]) <= LOSS_TOLERANCE, (step, a[step], b[step])
    assert a[1] < c[1] - 0.1, (a[1], c[1])
    plain = {k: step_losses(roots[k]) for k in ("one", "two", "answers")}
    assert plain["one"][1] == pytest.approx(plain["answers"][1], abs=LOSS_TOLERANCE) \
        == pytest.approx(plain["two"][1], abs=LOSS_TOLERANCE)
    # the KL of a rehearsal token is below its cross-entropy (a step without rehearsal lines logs one loss)
    assert all(plain["one"][s] >= a[s] for s in a) and plain["one"][1] > a[1] + 0.1
    logged = {k: (roots[k] / "status/history/steps.jsonl").read_text() for k in ("one", "answers")}
    assert '"objective"' in logged["one"] and '"objective"' not in logged["answers"]  # only where they differ
    ca, cb = (ck.newest_complete(roots[k] / "checkpoints") for k in ("one", "two"))
    assert cb.meta["world_size"] == 2 and ca.global_step == cb.global_step
    wa, wb = load_file(ca.path / "adapter_model.safetensors"), load_file(cb.path / "adapter_model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=ADAPTER_TOLERANCE, msg=name)


def test_one_then_two_then_one_process_continue_the_global_step(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=3, save_steps=100, training__gradient_accumulation_steps=2)
    root = cfg.parent
    total = 0
    for i, (n, extra) in enumerate([(1, ONE), (2, TWO), (1, ONE)]):
        data = write_jsonl(tmp_path / f"part{i}.jsonl", records(24, f"part{i}"))
        r = run_train(cfg, data, extra=extra)
        assert r.returncode == 0, r.stderr[-3000:]
        newest = ck.newest_complete(root / "checkpoints")
        total += newest.meta["run_total_steps"]
        assert newest.global_step == total and newest.meta["run_complete"]
        assert newest.meta["world_size"] == n
        # Adam's step counter carries on only if each run loaded the previous run's optimizer state.
        assert optimizer_step(newest.path) == total
        assert status(root)["world_size"] == n and status(root)["global_step"] == total
        assert "cannot be re-sharded" not in r.stderr
    assert not (root / "checkpoints" / ".incomplete").exists()
    evals = [json.loads(line) for line in (root / "status" / "history" / "evals.jsonl").read_text().splitlines()]
    assert evals and len({e["global_step"] for e in evals}) == len(evals)  # evaluated once per step: by rank 0


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of worker ``rank`` under the train.py launcher (launcher -> torchrun agent -> workers)."""
    import psutil

    try:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == str(rank) and "train.py" in " ".join(p.cmdline()):
                    return p.pid
            except psutil.Error:
                continue
    except psutil.Error:
        return None
    return None


def test_killed_rank_fails_the_run_and_the_daemon_resumes_it(tiny_model_dir, make_project):
    cfg = make_project(tiny_model_dir, eval_steps=0, save_steps=2, training__num_processes=2,
                       training__collective_timeout_seconds=60)
    root = cfg.parent
    write_jsonl(root / "inbox" / "big.jsonl", records(400, "kill"))
    sets = ["daemon.file_stable_seconds=0", "daemon.start_monitors=false", "daemon.disk_warn_gb=0",
            "daemon.disk_critical_gb=0", "daemon.retry_initial_seconds=0", "daemon.consolidation_hour=null",
            "daemon.poll_interval=0.2"]
    args = [sys.executable, str(REPO / "daemon.py"), "--once", "--config", str(cfg)]
    for s in sets:
        args += ["--set", s]
    daemon = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (ck.newest_complete(root / "checkpoints") or ck.CheckpointInfo(root, 0, {})).global_step >= 2,
                 timeout=400, proc=daemon)
        journal = root / "queue" / "journal.jsonl"
        launcher = next(json.loads(line) for line in journal.read_text().splitlines()
                        if json.loads(line).get("event") == "launch")["pid"]

        class P:  # the launcher as _rank_pid wants it
            pid = launcher

        victim = _rank_pid(P, 1)  # type: ignore[arg-type]
        assert victim is not None, "rank 1 not found under the launcher"
        killed_at = ck.newest_complete(root / "checkpoints").global_step
        os.kill(victim, signal.SIGKILL)
        _, err = daemon.communicate(timeout=600)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err[-3000:]
    assert "rank 1 of 2 ended without an exit code" in err
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [e["event"] for e in events].count("crash") == 1
    assert (root / "queue" / "done" / "big.jsonl").exists()
    final = ck.newest_complete(root / "checkpoints")
    assert final.meta["run_complete"] and final.global_step == final.meta["run_total_steps"] > killed_at
    assert optimizer_step(final.path) == final.global_step  # resumed, nothing trained twice


def test_two_nodes_rendezvous_on_loopback(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=2, save_steps=100, training__gradient_accumulation_steps=2)
    data = write_jsonl(tmp_path / "data.jsonl", records(24, "node"))
    port = free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "--max-restarts=0",
         str(REPO / "train.py"), str(data), "--config", str(cfg)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = []
    try:
        for a in agents:
            errs.append(a.communicate(timeout=600)[1])
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(e[-2000:] for e in errs)
    newest = ck.newest_complete(cfg.parent / "checkpoints")
    assert newest.meta["world_size"] == 2 and newest.meta["run_complete"]
    assert len(ck.list_complete(cfg.parent / "checkpoints")) == 1  # written once, by rank 0
    s = status(cfg.parent)
    assert s["world_size"] == 2 and len(s["ranks"]) == 2 and s["pid"] in [r["pid"] for r in s["ranks"]]
    assert s["ranks"][0]["pid"] == s["pid"]  # rank 0 writes the status


def test_hung_rank_fails_the_run_at_the_collective_timeout(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=0, save_steps=100, training__num_processes=2,
                       training__collective_timeout_seconds=10)
    data = write_jsonl(tmp_path / "data.jsonl", records(400, "hang"))
    root = cfg.parent
    launcher = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(data), "--config", str(cfg)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = None
    try:
        wait_for(lambda: (root / "status" / "training_status.json").exists()
                 and status(root).get("global_step", 0) >= 2, timeout=400, proc=launcher)
        victim = _rank_pid(launcher, 1)
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)  # alive but silent: only the collective timeout can tell
        _, err = launcher.communicate(timeout=300)  # bounded: 10 s timeout + torchrun's 30 s teardown
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, err[-3000:]
    s = status(root)
    assert s["state"] == "error" and "another rank stopped answering" in s["error"], s["error"]
    assert "collective_timeout_seconds = 10" in s["error"]


def test_sigterm_stops_every_rank_after_the_same_step_and_saves_once(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=0, save_steps=1000, training__num_processes=2,
                       training__gradient_accumulation_steps=2)  # divides by 2: a step means the same in both
    data = write_jsonl(tmp_path / "data.jsonl", records(400, "stop"))
    root = cfg.parent
    launcher = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(data), "--config", str(cfg)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (root / "status" / "training_status.json").exists()
                 and status(root).get("global_step", 0) >= 2, timeout=400, proc=launcher)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    saved = ck.list_complete(root / "checkpoints")
    assert len(saved) == 1 and not saved[0].meta["run_complete"]  # one save, part-way through the run
    assert {p.name for p in saved[0].path.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert status(root)["state"] == "idle" and status(root)["global_step"] == saved[0].global_step

    r = run_train(cfg, data, extra=ONE)  # the rest of the run, in one process
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing interrupted run" in r.stderr
    final = ck.newest_complete(root / "checkpoints")
    assert final.meta["run_complete"] and final.global_step == final.meta["run_total_steps"]
    assert optimizer_step(final.path) == final.global_step
