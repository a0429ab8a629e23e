"""A merged transformers model → one GGUF file for llama.cpp and Ollama, with the gguf library's writer.

Tensor names come from ``gguf.get_tensor_name_map`` (the library's map of Hugging Face names to
llama.cpp's, per ``MODEL_ARCH``), the vocabulary from ``gguf.BpeVocab`` and ``gguf.SpecialVocab``
(merges, special token ids, the chat template). What this module adds are llama.cpp's conventions
that the library leaves to its converter:

- ``llama``: the query and key projections are stored with llama.cpp's rotary layout (each head's
  two halves interleaved); ``qwen2`` keeps Hugging Face's (its rotary embedding is NeoX-style).
- a byte-level BPE tokenizer is ``tokenizer.ggml.model = gpt2``; the pre-tokenizer is named after its
  splitting rules (``pre_tokenizer_name``), since llama.cpp splits text by that name, not by the
  regular expression in ``tokenizer.json``; special added tokens are control tokens, the vocabulary
  is padded to the embedding's rows with unused ``[PAD<i>]`` tokens.
- 1-D tensors (norms, biases) stay float32 whatever ``--quant`` says; a matrix whose rows do not
  divide into the quantization's blocks is written as float16.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


class GGUFExportError(RuntimeError):
    """The model cannot be written as GGUF; the message says why and what is supported."""


def _arch(config: Any) -> tuple[Any, bool]:
    """``(gguf.MODEL_ARCH, whether q/k are permuted)`` of a transformers config."""
    import gguf

    archs = {"LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True), "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False)}
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in archs:
            return archs[name]
    raise GGUFExportError(f"GGUF export supports {', '.join(sorted(archs))}; this model is {names or config.model_type}"
                          " (export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py)")


def _rope_theta(config: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("the model config has no rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise GGUFExportError(f"rope scaling {kind!r} is not supported by the GGUF export (only unscaled rope)")
    return float(theta), params


def llama_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's q/k rows (per head: first half, second half) → llama.cpp's (pairs interleaved)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before merging.

    Recognised by the pre-tokenizer's rules: ``gpt-2`` (ByteLevel with its own regex), ``smollm``
    (each digit apart, then GPT-2's regex: SmolLM2, the built-in model), ``qwen2`` (Qwen2's split
    regex, then ByteLevel without one). Anything else is refused rather than tokenized wrongly.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        if regex == QWEN2_SPLIT:
            return "qwen2"
    raise GGUFExportError(f"unknown pre-tokenizer {kinds} in tokenizer.json: llama.cpp would split text differently "
                          "than this model was trained with (export --format hf and convert with llama.cpp)")


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def add_vocab(writer: Any, tokenizer_dir: Path, n_vocab: int) -> str:
    """Tokens, types, merges, special ids and the chat template of ``tokenizer_dir``; returns the pre-tokenizer."""
    import gguf

    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    try:
        vocab = gguf.BpeVocab(tokenizer_dir)
    except (FileNotFoundError, ValueError) as e:
        raise GGUFExportError(f"the tokenizer is not a byte-level BPE one ({e}); only those are exported") from None
    pre = pre_tokenizer_name(tj)
    added = {t["id"]: t for t in tj.get("added_tokens") or []}
    tokens: list[str] = []
    types: list[int] = []
    for i, (text, _score, _kind) in enumerate(vocab.all_tokens()):
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        a = added.get(i)
        types.append(int(gguf.TokenType.NORMAL if a is None else
                         gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED))
    if len(tokens) > n_vocab:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens, the embedding only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # the embedding's padding rows: never produced by the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise GGUFExportError(f"no BPE merges found in {tokenizer_dir / 'tokenizer.json'}")
    if special.chat_template is None:
        raise GGUFExportError(f"no chat template in {tokenizer_dir}")
    special.add_to_gguf(writer, quiet=True)
    return pre


def _layout(name: str, shape: tuple[int, ...], quant: str) -> tuple[Any, tuple[int, ...], Any]:
    """``(numpy dtype, shape, raw_dtype or None)`` of a tensor as written for ``quant``; a quantized
    tensor's shape is its bytes' (``uint8``), as the gguf library's quantizer returns it."""
    import gguf

    if len(shape) == 1 or quant == "f32":
        return np.float32, shape, None
    if quant == "f16":
        return np.float16, shape, None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        log.info("%s: rows of %d do not divide into blocks of %d; written as f16", name, shape[-1], block)
        return np.float16, shape, None
    return np.uint8, tuple(gguf.quant_shape_to_byte_shape(shape, qtype)), qtype


def _tensor(data: np.ndarray, dtype: Any, raw: Any) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(data.astype(np.float32), raw) if raw is not None else data.astype(dtype)


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}


def estimate_bytes(n_params: int, quant: str) -> int:
    per = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[quant]
    return int(n_params * per) + 64 * 1024**2  # the vocabulary and metadata, generously


def write_gguf(base_path: str | Path, adapter_dir: str | Path | None, tokenizer_dir: Path, path: Path, quant: str,
               name: str, requantize: dict[str, Any] | None = None) -> dict[str, Any]:
    """Base + adapter merged (``model/merging``) and the tokenizer in ``tokenizer_dir``, written to ``path``.

    Tensor by tensor: the header and every tensor's name, shape and type are written first (from the
    safetensors headers), then each merged tensor as it comes; no more than one is held at a time.
    """
    import gguf
    import torch
    from transformers import AutoConfig

    from ultimate_trainer.model import merging

    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    config = AutoConfig.from_pretrained(base_path)
    arch, permute = _arch(config)
    theta, _ = _rope_theta(config)
    n_layers = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(arch, n_layers)
    stored = merging.plan(base_path)
    layout: dict[str, tuple[str, Any, Any]] = {}  # HF name -> (GGUF name, numpy dtype, raw dtype)
    infos = []
    for t in stored:
        if (tied and t.name == "lm_head.weight") or t.name.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        new = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFExportError(f"no GGUF name for tensor {t.name} of {gguf.MODEL_ARCH_NAMES[arch]}")
        dtype, shape, raw = _layout(new, t.shape, quant)
        layout[t.name] = (new, dtype, raw)
        infos.append((new, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize, raw))
    n_vocab = next(t.shape[0] for t in stored if t.name == "model.embed_tokens.weight")

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[quant])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = add_vocab(writer, tokenizer_dir, n_vocab)
    for new, shape, dtype, nbytes, raw in infos:
        writer.add_tensor_info(new, shape, dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for hf_name, t in merging.merged_tensors(base_path, adapter_dir, torch.float32, requantize=requantize,
                                                 tensors=stored):
            if hf_name not in layout:
                continue
            new, dtype, raw = layout[hf_name]
            data = t.numpy()
            del t
            if permute and hf_name.endswith("self_attn.q_proj.weight"):
                data = llama_rope_permute(data, n_head)
            elif permute and hf_name.endswith("self_attn.k_proj.weight"):
                data = llama_rope_permute(data, n_kv)
            writer.write_tensor_data(_tensor(data, dtype, raw))
    finally:
        writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "quant": quant, "tensors": len(infos),
            "tokenizer_pre": pre, "vocab_size": n_vocab}
