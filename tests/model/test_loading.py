"""Base model resolution and the 4-bit LoRA path on this CPU."""

from __future__ import annotations

import pytest
import torch

from ultimate_trainer.core import config
from ultimate_trainer.model.loading import ModelError, attach_lora, load_base_model, load_tokenizer, resolve_base


def tiny_cfg(path, **sets):
    return config.load(None, [f"base_model={path}", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
                              'lora.target_modules=["q_proj","v_proj"]', "training.gradient_checkpointing=false",
                              *[f"{k}={v}" for k, v in sets.items()]])


def test_builtin_model_is_converted_once_and_keeps_its_chat_template(builtin_model_dir, tmp_path):
    cfg = config.load(None, ["base_model=smollm2-135m-instruct", f"paths.model_cache={builtin_model_dir.parent}"])
    assert resolve_base(cfg) == str(builtin_model_dir)
    assert not (builtin_model_dir / "model.safetensors").is_symlink()
    tok = load_tokenizer(resolve_base(cfg))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_tokenizer_read_without_auto_classes_equals_autotokenizer(builtin_model_dir):
    from transformers import AutoTokenizer

    ours, auto = load_tokenizer(str(builtin_model_dir)), AutoTokenizer.from_pretrained(builtin_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, 世界 <b>x</b>?"},
                {"role": "assistant", "content": "Fine: 42 ✓"}]
    for tok in (ours, auto):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    assert ours.apply_chat_template(messages, tokenize=False) == auto.apply_chat_template(messages, tokenize=False)
    text = ours.apply_chat_template(messages, tokenize=False)
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert (ours.eos_token_id, ours.pad_token_id) == (auto.eos_token_id, auto.pad_token_id)


def test_folder_that_is_not_a_model_is_a_clear_model_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base(tiny_cfg(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_base(tiny_cfg(tmp_path / "nope"))


def test_4bit_layers_stay_trainable_after_an_evaluation(tiny_model_dir):
    """An eval-mode forward must not leave bitsandbytes' CPU layers on a kernel without autograd."""
    from bitsandbytes.nn import Linear4bit

    cfg = tiny_cfg(tiny_model_dir, load_in_4bit="true")
    model = load_base_model(cfg, str(tiny_model_dir), quantize=True, device="cpu")
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    model = attach_lora(cfg, model)
    ids = torch.randint(0, 1000, (2, 16))
    model.eval()
    with torch.inference_mode():
        model(input_ids=ids[:1, :1])  # generation-like: one token, no grad
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_base_stored_in_4bit_computes_in_the_configured_dtype(tiny_model_dir, tmp_path):
    """transformers keeps the dtypes saved with a pre-quantized base (bf16 here); the config's applies."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    stored = tmp_path / "nf4-base"
    AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16)).save_pretrained(stored)
    cfg = tiny_cfg(stored, load_in_4bit="true", **{"quantization.compute_dtype": "float32"})
    model = load_base_model(cfg, str(stored), quantize=True, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.compute_dtype == torch.float32 for m in layers)
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    seen = []
    hook = layers[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    model(input_ids=torch.randint(0, 1000, (1, 8)))
    hook.remove()
    assert seen == [torch.float32]


def test_half_precision_compute_on_a_cpu_without_native_bf16_is_warned_once(monkeypatch, caplog):
    import bitsandbytes.functional as bnbf

    from ultimate_trainer.model import loading

    cfg = config.load(None, ["quantization.compute_dtype=bfloat16"])
    for native, warned in ((True, False), (False, True)):
        monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: native)
        monkeypatch.setattr(loading, "_warned_cpu_dtypes", set())
        caplog.clear()
        assert loading.compute_dtype(cfg, "cpu") == torch.bfloat16
        loading.compute_dtype(cfg, "cpu")
        assert sum("without native bf16" in r.getMessage() for r in caplog.records) == (1 if warned else 0)
    caplog.clear()
    assert loading.compute_dtype(config.load(None, []), "cpu") == torch.float32  # auto: never warned
    assert not caplog.records
