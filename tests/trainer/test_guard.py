"""The divergence guard: a poisoned step's update is never applied, and repeated anomalies stop the run.

The poison is real: a tiny random model (untied embeddings) whose embedding row for the token
" Poison" is infinite, so any example containing that word gives a NaN loss and NaN gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import chat, run_train, write_jsonl
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import config
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.trainer.stability import culprits, loss_slope, spike_threshold, stability_score

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


def test_culprits_are_the_files_in_every_anomalous_step():
    events = [{"files": ["a.jsonl", "p.jsonl"]}, {"files": ["p.jsonl"]}, {"files": ["b.jsonl", "p.jsonl"]}]
    assert culprits(events) == ["p.jsonl"]
    assert culprits([{"files": ["a.jsonl"]}, {"files": ["b.jsonl"]}]) == ["a.jsonl", "b.jsonl"]


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
