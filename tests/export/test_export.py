"""export.py: each format read back by an independent reader answers like the trainer's own model.

The trainer's own model is the base with the checkpoint's adapter attached, unmerged, loaded the way
the workbench and serve.py load it (``model/pool.py``). The readers: transformers for ``hf`` and
``adapter``, llama.cpp (``llama-cpp-python``) and transformers' GGUF loader for ``gguf``. Tiny random
Llama and Qwen2 models with the built-in model's real tokenizer; checkpoints with random LoRA weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from _export_helpers import tiny_model
from _workbench_helpers import add_checkpoint
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.export import exporter, to_gguf
from ultimate_trainer.export.cli import main as export_main
from ultimate_trainer.model.loading import builtin_gguf_path
from ultimate_trainer.model.pool import ModelPool

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"}],
           [{"role": "user", "content": "Name a colour 🎨 and a number: 12345"}]]
NEW_TOKENS = 8


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _project(root: Path, model_dir: Path) -> config_mod.Config:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "base_model": str(model_dir), "load_in_4bit": False, "paths": {"root": str(root)},
        "training": {"device": "cpu"}, "monitor": {"workbench_threads": 1}}))
    add_checkpoint(root, model_dir, 4, "r1", [], 4, 4, seed=3)
    return config_mod.load(root / "config.json")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def project(request, tmp_path_factory):
    model_dir = tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    cfg = _project(tmp_path_factory.mktemp(f"export-{request.param}"), model_dir)
    pool = ModelPool(cfg, capacity=1, threads=1)
    own = pool.get("checkpoint-4")
    return cfg, own


def _own_answers(own) -> list[str]:
    from ultimate_trainer.model.scoring import generate_answers

    return generate_answers(own.model, own.tokenizer, PROMPTS, NEW_TOKENS, batch_size=1)


def _logits(model, tokenizer, messages) -> tuple[list[int], "object"]:
    import torch

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        return ids, model(torch.tensor([ids])).logits[0].float()


def test_hf_export_loads_with_automodel_and_answers_like_the_trained_model(project, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model.scoring import generate_answers

    cfg, own = project
    before = _tree_digest(cfg.path("checkpoints"))
    out = exporter.export(cfg, "latest", "hf", dtype="f32", out=tmp_path / "hf").path
    assert _tree_digest(cfg.path("checkpoints")) == before  # training's files untouched
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == own.tokenizer.chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list)
                                                             else [gen["eos_token_id"]])
    assert generate_answers(model, tokenizer, PROMPTS, NEW_TOKENS, 1) == _own_answers(own)
    manifest = json.loads((out / exporter.MANIFEST).read_text())
    assert manifest["resolved"] == "checkpoint-4" and manifest["format"] == "hf"


def test_bf16_hf_export_stays_within_bf16_rounding_of_the_trained_model(project, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, own = project
    out = exporter.export(cfg, "checkpoint-4", "hf", out=tmp_path / "hf16").path
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"
    ids, theirs = _logits(model, own.tokenizer, PROMPTS[0])
    _, ours = _logits(own.model, own.tokenizer, PROMPTS[0])
    # bf16 keeps 8 bits of mantissa: weights move by up to 2^-9 relative; tolerance stated in docs/EXPORT.md
    assert (theirs - ours).abs().max() <= 0.05 * ours.abs().max()


def test_adapter_export_has_a_portable_base_and_loads_with_peft(project, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model.scoring import generate_answers

    cfg, own = project
    out = exporter.export(cfg, "checkpoint-4", "adapter", out=tmp_path / "ad").path
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == "base"  # a local folder base travels with the adapter
    assert str(Path.home()) not in (out / "adapter" / "adapter_config.json").read_text()
    assert "/" not in acfg["base_model_name_or_path"]
    serving = (out / "SERVING.md").read_text()
    assert "vllm serve ./base --enable-lora --lora-modules ut-checkpoint-4=./adapter" in serving
    assert "ADAPTER ./adapter" in serving
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    assert generate_answers(model, tokenizer, PROMPTS, NEW_TOKENS, 1) == _own_answers(own)


def test_adapter_export_names_a_hub_base_instead_of_copying_it(project, tmp_path):
    cfg, _own = project
    out = exporter.export(cfg, "checkpoint-4", "adapter", out=tmp_path / "hub", base_ref="Qwen/Qwen2.5-7B-Instruct").path
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "Qwen/Qwen2.5-7B-Instruct"
    assert not (out / "base").exists()
    assert "vllm serve Qwen/Qwen2.5-7B-Instruct --enable-lora" in (out / "SERVING.md").read_text()


def test_gguf_export_reads_back_with_transformers_gguf_loader_answering_the_same(project, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model.scoring import generate_answers

    cfg, own = project
    out = exporter.export(cfg, "checkpoint-4", "gguf", quant="f32", out=tmp_path / "g").path
    name = json.loads((out / exporter.MANIFEST).read_text())["file"]
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
    for messages in PROMPTS:  # the tokenizer inside encodes every prompt to the trainer's tokens
        text = own.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == \
            own.tokenizer(text, add_special_tokens=False)["input_ids"]
    # Decoded with the trainer's tokenizer: a random model may pick an embedding's padding row, which
    # transformers' GGUF tokenizer spells [PAD<i>] where the original decodes nothing.
    assert generate_answers(model, own.tokenizer, PROMPTS, NEW_TOKENS, 1) == _own_answers(own)
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{name}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_f16_and_q8_0_gguf_logits_stay_within_the_stated_tolerances(project, tmp_path):
    """Tolerances (docs/EXPORT.md): relative L2 error of the logits over a whole prompt ≤ 1% for f16 and
    ≤ 10% for q8_0, the most likely next token the same at ≥ 85% of positions. These tiny random models,
    whose logits are small beside their weights, measure 0.25% and 5-6% (q4_0: 45%, not offered as exact)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, own = project
    text = own.tokenizer.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([own.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        ours = own.model(ids).logits[0]
    sizes = {}
    for quant, tolerance in (("f16", 0.01), ("q8_0", 0.10)):
        out = exporter.export(cfg, "checkpoint-4", "gguf", quant=quant, out=tmp_path / quant).path
        name = json.loads((out / exporter.MANIFEST).read_text())["file"]
        sizes[quant] = (out / name).stat().st_size
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name)  # dequantized by the reader
        with torch.inference_mode():
            theirs = model(ids).logits[0]
        assert ((theirs - ours).norm() / ours.norm()).item() <= tolerance, quant
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.85, quant
    assert sizes["q8_0"] < sizes["f16"]


def test_gguf_vocabulary_matches_the_one_llama_cpp_wrote_for_the_builtin_model(tmp_path, tiny_model_dir):
    """The tiny model of conftest carries the built-in model's tokenizer: its tokens, types, merges and
    special ids must be those of the built-in GGUF, which llama.cpp's own converter wrote."""
    import gguf

    cfg = _project(tmp_path / "p", tiny_model_dir)
    out = exporter.export(cfg, "checkpoint-4", "gguf", quant="f16", out=tmp_path / "g").path
    ours = gguf.GGUFReader(next(out.glob("*.gguf")))
    ref = gguf.GGUFReader(builtin_gguf_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    # The original splits digits one by one ("smollm"); the tokenizer transformers rebuilt from that GGUF,
    # which training uses, does not: the export names the splitting training used.
    assert ref.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert ours.fields["general.architecture"].contents() == "llama"
    assert {t.name for t in ours.tensors} <= {t.name for t in ref.tensors}  # llama.cpp's own tensor names


def test_llama_rope_permutation_interleaves_each_heads_halves():
    import numpy as np

    w = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)  # 2 heads of 4 rows: [a0 a1 b0 b1] per head
    out = to_gguf.llama_rope_permute(w, n_head=2)
    assert out[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]  # rows a0 b0 a1 b1, per head


def test_gguf_export_runs_in_llama_cpp_with_the_same_greedy_tokens(project, tmp_path):
    """llama.cpp itself reads the file: the same prompt tokens and the same greedy continuation."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional: docs/EXPORT.md)")
    import numpy as np
    import torch

    cfg, own = project
    out = exporter.export(cfg, "checkpoint-4", "gguf", quant="f32", out=tmp_path / "lc").path
    llm = llama_cpp.Llama(model_path=str(next(out.glob("*.gguf"))), n_ctx=256, n_threads=1, verbose=False,
                          logits_all=True)
    assert llm.metadata["tokenizer.chat_template"] == own.tokenizer.chat_template
    for messages in PROMPTS:
        text = own.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = own.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        theirs: list[int] = []
        while len(theirs) < NEW_TOKENS and (not theirs or theirs[-1] != own.tokenizer.eos_token_id):
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))  # greedy on llama.cpp's own logits
            llm.eval([theirs[-1]])
        with torch.inference_mode():
            ours = own.model(torch.tensor([ids])).logits[0].numpy()
        rel = np.linalg.norm(llm.scores[:len(ids), :ours.shape[1]] - ours) / np.linalg.norm(ours)
        assert rel < 0.01  # the prompt's logits: float32 weights, llama.cpp's kernels
        with torch.inference_mode():
            gen = own.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert theirs == gen[0, len(ids):].tolist()


def test_an_export_that_the_disk_cannot_hold_is_refused_before_writing(project, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    cfg, _own = project
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1024, 1024))  # a full disk
    rc = export_main(["--config", str(cfg.path("root") / "config.json"), "--model", "checkpoint-4", "--format", "hf",
                      "--out", str(tmp_path / "full")])
    assert rc == 1
    assert "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "full").exists() and not list(tmp_path.glob(".tmp-*"))


def test_unknown_names_and_impossible_formats_are_one_line_errors(project, tmp_path, capsys):
    cfg, _own = project
    conf = str(cfg.path("root") / "config.json")
    assert export_main(["--config", conf, "--model", "checkpoint-999", "--format", "hf"]) == 1
    assert "no complete checkpoint named checkpoint-999" in capsys.readouterr().err
    assert export_main(["--config", conf, "--model", "base", "--format", "adapter"]) == 1
    assert "has no adapter" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert export_main(["--config", conf, "--model", "base", "--format", "hf", "--out", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_failed_export_leaves_no_folder_behind(tmp_path):
    """A model the GGUF writer refuses midway (linear rope scaling) leaves neither the export nor its temp folder."""
    model_dir = tiny_model(tmp_path / "model", "llama")
    conf = json.loads((model_dir / "config.json").read_text())
    theta = (conf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    conf["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": theta}
    (model_dir / "config.json").write_text(json.dumps(conf))
    cfg = _project(tmp_path / "p", model_dir)
    (tmp_path / "out").mkdir()
    with pytest.raises(to_gguf.GGUFExportError, match="rope scaling 'linear' is not supported"):
        exporter.export(cfg, "checkpoint-4", "gguf", out=tmp_path / "out" / "x")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.e2e
def test_the_builtin_model_exported_as_gguf_answers_like_the_trainer_in_a_gguf_reader(tmp_path, builtin_model_dir):
    """The real SmolLM2-135M-Instruct with a LoRA checkpoint: f16 GGUF, read by llama.cpp when installed
    (else transformers' GGUF loader), gives the trainer's greedy tokens on held-out prompts."""
    import torch

    from safetensors.torch import load_file, save_file

    cfg = _project(tmp_path / "p", builtin_model_dir)
    # A trained adapter's size, not the helper's deliberately loud one: at that size (changes 100x the
    # weights) attention saturates and any two correct kernels pick different positions.
    weights = cfg.path("checkpoints") / "checkpoint-4" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1e-3 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    own = ModelPool(cfg, capacity=1, threads=2).get("checkpoint-4")
    base = ModelPool(cfg, capacity=1, threads=2).get("base")
    out = exporter.export(cfg, "checkpoint-4", "gguf", quant="f16", out=tmp_path / "g").path
    path = next(out.glob("*.gguf"))
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is None:
        from transformers import AutoModelForCausalLM

        reader = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32)
    else:
        reader = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, logits_all=True,
                                 type_k=0, type_v=0)  # a float32 KV cache: llama.cpp's f16 default rounds
    for messages in PROMPTS:
        text = own.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = own.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ours = own.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):]
            assert not torch.equal(own.model(torch.tensor([ids])).logits, base.model(torch.tensor([ids])).logits)
        if llama_cpp is None:
            with torch.inference_mode():
                theirs = reader.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):]
            assert theirs.tolist() == ours.tolist()
        else:
            import numpy as np

            assert reader.tokenize(text.encode(), add_bos=False, special=True) == ids
            reader.reset()
            reader.eval(ids)
            got: list[int] = []
            while len(got) < len(ours):
                got.append(int(np.argmax(reader.scores[reader.n_tokens - 1])))
                reader.eval([got[-1]])
            assert got == ours.tolist()


def test_a_checkpoint_trained_on_the_4bit_base_is_merged_into_the_weights_it_computed_with(tmp_path):
    """load_in_4bit: the base is loaded in NF4 as training had it, dequantized, then merged; the hf export
    answers like the 4-bit base + adapter that was trained, and unlike a merge into the unquantized base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ultimate_trainer.core.status import atomic_write_json
    from ultimate_trainer.model.loading import load_base_model, load_tokenizer

    model_dir = tiny_model(tmp_path / "model", "llama")
    cfg = _project(tmp_path / "p", model_dir)
    marker = cfg.path("checkpoints") / "checkpoint-4" / "ut_checkpoint.json"
    atomic_write_json(marker, {**json.loads(marker.read_text()), "load_in_4bit": True})
    trained = PeftModel.from_pretrained(load_base_model(cfg, str(model_dir), quantize=True, device="cpu"),
                                        cfg.path("checkpoints") / "checkpoint-4").eval()
    out = exporter.export(cfg, "checkpoint-4", "hf", dtype="f32", out=tmp_path / "hf").path
    assert json.loads((out / exporter.MANIFEST).read_text())["trained_in_4bit"] is True
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = load_tokenizer(str(model_dir))
    text = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        ours, theirs = trained(ids).logits[0], exported(ids).logits[0]
        unquantized = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                                cfg.path("checkpoints") / "checkpoint-4")(ids).logits[0]
    err = ((theirs - ours).norm() / ours.norm()).item()
    assert err < 0.01  # the 4-bit kernels vs the same weights dequantized: float rounding only
    assert ((unquantized - ours).norm() / ours.norm()).item() > 10 * err  # the quantization does show
