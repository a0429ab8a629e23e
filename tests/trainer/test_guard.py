"""The divergence guard: a poisoned step's update is never applied, and repeated anomalies stop the run.

The poison is real: a tiny random model (untied embeddings) whose embedding row for the token
" Poison" is infinite, so any example containing that word gives a NaN loss and NaN gradients.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODEL_CACHE, REPO, chat, run_train, write_jsonl
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import config
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.trainer.distributed import free_port
from ultimate_trainer.trainer.stability import (Observation, SpikeRule, culprits, fit_levels, loss_slope,
                                                spike_threshold, stability_score)

POISON_WORD = " Poison"  # one token of the built-in tokenizer


# --------------------------------------------------------------------------- the rules

def test_spike_threshold_is_median_plus_k_robust_spread():
    assert spike_threshold([1.0] * 5, k=10, min_history=10) is None  # not enough history yet
    history = [1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.0, 1.1, 0.9]
    # median 1.0, MAD 0.1 -> 1.0 + 10 * 1.4826 * 0.1
    assert spike_threshold(history, k=10, min_history=10) == pytest.approx(1.0 + 1.4826)
    # a perfectly flat loss does not make every wobble a spike: the spread is at least 5 % of the median
    assert spike_threshold([2.0] * 20, k=10, min_history=10) == pytest.approx(3.0)


def test_loss_slope_and_stability_score():
    assert loss_slope([5.0]) is None
    assert loss_slope([3.0, 2.5, 2.0, 1.5]) == pytest.approx(-0.5)
    assert stability_score([1.0] * 10, 0, 10) == 100.0  # flat, no anomalies
    falling = stability_score([2.0, 1.8, 1.6, 1.4, 1.2], 0, 5)
    rising = stability_score([1.2, 1.4, 1.6, 1.8, 2.0], 0, 5)
    assert rising < falling
    assert stability_score([1.0] * 10, 5, 10) == 50.0  # half the window anomalous
    assert stability_score([], 0, 10) is None


def _rule(**kw) -> SpikeRule:
    return SpikeRule(**{"k": 10.0, "window_size": 50, "min_history": 20, "min_run_steps": 4, "max_growth": 10.0,
                        **kw})


def _mixed_steps(n: int, rng: random.Random) -> list[tuple[float, dict[str, float]]]:
    """Steps of a run with rehearsal: the base's own answers (loss ~0.5), the user's lines (~3), and mixes."""
    out = []
    for i in range(n):
        share = (0.0, 1.0, 0.2, 0.9)[i % 4]  # the user's share of the step's target tokens
        loss = share * rng.gauss(3.0, 0.15) + (1 - share) * rng.gauss(0.5, 0.03)
        out.append((loss, {k: v for k, v in (("user", share), ("rehearsal", 1 - share)) if v}))
    return out


def test_the_spike_rule_by_source_catches_salad_that_one_spread_over_mixed_steps_lets_through():
    rng = random.Random(0)
    steps = _mixed_steps(40, rng)
    rule = _rule()
    for loss, shares in steps:
        assert rule.judge(loss, shares).kind is None  # normal mixed data: no false alarm
        rule.accept(loss, shares)
    salad = 12.7  # the lowest word-salad step loss the issue measured
    # One median and spread over all steps: rehearsal beside user lines widens the spread past the salad.
    assert spike_threshold([x for x, _ in steps], k=10, min_history=20) > salad
    verdict = rule.judge(salad, {"user": 1.0})
    assert verdict.kind == "loss spike" and verdict.threshold < 6.0 and verdict.expected == pytest.approx(3.0, abs=0.2)
    assert rule.judge(3.4, {"user": 1.0}).kind is None  # an ordinary user step
    assert rule.judge(0.6, {"rehearsal": 1.0}).kind is None


def test_a_run_is_judged_from_its_first_steps_with_the_earlier_runs_history():
    rng = random.Random(1)
    earlier = [Observation(loss, shares) for loss, shares in _mixed_steps(50, rng)]
    fresh, seeded = _rule(), _rule()
    seeded.seed(earlier)
    assert all(o.shares.get("user") is None for o in seeded.window)  # earlier runs' files: "earlier", not "user"
    # A new file is harder than the last one (loss 4.5 against 3): its first steps are not judged by the old level.
    # (guard.min_run_steps = 4 steps' worth of the file's tokens: 6 steps of 70 % of it)
    first = [(4.5 + 0.1 * (i % 3), {"user": 0.7, "rehearsal": 0.3}) for i in range(6)]
    for loss, shares in first:
        assert seeded.judge(loss, shares).kind is None
        seeded.accept(loss, shares)
        fresh.accept(loss, shares)
    # Its seventh step is judged against its own level and the earlier runs' spread; without history, it is not.
    salad_step = 0.7 * 13.0 + 0.3 * 0.5
    assert seeded.judge(salad_step, {"user": 0.7, "rehearsal": 0.3}).kind == "loss spike"
    assert fresh.judge(salad_step, {"user": 0.7, "rehearsal": 0.3}).kind is None


def test_a_new_files_first_steps_are_judged_against_what_earlier_files_cost_when_new():
    """Issue 23: a run's own new file is not judged until its level is known (guard.min_run_steps): word
    salad in its first steps trained, and became the level its later steps were judged against.
    Earlier runs' files' levels when *they* were new are the prior: salad is caught at step 1, a merely
    harder file is not."""
    rng = random.Random(3)
    earlier = [Observation(loss, shares) for loss, shares in _mixed_steps(50, rng)]
    mix = {"user": 0.7, "rehearsal": 0.3}
    salad_step = 0.7 * 13.0 + 0.3 * 0.5
    without = _rule()
    without.seed(earlier)
    assert without.judge(salad_step, mix).kind is None  # no history of new files: not judged yet (chance aside)
    rule = _rule()
    rule.seed(earlier, new_levels=[3.1, 2.9, 3.4])
    verdict = rule.judge(salad_step, mix)
    # the prior: the median new-file level 3.1 for the user's share, rehearsal at its fitted ~0.5
    assert verdict.kind == "loss spike on a new file"
    assert verdict.threshold == pytest.approx(3.0 * (0.7 * 3.1 + 0.3 * 0.5), rel=0.03)
    assert rule.judge(13.0, {"user": 1.0}).kind == "loss spike on a new file"  # a step of the new file alone
    assert rule.judge(0.6, {"rehearsal": 1.0}).kind is None  # rehearsal alone is not the new file's business
    # A new file harder than the earlier ones (4.5 against ~3): no alarm; its own level is known after 4 steps.
    for i in range(6):
        loss = 4.5 + 0.1 * (i % 3)
        assert rule.judge(loss, mix).kind is None
        rule.accept(loss, mix)
    assert rule.new_level == pytest.approx((4.6 - 0.3 * 0.5) / 0.7, abs=0.3)  # its level over its first steps
    assert rule.new_file_threshold(mix, fit_levels(rule.window)) is None  # from now on judged by its own level
    assert rule.judge(salad_step, mix).kind == "loss spike"


def test_a_tenfold_growth_is_caught_whatever_the_spread_and_a_loss_worse_than_chance_at_once():
    rule = _rule(min_history=5)
    rng = random.Random(2)
    for _ in range(6):  # a very noisy start: the spread rule alone would allow almost anything
        loss = rng.choice([1.0, 2.8, 6.0])
        rule.accept(loss, {"user": 1.0})
    flagged = None
    loss = 2.8
    while flagged is None and loss < 1000:
        loss *= 1.3  # a learning rate of 1.0: the loss climbs step after step
        v = rule.judge(loss, {"user": 1.0})
        if v.kind:
            flagged = (loss, v.kind)
        else:
            rule.accept(loss, {"user": 1.0})
    assert flagged is not None and flagged[0] < 10 * 6.0 * 1.3
    # From the first step of a first run: above 1.25 x ln(vocabulary) is worse than a uniform guess.
    first = _rule(chance=11.93)
    assert first.judge(86.5, {"user": 1.0}).kind == "loss above chance"
    assert first.judge(11.0, {"user": 1.0}).kind is None  # a random model sits at ln(vocabulary): not flagged


def test_observations_round_trip_through_json():
    o = Observation(2.5, {"user": 0.75, "replay": 0.25})
    assert Observation.from_json(json.loads(json.dumps(o.to_json()))) == o
    assert Observation.from_json({"loss": None}) is None and Observation.from_json({"loss": "nan"}) is None
    assert o.earlier().shares == {"earlier": 0.75, "replay": 0.25}


def test_culprits_are_the_files_in_every_anomalous_step():
    events = [{"files": ["a.jsonl", "p.jsonl"]}, {"files": ["p.jsonl"]}, {"files": ["b.jsonl", "p.jsonl"]}]
    assert culprits(events) == ["p.jsonl"]
    assert culprits([{"files": ["a.jsonl"]}, {"files": ["b.jsonl"]}]) == ["a.jsonl", "b.jsonl"]
    # Salad beside an ordinary file, a line of each in every anomalous step: the ordinary file also trained
    # cleanly in accepted steps, the salad never did (the built-in model's run, docs/PERFORMANCE.md).
    both = [{"files": ["ordinary.jsonl", "salad.jsonl"]}] * 3
    assert culprits(both) == ["ordinary.jsonl", "salad.jsonl"]
    assert culprits(both, clean={"ordinary.jsonl"}) == ["salad.jsonl"]
    assert culprits(both, clean={"ordinary.jsonl", "salad.jsonl"}) == ["ordinary.jsonl", "salad.jsonl"]  # lr 1.0


# --------------------------------------------------------------------------- a real poisoned model

@pytest.fixture(scope="module")
def poisoned_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_model_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("poisoned-model")
    tok = AutoTokenizer.from_pretrained(builtin_model_dir)
    (poison_id,) = tok.encode(POISON_WORD)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight[poison_id] = float("inf")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(tmp_path: Path, **guard) -> config.Config:
    return config.from_dict({
        "paths": {"root": str(tmp_path)}, "load_in_4bit": False, "save_steps": 1000,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "warmup_steps": 0,
                     "lr_scheduler": "constant", "max_seq_length": 128, "gradient_checkpointing": False,
                     "device": "cpu"},
        "eval": {"max_new_tokens": 8}, "guard": guard})


def _train(model_dir: Path, texts: list[str], tmp_path: Path, guard: bool = True):
    """A plain HF Trainer over ``texts`` in order, one example per step, with the guard; returns the model."""
    import torch
    from transformers import AutoTokenizer

    from ultimate_trainer.data.collate import Collator
    from ultimate_trainer.model.loading import attach_lora, load_base_model
    from ultimate_trainer.trainer import hf
    from ultimate_trainer.trainer.guard import GuardCallback
    from ultimate_trainer.trainer.reporter import StatusReporter

    cfg = _cfg(tmp_path, enabled=guard)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = [{"input_ids": tok.encode(t), "labels": tok.encode(t)} for t in texts]
    torch.manual_seed(0)
    model = attach_lora(cfg, load_base_model(cfg, str(model_dir), quantize=False, device="cpu"))
    reporter = StatusReporter(tmp_path / "status", tmp_path / "ckpt", 60, 0)
    described = lambda step: {"files": ["t.jsonl"], "examples": [{"file": "t.jsonl", "example": step}]}  # noqa: E731
    args = hf.training_arguments(cfg, tmp_path / "out", len(data), "cpu", torch.float32)
    guard = GuardCallback(cfg.guard, reporter, described, "run")
    trainer = hf.ContinuousTrainer(model=model, args=args, train_dataset=data, data_collator=Collator(tok),
                                   callbacks=[guard], cfg=cfg, loss_observers=[guard.observe_loss])
    trainer.train()
    return model, trainer


def _adapter(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_a_nan_step_is_skipped_exactly_the_adapter_equals_one_that_never_saw_it(poisoned_model_dir, tmp_path):
    import torch

    clean = [f"The colour number {i} is blue and the sky is wide." for i in range(4)]
    poisoned = f"This line carries{POISON_WORD} inside it."
    guarded, t_guarded = _train(poisoned_model_dir, clean[:2] + [poisoned] + clean[2:], tmp_path / "a")
    never_saw, t_ref = _train(poisoned_model_dir, clean, tmp_path / "b")
    unguarded, _ = _train(poisoned_model_dir, clean[:2] + [poisoned] + clean[2:], tmp_path / "c", guard=False)

    a, b = _adapter(guarded), _adapter(never_saw)
    assert a.keys() == b.keys() and a
    assert all(torch.isfinite(v).all() for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a), "the guarded adapter differs from the one that never saw the step"
    # The optimizer never counted the skipped step either.
    steps = lambda t: {float(s["step"]) for s in t.optimizer.state.values()}  # noqa: E731
    assert steps(t_guarded) == steps(t_ref) == {4.0}
    # Without the guard the same data ruins the adapter: the poison is real.
    assert not all(torch.isfinite(v).all() for v in _adapter(unguarded).values())

    events = [json.loads(x) for x in (tmp_path / "a/status/history/anomalies.jsonl").read_text().splitlines()]
    assert [(e["global_step"], e["kind"], e["action"]) for e in events] == [(3, "non-finite loss", "update skipped")]
    assert events[0]["loss"] == "nan" and events[0]["files"] == ["t.jsonl"]


def test_repeated_anomalies_stop_the_run_with_exit_5_naming_the_file(poisoned_model_dir, make_project, tmp_path):
    # One example a step (no packing: a packed row would hold examples of both files, and name both).
    cfg = make_project(poisoned_model_dir, eval_steps=0, save_steps=1000, training__batch_size=1,
                       training__packing="off", data__heldout_fraction=0.0, guard__max_anomalies=2)
    good = write_jsonl(tmp_path / "good.jsonl", [chat(f"Question {i}?", f"Answer {i}.") for i in range(6)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat(f"Is{POISON_WORD} {i} here?", "Yes.") for i in range(3)])
    root = cfg.parent

    r = run_train(cfg, good, bad)
    assert r.returncode == Exit.DIVERGED, r.stderr
    assert "diverged: 2 anomalies" in r.stderr and "bad.jsonl" in r.stderr
    status = json.loads((root / "status/training_status.json").read_text())
    assert status["state"] == "error" and status["diverged"]["files"] == ["bad.jsonl"]
    assert status["stability"]["anomalies"] == 2
    events = [json.loads(x) for x in (root / "status/history/anomalies.jsonl").read_text().splitlines()]
    assert len(events) == 2
    for e in events:  # each event names the file and the example of its step, with the text shown
        assert e["files"] == ["bad.jsonl"] and e["kind"] == "non-finite loss"
        assert [x["file"] for x in e["examples"]] == ["bad.jsonl"] and POISON_WORD.strip() in e["examples"][0]["text"]
    assert ck.newest_complete(root / "checkpoints") is None  # nothing of the diverged run is kept


def test_one_bad_example_is_skipped_and_the_run_completes(poisoned_model_dir, make_project, tmp_path):
    from safetensors.torch import load_file

    cfg = make_project(poisoned_model_dir, eval_steps=0, training__batch_size=1, data__heldout_fraction=0.0)
    data = write_jsonl(tmp_path / "mixed.jsonl", [chat(f"Question {i}?", f"Answer {i}.") for i in range(5)]
                       + [chat(f"Is{POISON_WORD} here?", "Yes.")])
    r = run_train(cfg, data)
    assert r.returncode == 0, r.stderr
    final = ck.newest_complete(cfg.parent / "checkpoints")
    assert final.meta["run_complete"]
    import torch

    weights = load_file(str(final.path / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    status = json.loads((cfg.parent / "status/training_status.json").read_text())
    assert status["stability"]["anomalies_this_run"] == 1 and status["stability"]["last_anomaly"]["files"] == [
        "mixed.jsonl"]


# --------------------------------------------------------------------------- several processes

@pytest.fixture(scope="module")
def guard_model_dir(builtin_model_dir: Path) -> Path:
    """A tiny model trained on ordinary lines (tests/_guard_helpers.py): salad costs it ~2-10x their loss."""
    sys.path.insert(0, str(REPO / "tests"))
    from _guard_helpers import cached_guard_model

    return cached_guard_model(MODEL_CACHE, builtin_model_dir)


def _torchrun(script_args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=0", str(REPO / "tests" / "_guard_ranks.py"),
           *script_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.distributed
def test_two_ranks_skip_a_step_together_when_only_one_saw_the_spike(guard_model_dir, tmp_path):
    import torch

    runs = {}
    for mode in ("poisoned", "never"):
        r = _torchrun([str(guard_model_dir), str(tmp_path / mode), mode])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[mode] = [torch.load(tmp_path / mode / f"rank{k}.pt", weights_only=False) for k in (0, 1)]
    r0, r1 = runs["poisoned"]
    # Only rank 1 saw the salad: its own loss of step 3 is a spike, rank 0's is not ...
    assert r1["seen"][2] > 3 * max(r1["seen"][:2]) and r0["seen"][2] < 2 * max(r0["seen"][:2])
    # ... and both skipped step 3, nothing else.
    assert r0["skipped"] == r1["skipped"] == [3]

    def same(a: dict, b: dict) -> bool:
        return (a["adapter"].keys() == b["adapter"].keys() and all(torch.equal(a["adapter"][k], b["adapter"][k])
                                                                   for k in a["adapter"])
                and len(a["optimizer"]) == len(b["optimizer"]) > 0
                and all(sa.keys() == sb.keys() and all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k]))
                                                       for k in sa)
                        for sa, sb in zip(a["optimizer"], b["optimizer"])))

    assert same(r0, r1), "the replicas differ after the skipped step"
    assert same(r0, runs["never"][0]) and same(runs["never"][0], runs["never"][1]), \
        "the adapter or optimizer differs from a run that never saw the step"


@pytest.mark.distributed
def test_a_guard_stop_under_torchrun_exits_5_and_records_each_anomaly_once(poisoned_model_dir, make_project,
                                                                           tmp_path):
    cfg = make_project(poisoned_model_dir, eval_steps=0, save_steps=1000, training__batch_size=1,
                       training__packing="off", data__heldout_fraction=0.0, guard__max_anomalies=2)
    good = write_jsonl(tmp_path / "good.jsonl", [chat(f"Question {i}?", f"Answer {i}.") for i in range(6)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat(f"Is{POISON_WORD} {i} here?", "Yes.") for i in range(4)])
    root = cfg.parent
    r = run_train(cfg, good, bad, extra=["--set", "training.num_processes=2"])
    assert "launching through torchrun" in r.stderr
    assert r.returncode == Exit.DIVERGED, r.stderr[-3000:]  # the guard's code, not torchrun's 1
    events = [json.loads(x) for x in (root / "status/history/anomalies.jsonl").read_text().splitlines()]
    status = json.loads((root / "status/training_status.json").read_text())
    assert len(events) == 2 == status["stability"]["anomalies"] == status["stability"]["anomalies_this_run"]
    assert len({e["global_step"] for e in events}) == 2  # once each: rank 0 alone writes
    assert status["diverged"]["files"] == ["bad.jsonl"]


# --------------------------------------------------------------------------- what a walked-away user drops in

def _walked_away_project(make_project, model_dir: Path, root: Path, lr: float, **lora) -> Path:
    """The shipped mix (rehearsal 0.3 of each run), one example pair a step, the guard as shipped."""
    from conftest import seed_rehearsal

    cfg = make_project(model_dir, root=root, eval_steps=0, save_steps=1000, training__packing="off",
                       training__learning_rate=lr, training__rehearsal_fraction=0.3, training__replay_fraction=0.0,
                       data__heldout_fraction=0.0, **{f"lora__{k}": v for k, v in lora.items()})
    seed_rehearsal(cfg, [chat("What colour is the apple?", "The apple is red.") for _ in range(30)])
    return cfg


def test_word_salad_beside_normal_data_fails_the_salad_file(guard_model_dir, make_project, tmp_path):
    """As the issue found it (rehearsal mixed in, the shipped settings): the salad file trained at 0 anomalies."""
    from transformers import AutoTokenizer

    from _guard_helpers import normal_records, salad_records

    cfg = _walked_away_project(make_project, guard_model_dir, tmp_path / "project", 1e-3)
    root = cfg.parent
    # 1. Ordinary varied lines: no alarm; the guard keeps its window for the next run.
    r = run_train(cfg, write_jsonl(tmp_path / "normal1.jsonl", normal_records(40, seed=11)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (root / "status/history/anomalies.jsonl").exists()
    window = json.loads((root / "status/history/guard_window.json").read_text())
    assert {"user", "rehearsal"} <= {k for s in window["steps"] for k in s["shares"]}
    assert len(window["new_file_levels"]) == 1  # the next run's new file is judged from its first step by it

    # 2. A file of word salad beside an ordinary one: the salad steps are skipped and the salad file is blamed.
    tok = AutoTokenizer.from_pretrained(guard_model_dir)
    normal2 = write_jsonl(tmp_path / "normal2.jsonl", normal_records(40, seed=12))
    salad = write_jsonl(tmp_path / "salad.jsonl", salad_records(10, tok))
    r = run_train(cfg, normal2, salad)
    assert r.returncode == Exit.DIVERGED, r.stderr[-3000:]
    status = json.loads((root / "status/training_status.json").read_text())
    assert status["diverged"]["files"] == ["salad.jsonl"]
    events = [json.loads(x) for x in (root / "status/history/anomalies.jsonl").read_text().splitlines()]
    assert len(events) == 3 and all("salad.jsonl" in e["files"] for e in events)
    steps = [json.loads(x) for x in (root / "status/history/steps.jsonl").read_text().splitlines()]
    skipped = [s for s in steps if s.get("skipped")]
    # every skipped step is recorded as skipped, the third (which stops the run in its own step) too
    assert [s["global_step"] for s in skipped] == [e["global_step"] for e in events]
    assert all(isinstance(s["loss"], float) and s["loss"] > 5 for s in skipped)  # the real loss, not 0.0


def test_word_salad_as_a_new_files_first_lines_is_caught_at_its_first_step(guard_model_dir, make_project, tmp_path):
    """A run's own new file is judged from its first step against what earlier runs' files cost when
    new (guard_window.json's new_file_levels), not only after guard.min_run_steps steps of it, when
    the salad would have been its level: every step holding salad is skipped, none of it trained.
    (An ordinary new file beside salad raises no alarm: the test above.) The tiny model reads its own
    lines at ~4.5 nats, so the shipped 3x of that is as high as the chance rule's bar (13.5) and the
    salad (~16.7) is over both; at 2x the new-file rule alone is seen at work, under the chance bar.
    (On the built-in model, lines at ~2.8 and salad at 12.7-14.5: bench/guard_builtin.py.)"""
    import math

    from transformers import AutoTokenizer

    from _guard_helpers import normal_records, salad_records
    from ultimate_trainer.trainer.stability import CHANCE_MARGIN

    cfg = _walked_away_project(make_project, guard_model_dir, tmp_path / "project", 1e-3)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "guard": {"new_file_growth": 2.0}}))
    root = cfg.parent
    r = run_train(cfg, write_jsonl(tmp_path / "normal.jsonl", normal_records(24, seed=11)))
    assert r.returncode == 0, r.stderr[-3000:]
    levels = json.loads((root / "status/history/guard_window.json").read_text())["new_file_levels"]
    assert len(levels) == 1 and 0 < levels[0]["level"] < 6  # ordinary lines cost ~2-4 nats to the tiny model

    tok = AutoTokenizer.from_pretrained(guard_model_dir)
    r = run_train(cfg, write_jsonl(tmp_path / "salad.jsonl", salad_records(12, tok)))
    assert r.returncode == Exit.DIVERGED, r.stderr[-3000:]
    events = [json.loads(x) for x in (root / "status/history/anomalies.jsonl").read_text().splitlines()]
    steps = [s for s in (json.loads(x) for x in (root / "status/history/steps.jsonl").read_text().splitlines())
             if s.get("run_id") == events[0]["run_id"]]
    with_salad = [s for s in steps if (s.get("shares") or {}).get("user")]
    assert with_salad and all(s.get("skipped") for s in with_salad)  # not one salad step was trained
    assert [e["global_step"] for e in events] == [s["global_step"] for s in with_salad][:3]
    # judged by the new-file rule (2 x the earlier file's level), far under the chance rule's bar
    chance = CHANCE_MARGIN * math.log(len(tok))
    assert all(e["threshold"] < 0.8 * chance for e in events), [e["threshold"] for e in events]


def test_an_absurd_learning_rate_stops_the_run_and_nothing_of_it_is_kept(guard_model_dir, make_project, tmp_path):
    """Learning rate 1.0 with a LoRA scaling of 32 (alpha 256, rank 8): the first update wrecks the model
    (the loss of ordinary lines goes from ~3.5 to ~12-17), as 1.0 alone did to the issue's 135M model."""
    from _guard_helpers import normal_records

    lora = {"r": 8, "alpha": 256, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]}
    cfg = _walked_away_project(make_project, guard_model_dir, tmp_path / "project", 1e-3, **lora)
    root = cfg.parent
    r = run_train(cfg, write_jsonl(tmp_path / "normal1.jsonl", normal_records(40, seed=11)))
    assert r.returncode == 0, r.stderr[-3000:]
    kept = ck.newest_complete(root / "checkpoints")
    cfg = _walked_away_project(make_project, guard_model_dir, tmp_path / "project", 1.0, **lora)
    r = run_train(cfg, write_jsonl(tmp_path / "normal2.jsonl", normal_records(40, seed=12)))
    assert r.returncode == Exit.DIVERGED, r.stderr[-3000:]
    kinds = [json.loads(x)["kind"] for x in (root / "status/history/anomalies.jsonl").read_text().splitlines()]
    assert len(kinds) == 3 and set(kinds) <= {"loss spike", "loss spike on a new file", "loss growth",
                                              "loss above chance"}
    # The wrecked adapter is neither saved nor continued from: the next run starts from run 1's checkpoint.
    assert ck.newest_complete(root / "checkpoints").path == kept.path


def test_a_skipped_step_of_rehearsal_lines_alone_says_so_rather_than_naming_no_file(tmp_path, caplog):
    """A step can hold no line of the run's own files (only replayed or rehearsed ones): its warning says
    which, where it used to name the files as "?"."""
    import logging

    from ultimate_trainer.trainer.guard import GuardCallback
    from ultimate_trainer.trainer.reporter import StatusReporter

    reporter = StatusReporter(tmp_path / "status", tmp_path / "ckpt", 60, 0)
    files = {1: [], 2: ["t.jsonl"]}
    guard = GuardCallback(_cfg(tmp_path).guard, reporter, lambda step: {"files": files[step], "examples": []}, "run")
    with caplog.at_level(logging.WARNING, logger="ultimate_trainer.trainer.guard"):
        guard._record(1, "loss spike", 3.0, 1.0, 2.0, {"user": 0.0, "replay": 0.25, "rehearsal": 0.75})
        guard._record(2, "loss spike", 3.0, 1.0, 2.0, {"user": 0.5, "rehearsal": 0.5})
    first, second = [r.getMessage() for r in caplog.records]
    assert first.endswith("update skipped; no line of this run's files (rehearsal and replay lines only)"), first
    assert second.endswith("update skipped; files t.jsonl"), second
