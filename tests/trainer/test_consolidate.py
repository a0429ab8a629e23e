"""Consolidation: the merged model's logits equal base + adapter; the daemon runs it when asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core.checkpoints import list_consolidations, mark_complete, marker_meta, newest_complete
from ultimate_trainer.trainer.consolidate import consolidate

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
def test_consolidated_logits_equal_base_plus_adapter(tmp_path: Path, tiny_model_dir: Path, four_bit: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ck, reference = make_checkpoint(tmp_path, tiny_model_dir, four_bit=four_bit)
    cfg = config_mod.load(None, [f"paths.root={tmp_path}", "training.device=cpu"])
    out, adopted = consolidate(cfg, files_since_last=["a.jsonl"], device="cpu")
    assert adopted  # no held-out prompts, and a random model has no probe score to lose
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    got = logits(merged, ids)
    assert not torch.allclose(got, logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), ids), atol=1e-3)
    if not four_bit:
        torch.testing.assert_close(got, logits(reference, ids), atol=1e-4, rtol=1e-4)
    else:
        # Exact: the same dequantized weights with the adapter applied unmerged (the merge adds nothing).
        from peft import PeftModel

        from ultimate_trainer.model.loading import load_base_model

        dq = load_base_model(cfg, str(tiny_model_dir), quantize=True, device="cpu").dequantize(dtype=torch.float32)
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
