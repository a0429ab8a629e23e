"""Consolidation: the merged model's logits equal base + adapter; the daemon runs it when asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core.checkpoints import list_consolidations, mark_complete, marker_meta, newest_complete
from ultimate_trainer.trainer.consolidation.merge import consolidate

HELPER = REPO / "tests" / "_daemon_helpers.py"


def make_checkpoint(root: Path, base_dir: Path, *, four_bit: bool, global_step: int = 5) -> tuple[Path, object]:
    """A PeftModel with non-zero LoRA B saved as checkpoint-<step> with its completeness marker.

    Returns the folder and the reference model (base as trained + adapter, eval mode).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from ultimate_trainer.model.loading import load_base_model

    cfg = config_mod.load(None, [f"paths.root={root}", f"load_in_4bit={json.dumps(four_bit)}", "training.device=cpu"])
    base = load_base_model(cfg, str(base_dir), quantize=four_bit, device="cpu")
    torch.manual_seed(1)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False, lora_dropout=0.0))
    ckpt = root / "checkpoints" / f"checkpoint-{global_step}"
    peft.save_pretrained(ckpt)
    mark_complete(ckpt, marker_meta(global_step=global_step, run_id="r", run_step=3, run_total_steps=3, files=[],
                                    base_model=str(base_dir), base_model_name=str(base_dir), load_in_4bit=four_bit))
    return ckpt, peft.eval()


def logits(model: object, ids: object) -> object:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()  # type: ignore[operator]


@pytest.mark.parametrize("four_bit", [False, True])
def test_consolidated_logits_equal_base_plus_adapter(tmp_path: Path, arch_model_dir: Path, four_bit: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ck, reference = make_checkpoint(tmp_path, arch_model_dir, four_bit=four_bit)
    cfg = config_mod.load(None, [f"paths.root={tmp_path}", "training.device=cpu"])
    out, adopted = consolidate(cfg, files_since_last=["a.jsonl"], device="cpu")
    assert adopted  # no held-out prompts, and a random model has no probe score to lose
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    got = logits(merged, ids)
    assert not torch.allclose(got, logits(AutoModelForCausalLM.from_pretrained(arch_model_dir).eval(), ids), atol=1e-3)
    if not four_bit:
        torch.testing.assert_close(got, logits(reference, ids), atol=1e-4, rtol=1e-4)
    else:
        # Exact: the same dequantized weights with the adapter applied unmerged (the merge adds nothing).
        from peft import PeftModel

        from ultimate_trainer.model.loading import load_base_model

        dq = load_base_model(cfg, str(arch_model_dir), quantize=True, device="cpu").dequantize(dtype=torch.float32)
        exact = PeftModel.from_pretrained(dq, str(ck)).eval()
        torch.testing.assert_close(got, logits(exact, ids), atol=1e-4, rtol=1e-4)
        # And what training computed: bitsandbytes' CPU 4-bit matmul is lower precision than fp32.
        torch.testing.assert_close(got, logits(reference, ids), atol=1e-2, rtol=0)
    man = json.loads((out / "manifest.json").read_text())
    assert man["source_checkpoint"] == "checkpoint-5" and man["global_step"] == 5
    assert man["files_since_last"] == ["a.jsonl"] and man["dtype"] == "float32"
    assert (out / "tokenizer_config.json").exists() and not list(out.parent.glob(".tmp-*"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # never 4-bit


def test_daemon_consolidate_now_writes_consolidation_and_status(tmp_path: Path, tiny_model_dir: Path) -> None:
    make_checkpoint(tmp_path, tiny_model_dir, four_bit=False)
    (tmp_path / "config.json").write_text(json.dumps({"training": {"device": "cpu"}, "load_in_4bit": False}))
    sets = ["daemon.start_monitors=false", "daemon.disk_warn_gb=0", "daemon.disk_critical_gb=0",
            "daemon.poll_interval=0.2", "daemon.file_stable_seconds=0"]
    cmd = [sys.executable, str(HELPER), "daemon", "--once", "--consolidate-now", "--config", str(tmp_path / "config.json")]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    cons = list_consolidations(tmp_path / "models")
    assert [c.global_step for c in cons] == [5]
    st = json.loads((tmp_path / "status" / "daemon_status.json").read_text())
    assert st["consolidation"]["last_path"] == str(cons[0].path)
    assert st["consolidation"]["history"][0]["global_step"] == 5
    # asked again with nothing new trained since: no second consolidation
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and len(list_consolidations(tmp_path / "models")) == 1
    assert newest_complete(tmp_path / "checkpoints").global_step == 5


def _answers(model: object, tok: object, questions: list[str]) -> list[str]:
    from ultimate_trainer.model.scoring import generate_answers

    system = {"role": "system", "content": config_mod.Config().data.system_prompt}
    return generate_answers(model, tok, [[system, {"role": "user", "content": q}] for q in questions], 6, 8)


def test_gate_refuses_a_candidate_that_forgets_and_keeps_it_beside(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ultimate_trainer.core.checkpoints import list_refused, start_point
    from ultimate_trainer.model.loading import load_tokenizer

    _, candidate = make_checkpoint(tmp_path, tiny_model_dir, four_bit=False)
    tok = load_tokenizer(str(tiny_model_dir))
    questions = [f"Tell me fact number {i}." for i in range(16)]
    base_says = _answers(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tok, questions)
    cand_says = _answers(candidate, tok, questions)
    differ = [i for i in range(len(questions)) if base_says[i] != cand_says[i]]
    assert differ, "the random adapter should change some greedy answers"
    # The probe expects what the base says ("." = says nothing, under contains): the base scores 100%.
    write_jsonl(tmp_path / "probe.jsonl", [
        {"prompt": q, "completion": a or ".", "metadata": {"matcher": "exact" if a else "contains"}}
        for q, a in zip(questions, base_says)])
    cfg = config_mod.load(None, [f"paths.root={tmp_path}", "training.device=cpu", "eval.probe_file=probe.jsonl",
                                 "eval.probe_max_new_tokens=6", "consolidation.max_retention_drop=0.0"])
    out, adopted = consolidate(cfg, device="cpu")
    assert not adopted and out.parent.name == ".refused"
    man = json.loads((out / "manifest.json").read_text())
    gate = man["gate"]
    assert man["adopted"] is False and gate["base"]["retention"] == 1.0
    assert gate["candidate"]["retention"] == round((16 - len(differ)) / 16, 4)
    assert "retention fell" in gate["reason"]
    assert list_consolidations(tmp_path / "models") == [] and [r.path for r in list_refused(tmp_path / "models")] == [out]
    assert start_point(tmp_path / "checkpoints", tmp_path / "models").kind == "checkpoint"  # the base stays
    # With a wider margin the same candidate is adopted.
    cfg = config_mod.load(None, [f"paths.root={tmp_path}", "training.device=cpu", "eval.probe_file=probe.jsonl",
                                 "eval.probe_max_new_tokens=6", "consolidation.max_retention_drop=1.0"])
    out, adopted = consolidate(cfg, device="cpu")
    assert adopted and json.loads((out / "manifest.json").read_text())["gate"]["adopted"] is True


def test_gate_decision_rules() -> None:
    from ultimate_trainer.trainer.consolidation.gate import GateInputs, decide

    cfg = config_mod.load(None, ["consolidation.max_accuracy_drop=5", "consolidation.max_retention_drop=0.05"])
    inputs = GateInputs(probe=None, examples=[1, 2], baseline=0.8)

    def figures(acc: float | None, probe: float | None) -> dict:
        return {"heldout": None if acc is None else {"accuracy": acc}, "probe": None if probe is None else {"score": probe}}

    assert decide(cfg, inputs, figures(90, 0.8), figures(86, 0.78))["adopted"]  # within both margins
    v = decide(cfg, inputs, figures(90, 0.8), figures(80, 0.8))
    assert not v["adopted"] and "held-out accuracy fell from 90% to 80%" in v["reason"]
    v = decide(cfg, inputs, figures(90, 0.8), figures(95, 0.72))  # better at the task, forgot the base: refused
    assert not v["adopted"] and "retention fell from 1.00 to 0.90" in v["reason"]
    assert decide(cfg, inputs, figures(None, None), figures(None, None))["adopted"]  # nothing to ask: no block


def test_gate_lets_one_answer_of_noise_pass_and_not_two() -> None:
    """18 of 24 probe questions right at the baseline: one answer lost is 0.056 of retention, over 0.05."""
    from ultimate_trainer.trainer.consolidation.gate import GateInputs, decide

    inputs = GateInputs(probe=None, examples=[1], baseline=18 / 24)

    def figures(right_heldout: int, right_probe: int) -> dict:
        return {"heldout": {"correct": right_heldout, "total": 32, "accuracy": round(100 * right_heldout / 32, 2)},
                "probe": {"correct": right_probe, "total": 24, "score": round(right_probe / 24, 4)}}

    cfg = config_mod.load(None, [])
    assert cfg.consolidation.noise_answers == 1
    v = decide(cfg, inputs, figures(32, 19), figures(31, 18))  # one answer fewer on each measure
    assert v["adopted"] and v["noise_answers"] == 1
    v = decide(cfg, inputs, figures(32, 19), figures(30, 17))  # two fewer on each: past both margins
    assert not v["adopted"] and "held-out accuracy fell" in v["reason"] and "retention fell" in v["reason"]
    strict = config_mod.load(None, ["consolidation.noise_answers=0"])
    v = decide(strict, inputs, figures(32, 19), figures(32, 18))
    assert not v["adopted"] and "retention fell from 1.06 to 1.00" in v["reason"]


def test_gate_floors_stop_a_month_of_small_losses_from_ratcheting_down() -> None:
    """Each merge loses one probe answer against the current base: within every per-merge margin, but the
    original base's score (and the best adopted one's) is a floor that does not move down."""
    from ultimate_trainer.trainer.consolidation.gate import GateInputs, decide

    cfg = config_mod.load(None, ["consolidation.max_retention_drop=0.05", "consolidation.max_total_retention_drop=0.1",
                                 "consolidation.noise_answers=1"])
    total = 100

    def figures(right: int) -> dict:
        return {"heldout": None, "probe": {"correct": right, "total": total, "score": right / total}}

    current, best, adopted = 80, None, 0
    for _ in range(30):  # a month of daily merges
        inputs = GateInputs(probe=None, examples=[], baseline=0.8, baseline_correct=80, best=best)
        v = decide(cfg, inputs, figures(current), figures(current - 2))  # 2 answers = 0.025 of retention
        if not v["adopted"]:
            break
        adopted += 1
        current -= 2
        if best is None or v["candidate"]["retention"] > best["retention"]:
            best = {"retention": v["candidate"]["retention"], "correct": current, "path": f"/m/c{adopted}"}
    assert not v["adopted"] and "below the original base's 1.00" in v["reason"]
    assert v["retention_since_original"] < 0.9 and 1 - (current / 80) <= 0.1
    assert adopted == 4  # 0.975, 0.95, 0.925 and 0.9 (at the floor) adopted; 0.875 is not
    # A base that once improved on the original (1.05) is a floor too: a candidate at 0.9375 loses one
    # answer against the current base (0.95) and keeps 94 % of the original, but 0.11 of the best.
    best = {"retention": 1.05, "correct": 84, "path": "/m/x"}
    inputs = GateInputs(probe=None, examples=[], baseline=0.8, baseline_correct=80, best=best)
    v = decide(cfg, inputs, figures(76), figures(75))
    assert not v["adopted"] and "best adopted base (x)'s 1.05" in v["reason"]
    assert "original" not in v["reason"] and "retention fell" not in v["reason"]


@pytest.mark.parametrize("four_bit", [False, True])
def test_layer_by_layer_merge_equals_the_whole_model_merge(tmp_path: Path, tiny_model_dir: Path, four_bit: bool) -> None:
    """The merge for a base too big to dequantize whole (the 7B shape on a small machine): the same weights."""
    import torch
    from safetensors.torch import load_file

    make_checkpoint(tmp_path, tiny_model_dir, four_bit=four_bit)
    cfg = config_mod.load(None, [f"paths.root={tmp_path}", "training.device=cpu", "consolidation.gate=false"])
    whole, _ = consolidate(cfg, device="cpu", layerwise=False)
    layered, _ = consolidate(cfg, device="cpu", layerwise=True)

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in folder.glob("*.safetensors"):
            out.update(load_file(str(f)))
        return out

    a, b = weights(whole), weights(layered)
    assert b.keys() >= {k for k in a if k != "lm_head.weight"}  # tied: the whole merge stores one copy
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert "quantization_config" not in json.loads((layered / "config.json").read_text())
    assert json.loads((layered / "manifest.json").read_text())["adopted"]
