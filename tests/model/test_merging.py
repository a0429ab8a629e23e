"""model/merging.py: the streaming merge holds a layer or two, never the model, and merges like PEFT.

Memory is asserted by count, not by RSS: an instrumented loader (``safetensors.safe_open``) and an
instrumented ``merged_tensors`` register every tensor they hand out with a ``weakref.finalize``, so
the tensors alive at any moment are known; the test records the most layers they ever spanned while
``export.py`` wrote an 8-layer model as ``hf`` (shards of one layer's bytes) and as ``gguf``.
"""

from __future__ import annotations

import json
import re
import weakref
from pathlib import Path

import pytest

from _export_helpers import tiny_model
from _workbench_helpers import add_checkpoint
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.export import exporter
from ultimate_trainer.model import merging

LAYERS = 8


class Live:
    """Tensors handed out and not yet freed, by the part of the model they belong to."""

    def __init__(self) -> None:
        self.alive: dict[int, str] = {}
        self.most: set[str] = set()  # the most parts alive together (layers, embedding, norm)
        self.layers = 0              # the most layers alive together
        self.handed = 0

    def add(self, name: str, tensor) -> None:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        part = f"layer {m.group(1)}" if m else name.removesuffix(".weight")
        key = id(tensor)
        self.alive[key] = part
        weakref.finalize(tensor, self.alive.pop, key, None)
        self.handed += 1
        parts = set(self.alive.values())
        if len(parts) > len(self.most):
            self.most = parts
        self.layers = max(self.layers, sum(p.startswith("layer ") for p in parts))


@pytest.fixture
def live(monkeypatch) -> Live:
    import safetensors

    tracker = Live()
    real_open, real_merged = safetensors.safe_open, merging.merged_tensors

    class Handle:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            t = self.inner.get_tensor(name)
            tracker.add(name, t)
            return t

    def merged(*args, **kwargs):
        for name, t in real_merged(*args, **kwargs):
            tracker.add(name, t)
            yield name, t

    monkeypatch.setattr(safetensors, "safe_open", Handle)
    monkeypatch.setattr(merging, "merged_tensors", merged)
    return tracker


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model_dir = tiny_model(root / "model", "llama", layers=LAYERS)
    (root / "config.json").write_text(json.dumps({
        "base_model": str(model_dir), "load_in_4bit": False, "paths": {"root": str(root)},
        "training": {"device": "cpu"}, "monitor": {"workbench_threads": 1}}))
    add_checkpoint(root, model_dir, 4, "r1", [], 4, 4, seed=3)
    return config_mod.load(root / "config.json"), model_dir


def _layer_bytes(model_dir: Path, itemsize: int) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(itemsize * f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1]
                   for k in f.keys() if k.startswith("model.layers.0."))


def test_hf_export_holds_at_most_two_layers_and_equals_peft_merge(project, live, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg, model_dir = project
    monkeypatch.setattr(merging, "SHARD_BYTES", _layer_bytes(model_dir, 4))  # f32 out: a shard per layer
    out = exporter.export(cfg, "checkpoint-4", "hf", dtype="f32", out=tmp_path / "hf").path
    assert live.handed > 9 * LAYERS  # every weight passed through the instruments
    # The parts alive together: a layer being merged, the shard being filled (at most two layers),
    # never the model (LAYERS layers + embedding + norm). Before, export held all of them at once.
    assert live.layers <= 2, live.most
    assert len(live.most) <= 3, live.most
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= LAYERS and (out / "model.safetensors.index.json").is_file()
    ours = {}
    for f in shards:
        ours.update(load_file(str(f)))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                     cfg.path("checkpoints") / "checkpoint-4").merge_and_unload()
    theirs = peft.state_dict()
    assert ours.keys() == {k for k in theirs if k != "lm_head.weight"}  # tied: stored once
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k  # float32: PEFT's own merge, bit for bit


def test_gguf_export_holds_at_most_two_layers(project, live, tmp_path):
    cfg, _model_dir = project
    out = exporter.export(cfg, "checkpoint-4", "gguf", quant="q8_0", out=tmp_path / "g").path
    assert json.loads((out / exporter.MANIFEST).read_text())["tensors"] == 9 * LAYERS + 2
    assert live.handed > 9 * LAYERS
    assert live.layers <= 2, live.most


def test_an_adapter_module_the_base_lacks_is_a_merge_error(project, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    cfg, model_dir = project
    adapter = tmp_path / "adapter"
    shutil.copytree(cfg.path("checkpoints") / "checkpoint-4", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors = {k.replace("layers.0.", f"layers.{LAYERS}."): v for k, v in tensors.items()}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (tmp_path / "out").mkdir()
    with pytest.raises(merging.MergeError, match=f"layers.{LAYERS}.self_attn"):
        merging.write_merged(model_dir, adapter, tmp_path / "out", __import__("torch").float32)
