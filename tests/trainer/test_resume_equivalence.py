"""A run killed after a checkpoint and resumed trains exactly what the uninterrupted run trains.

The check torchtune's and transformers' own suites make of their resume: step for step the same
losses, and the same adapter at the end. Here it also covers this project's own continuation (the
run plan, the run id, the marker's run step) on top of the Trainer's resume, with rehearsal on: the
resumed run draws the same rehearsed lines as the interrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import chat, newest_step, run_train, seed_rehearsal, sigkill_when, spawn_train, step_losses, \
    write_jsonl
from ultimate_trainer.core import checkpoints as ck

SETTINGS = dict(eval_steps=0, save_steps=4,  # evaluation is covered elsewhere; here only the training path
                training__rehearsal_fraction=0.2)
# The base's rehearsal answers (a random tiny model's are empty: these stand in for them).
ANSWERS = [chat(f"general question {i}?", f"a general answer, number {i}.", system="You are a helpful assistant.")
           for i in range(50)]




def adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(ck.newest_complete(root / "checkpoints").path / "adapter_model.safetensors")


def test_sigkilled_and_resumed_run_equals_the_uninterrupted_run(arch_model_dir, make_project, tmp_path):
    """On the tiny Llama and on the tiny Qwen2 (Qwen2.5's architecture)."""
    data = write_jsonl(tmp_path / "data.jsonl", [chat(f"question {i} about {i % 7}?", f"answer {i * 3}")
                                                 for i in range(400)])  # packed by default: ~8 a row
    # Qwen2's 152k-row output layer makes generation slow here: no probe baseline (the Llama's runs take it).
    settings = {**SETTINGS, **({"eval__probe_file": None} if "qwen2" in arch_model_dir.name else {})}
    straight = make_project(arch_model_dir, root=tmp_path / "straight", **settings)
    resumed = make_project(arch_model_dir, root=tmp_path / "resumed", **settings)
    for project in (straight, resumed):
        seed_rehearsal(project, ANSWERS)

    r = run_train(straight, data)
    assert r.returncode == 0, r.stderr
    sigkill_when(spawn_train(resumed, data), lambda: newest_step(resumed.parent / "checkpoints") >= 8,
                 timeout=600)  # a busy shared CPU can take minutes to start a run
    killed_at = newest_step(resumed.parent / "checkpoints")
    total = ck.newest_complete(straight.parent / "checkpoints").global_step
    assert 8 <= killed_at < total, "the run finished before it could be killed"
    r = run_train(resumed, data)
    assert r.returncode == 0, r.stderr
    assert "continuing interrupted run" in r.stderr
    rehearsed = [ck.newest_complete(p.parent / "checkpoints").meta.get("rehearsal") for p in (straight, resumed)]
    assert rehearsed[0] == rehearsed[1] and rehearsed[0]["examples"] == 107  # ceil(400 * 0.2 / (1 - 0.2 - 0.05))

    expected, got = step_losses(straight.parent), step_losses(resumed.parent)
    assert sorted(got) == sorted(expected) == list(range(1, total + 1))
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-5, (step, got[step], expected[step])
    a, b = adapter(straight.parent), adapter(resumed.parent)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
