"""The retention-aware controller: its rule, a run where retention falls and the optimizer's learning rate
drops, a SIGKILLed run resumed to the same decisions, the next run starting from the saved state, the off switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (chat, newest_step, run_train, seed_rehearsal, sigkill_when, spawn_train, step_losses,
                      write_jsonl)
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.trainer.control_rule import ControllerState, decide, rehearsal_share, run_share
from test_probe import own_answers_probe

# ---------------------------------------------------------------- the rule


def cfg_with(**controller) -> config_mod.Config:
    sets = ["eval.retention_warn=0.95", "training.learning_rate=0.001", "training.rehearsal_fraction=0.3",
            "training.replay_fraction=0.05"] + [f"controller.{k}={json.dumps(v)}" for k, v in controller.items()]
    return config_mod.load(None, sets)


CFG = cfg_with(lr_factor=0.5, min_lr_scale=0.25, rehearsal_step=0.1, max_rehearsal_fraction=0.5,
               stall_evaluations=2, safe_margin=0.03, step_down_margin=0.0)  # a step down at the warning itself
EARLY = cfg_with(lr_factor=0.5, min_lr_scale=0.25, rehearsal_step=0.1, max_rehearsal_fraction=0.5,
                 stall_evaluations=2, safe_margin=0.03, step_down_margin=0.03)
SHARE_FIRST = cfg_with(step_down_first="share", lr_factor=0.5, min_lr_scale=0.25, rehearsal_step=0.1,
                       max_rehearsal_fraction=0.5, stall_evaluations=2, safe_margin=0.03, step_down_margin=0.0)


@pytest.mark.parametrize("cfg, state, retention, accuracy, kind, scale, share", [
    # retention under the warning: the rate first (the default), halved, the share unchanged
    (CFG, ControllerState(), 0.94, 50.0, "step_down", 0.5, 0.3),
    # ...down to its floor: 0.5 -> 0.25 (not 0.125 below), the share still unchanged
    (CFG, ControllerState(lr_scale=0.5), 0.5, 50.0, "step_down", 0.25, 0.3),
    # the rate at its floor: now the share, + 0.1
    (CFG, ControllerState(lr_scale=0.25), 0.5, 50.0, "step_down", 0.25, 0.4),
    # the ceiling bounds the share: 0.45 -> 0.5 (not 0.55 above)
    (CFG, ControllerState(lr_scale=0.25, rehearsal_extra=0.15), 0.5, 50.0, "step_down", 0.25, 0.5),
    # both at their bounds: hold, said why
    (CFG, ControllerState(lr_scale=0.25, rehearsal_extra=0.2), 0.5, 50.0, "hold", 0.25, 0.5),
    # exactly at the warning level is not under it: hold (not safe for a step back either)
    (CFG, ControllerState(lr_scale=0.5, rehearsal_extra=0.1, best_accuracy=90.0, evaluations_since_best=5),
     0.95, 80.0, "hold", 0.5, 0.4),
    # stalled (2nd probed evaluation without a better accuracy) and safe: step back, the share first (the
    # reverse of a step down)...
    (CFG, ControllerState(lr_scale=0.25, rehearsal_extra=0.2, best_accuracy=90.0, evaluations_since_best=1),
     0.99, 90.0, "step_back", 0.25, 0.4),
    # ...never below the configured share: 0.35 -> 0.3 (not 0.25), the rate unchanged...
    (CFG, ControllerState(lr_scale=0.25, rehearsal_extra=0.05, best_accuracy=90.0, evaluations_since_best=1),
     1.0, 85.0, "step_back", 0.25, 0.3),
    # ...then the rate, never above the configured one: 0.75 -> 1 (not 1.5)
    (CFG, ControllerState(lr_scale=0.75, best_accuracy=90.0, evaluations_since_best=1), 1.0, 85.0, "step_back",
     1.0, 0.3),
    # improving accuracy: no stall, hold
    (CFG, ControllerState(lr_scale=0.5, rehearsal_extra=0.1, best_accuracy=80.0, evaluations_since_best=1),
     1.0, 85.0, "hold", 0.5, 0.4),
    # stalled but only just above the warning (under warn + margin): hold
    (CFG, ControllerState(lr_scale=0.5, rehearsal_extra=0.1, best_accuracy=90.0, evaluations_since_best=1),
     0.96, 90.0, "hold", 0.5, 0.4),
    # already at the configured values: hold
    (CFG, ControllerState(best_accuracy=90.0, evaluations_since_best=4), 1.0, 90.0, "hold", 1.0, 0.3),
    # no held-out accuracy: a stall on retention alone
    (CFG, ControllerState(lr_scale=0.5, evaluations_since_best=1), 1.0, None, "step_back", 1.0, 0.3),
    # controller.step_down_first "share": the share up to its ceiling first, the rate unchanged...
    (SHARE_FIRST, ControllerState(), 0.94, 50.0, "step_down", 1.0, 0.4),
    (SHARE_FIRST, ControllerState(rehearsal_extra=0.15), 0.5, 50.0, "step_down", 1.0, 0.5),
    # ...then the rate halves
    (SHARE_FIRST, ControllerState(rehearsal_extra=0.2), 0.5, 50.0, "step_down", 0.5, 0.5),
    # a step back in the reverse order: the rate first, then the share
    (SHARE_FIRST, ControllerState(lr_scale=0.25, rehearsal_extra=0.2, best_accuracy=90.0, evaluations_since_best=1),
     0.99, 90.0, "step_back", 0.5, 0.5),
    (SHARE_FIRST, ControllerState(rehearsal_extra=0.05, best_accuracy=90.0, evaluations_since_best=1),
     1.0, 85.0, "step_back", 1.0, 0.3),
    # controller.step_down_margin 0.03: one lost answer of 36 (0.972, above the 0.95 warning) steps down...
    (EARLY, ControllerState(), 35 / 36, 50.0, "step_down", 0.5, 0.3),
    # ...which without the margin is a hold (not under the warning, not safe to step back)
    (CFG, ControllerState(), 35 / 36, 50.0, "hold", 1.0, 0.3),
    # ...and at warn + margin (0.98), safe, a stall steps back as before
    (EARLY, ControllerState(lr_scale=0.5, best_accuracy=90.0, evaluations_since_best=1), 0.98, 90.0, "step_back",
     1.0, 0.3),
])
def test_rule(cfg, state, retention, accuracy, kind, scale, share) -> None:
    before = state.to_json()
    d = decide(state, retention, accuracy, cfg, global_step=7)
    assert d is not None and d.kind == kind, d.reason
    assert d.state.lr_scale == pytest.approx(scale) and rehearsal_share(d.state, cfg) == pytest.approx(share)
    assert d.state.decisions == {**state.decisions, kind: 1} and d.state.last["kind"] == kind
    assert d.state.last["global_step"] == 7 and d.reason == d.state.last["reason"]
    assert state.to_json() == before  # pure: the state handed in is not changed
    assert decide(state, retention, accuracy, cfg, 7).state.to_json() == d.state.to_json()  # deterministic


def test_rule_without_probe_rehearsal_off_and_the_continued_share() -> None:
    assert decide(ControllerState(), None, 50.0, CFG) is None  # no probe: nothing to judge
    off = config_mod.load(None, ["training.rehearsal_fraction=0", "eval.retention_warn=0.95"])
    d = decide(ControllerState(), 0.5, 50.0, off)
    assert d.kind == "step_down" and d.state.lr_scale == 0.5 and rehearsal_share(d.state, off) == 0.0
    moved = ControllerState(rehearsal_extra=0.2, run_rehearsal_fraction=0.3)
    assert run_share(moved, CFG, continuing=False) == pytest.approx(0.5)  # a new run takes the new share
    assert run_share(moved, CFG, continuing=True) == 0.3  # a continued run keeps the share it was drawn with
    assert ControllerState.from_json({"lr_scale": "x"}).to_json() == ControllerState().to_json()


@pytest.mark.parametrize("drawn, extra", [(0.3, 0.1), (0.3, 0.3), (0.2, 0.0), (0.4, -0.1)])
def test_within_a_run_the_new_share_is_a_weight_on_the_drawn_lines(drawn, extra) -> None:
    """The run drew its rehearsal lines at ``drawn``; weighted, they hold the controller's share of the loss, and a
    step's loss keeps its scale (the mean weight over the drawn mix is 1)."""
    from ultimate_trainer.trainer.control_rule import rehearsal_weights

    cfg = cfg_with(max_rehearsal_fraction=0.6)
    state = ControllerState(rehearsal_extra=extra)
    target = rehearsal_share(state, cfg)
    rehearsal, other = rehearsal_weights(state, cfg, drawn)
    assert drawn * rehearsal / (drawn * rehearsal + (1 - drawn) * other) == pytest.approx(target, abs=1e-5)
    assert drawn * rehearsal + (1 - drawn) * other == pytest.approx(1.0, abs=1e-5)
    assert (rehearsal > other) == (target > drawn) and (rehearsal == other == 1.0) == (target == drawn)
    off = cfg_with(enabled=False, max_rehearsal_fraction=0.6)
    assert rehearsal_weights(state, off, drawn) == (1.0, 1.0) and rehearsal_weights(None, cfg, drawn) == (1.0, 1.0)
    assert rehearsal_weights(state, cfg, 0.0) == (1.0, 1.0)  # no rehearsal lines in the run: nothing to weigh


def test_config_bounds_the_share_with_replay() -> None:
    with pytest.raises(config_mod.ConfigError, match="controller.max_rehearsal_fraction"):
        config_mod.load(None, ["controller.max_rehearsal_fraction=0.9", "training.replay_fraction=0.1"])
    config_mod.load(None, ["controller.max_rehearsal_fraction=0.9", "training.replay_fraction=0.1",
                           "controller.enabled=false"])


# ---------------------------------------------------------------- runs

def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def optimizer_lrs(checkpoint: Path) -> list[float]:
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
    return [g["lr"] for g in state["param_groups"]]


def project(make_project, tiny_model_dir: Path, root: Path, **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    own_answers_probe(tiny_model_dir, root / "probe.jsonl", [f"Question number {i}?" for i in range(6)])
    settings = dict(eval__probe_file="probe.jsonl", eval__probe_every=1, eval__probe_max_new_tokens=6,
                    eval__retention_warn=1.0, eval_steps=3, save_steps=4, training__learning_rate=0.05,
                    training__replay_fraction=0.0, controller__lr_factor=0.5, controller__min_lr_scale=0.25,
                    controller__step_down_margin=0.0)  # under 1.0: at the first lost answer
    return make_project(tiny_model_dir, root=root, **{**settings, **extra})


DATA = [chat(f"say {i}", f"word{i % 5}") for i in range(32)]


def test_retention_falls_and_the_optimizer_rate_drops_then_the_next_run_starts_from_it(
        make_project, tiny_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "p"
    cfg = project(make_project, tiny_model_dir, root)
    r = run_train(cfg, write_jsonl(tmp_path / "a.jsonl", DATA))
    assert r.returncode == 0, r.stderr[-3000:]
    decisions = lines(root / "status/history/controller.jsonl")
    probes = lines(root / "status/history/probe.jsonl")
    assert len(decisions) == len(probes)  # one decision per probe
    downs = [d for d in decisions if d["kind"] == "step_down"]
    assert downs, f"retention never fell under 1.0: {[p['retention'] for p in probes]}"
    first = downs[0]
    assert first["retention"] < 1.0 and first["lr_scale_before"] == 1.0 and first["lr_scale"] == 0.5
    assert first["step_down_below"] == 1.0  # eval.retention_warn 1.0 + controller.step_down_margin 0
    assert "retention" in first["reason"] and "controller at step %d: step down" % first["global_step"] in r.stderr
    # The rate the Trainer logs drops right after the decision, to the configured 0.05 x the scale...
    steps = {s["global_step"]: s for s in lines(root / "status/history/steps.jsonl")}
    assert steps[first["global_step"] - 1]["learning_rate"] == pytest.approx(0.05)
    assert steps[first["global_step"] + 1]["learning_rate"] == pytest.approx(0.05 * first["lr_scale"])
    # ...and so does the optimizer's own: the last checkpoint's param groups and the marker's state.
    last = ck.newest_complete(root / "checkpoints")
    final_scale = decisions[-1]["lr_scale"]
    lrs = optimizer_lrs(last.path)
    assert final_scale <= 0.5 and lrs and lrs == pytest.approx([0.05 * final_scale] * len(lrs))
    assert last.meta["controller"]["lr_scale"] == final_scale
    assert last.meta["controller"]["decisions"]["step_down"] == len(downs)
    status = json.loads((root / "status/training_status.json").read_text())
    ctl = status["controller"]
    assert ctl["enabled"] and ctl["lr_scale"] == final_scale and ctl["last"]["kind"] == decisions[-1]["kind"]
    assert ctl["decisions"] == last.meta["controller"]["decisions"]

    # The next run (other files) starts from the saved state: its first step trains at the scaled rate.
    r = run_train(cfg, write_jsonl(tmp_path / "b.jsonl", [chat(f"tell {i}", f"item{i % 3}") for i in range(8)]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"retention-aware controller: learning rate x{final_scale:g}" in r.stderr
    steps2 = [s for s in lines(root / "status/history/steps.jsonl") if s["global_step"] > last.global_step]
    assert steps2[0]["learning_rate"] == pytest.approx(0.05 * final_scale)


def test_a_step_down_weighs_the_rehearsal_lines_from_the_next_step_of_the_same_run(
        make_project, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The raised rehearsal share acts in the run that decided it: from the next step, its rehearsal lines weigh
    more in the loss, at the same rate (``min_lr_scale`` 1: the rate is at its floor, so the share moves).
    Against a run that differs only in ``controller.rehearsal_step`` 0 (a decision at the same step that can
    move nothing: the same rates, weights of 1), the objectives trained are identical up to the decision and
    differ from the step after it."""
    data = write_jsonl(tmp_path / "a.jsonl", DATA)
    answers = [chat(f"general question {i}?", f"general answer {i}.", system="You are a helpful assistant.")
               for i in range(30)]
    roots, errs = {}, {}
    for name, step, floor in (("weighted", 0.2, 1.0), ("unweighted", 0.0, 1.0)):
        cfg = project(make_project, tiny_model_dir, tmp_path / name, training__rehearsal_fraction=0.3,
                      controller__rehearsal_step=step, controller__max_rehearsal_fraction=0.6,
                      controller__min_lr_scale=floor)
        seed_rehearsal(cfg, answers)
        r = run_train(cfg, data)
        assert r.returncode == 0, r.stderr[-3000:]
        roots[name], errs[name] = cfg.parent, r.stderr
    first = next(d for d in lines(roots["weighted"] / "status/history/controller.jsonl") if d["kind"] == "step_down")
    assert first["run_rehearsal_fraction"] == 0.3 and first["rehearsal_fraction"] == pytest.approx(0.5)
    assert first["lr_scale_before"] == first["lr_scale"] == 1.0  # the share moved, not the rate
    w = 0.5 * 0.7 / (0.3 * 0.5)  # a rehearsal line weighs w times another: 0.3 drawn, 0.5 of the loss
    assert first["rehearsal_weight"] == pytest.approx(w / (0.3 * w + 0.7), abs=1e-5)
    assert f"rehearsal lines weigh x{w:g} in the loss from step {first['global_step'] + 1}" in errs["weighted"]
    other = next(d for d in lines(roots["unweighted"] / "status/history/controller.jsonl")
                 if d["global_step"] == first["global_step"])
    assert (other["kind"], other["lr_scale"], other["rehearsal_weight"]) == ("hold", 1.0, 1.0), other["reason"]
    weighted, unweighted = (step_losses(roots[k], objective=True) for k in ("weighted", "unweighted"))
    before = [s for s in weighted if s <= first["global_step"]]
    assert [weighted[s] for s in before] == [unweighted[s] for s in before]
    assert weighted[first["global_step"] + 1] != pytest.approx(unweighted[first["global_step"] + 1], rel=1e-4)
    status = json.loads((roots["weighted"] / "status/training_status.json").read_text())["controller"]
    assert status["rehearsal_fraction"] == 0.3 and status["rehearsal_weight"] > 1.0


def test_off_switch_keeps_the_configured_rate(make_project, tiny_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "off"
    cfg = project(make_project, tiny_model_dir, root, controller__enabled=False)
    r = run_train(cfg, write_jsonl(tmp_path / "a.jsonl", DATA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (root / "status/history/controller.jsonl").exists()
    probes = lines(root / "status/history/probe.jsonl")
    assert any(p["retention"] < 1.0 for p in probes)  # it would have stepped down
    assert {s["learning_rate"] for s in lines(root / "status/history/steps.jsonl")} == {0.05}
    last = ck.newest_complete(root / "checkpoints")
    assert "controller" not in last.meta and set(optimizer_lrs(last.path)) == {0.05}
    assert json.loads((root / "status/training_status.json").read_text())["controller"]["enabled"] is False


def test_sigkilled_run_resumes_to_the_same_decisions(make_project, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", [chat(f"say {i}", f"word{i % 5}") for i in range(40)])
    straight = project(make_project, tiny_model_dir, tmp_path / "straight")
    killed = project(make_project, tiny_model_dir, tmp_path / "killed")
    r = run_train(straight, data)
    assert r.returncode == 0, r.stderr[-3000:]
    total = newest_step(straight.parent / "checkpoints")
    sigkill_when(spawn_train(killed, data), lambda: newest_step(killed.parent / "checkpoints") >= 8, timeout=600)
    killed_at = newest_step(killed.parent / "checkpoints")
    assert 8 <= killed_at < total, "the run finished before it could be killed"
    r = run_train(killed, data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing interrupted run" in r.stderr

    def by_step(root: Path) -> dict[int, tuple]:  # a decision taken again after the crash keeps its last line
        return {d["global_step"]: (d["kind"], d["lr_scale"], d["rehearsal_fraction"], d["retention"], d["accuracy"])
                for d in lines(root / "status/history/controller.jsonl")}

    expected, got = by_step(straight.parent), by_step(killed.parent)
    assert "step_down" in {k for k, *_ in expected.values()}
    assert got == expected
    a, b = (ck.newest_complete(p.parent / "checkpoints") for p in (straight, killed))
    drop = ("last",)  # its time differs
    assert {k: v for k, v in a.meta["controller"].items() if k not in drop} == \
        {k: v for k, v in b.meta["controller"].items() if k not in drop}
    assert optimizer_lrs(a.path) == optimizer_lrs(b.path)


def test_two_ranks_take_the_same_decisions_and_rates_as_one(make_project, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 0 decides; rank 1 must apply the same rate at the same step, or its gradients (averaged into rank 0's
    update) would pull the two-process run away from the one-process run."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "a.jsonl", DATA)
    same_batch = dict(training__gradient_accumulation_steps=2, training__packing="off", eval_steps=2, save_steps=100)
    one = project(make_project, tiny_model_dir, tmp_path / "one", **same_batch)
    two = project(make_project, tiny_model_dir, tmp_path / "two", **same_batch)
    for cfg, n in ((one, 1), (two, 2)):
        r = run_train(cfg, data, extra=["--set", f"training.num_processes={n}"])
        assert r.returncode == 0, r.stderr[-3000:]
    assert "launching through torchrun" in r.stderr
    decisions = [[(d["global_step"], d["kind"], d["lr_scale"]) for d in lines(p.parent / "status/history/controller.jsonl")]
                 for p in (one, two)]
    assert decisions[0] == decisions[1] and "step_down" in {k for _, k, _ in decisions[0]}
    rates = [{s["global_step"]: s["learning_rate"] for s in lines(p.parent / "status/history/steps.jsonl")}
             for p in (one, two)]
    assert rates[0] == rates[1]
    a, b = (ck.newest_complete(p.parent / "checkpoints") for p in (one, two))
    assert b.meta["world_size"] == 2 and a.meta["controller"]["lr_scale"] == b.meta["controller"]["lr_scale"] < 1
    # The same updates: the two-process run's adapter is the one-process run's. Measured: 1.1e-5 apart (gradients
    # summed in another order, at a rate of 0.05); a rank 1 still on the unscaled rate would move its replica by
    # about the rate (Adam: ~1e-2 a step) and pull rank 0's through the averaged gradients.
    wa, wb = load_file(a.path / "adapter_model.safetensors"), load_file(b.path / "adapter_model.safetensors")
    worst = max((wb[name] - wa[name]).abs().max().item() for name in wa)
    assert worst <= 1e-4, worst
