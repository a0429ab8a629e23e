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


def _tensor(name: str, data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """``(array, raw_dtype or None)`` as written for ``quant``."""
    import gguf

    if data.ndim == 1 or quant == "f32":
        return data.astype(np.float32), None
    if quant == "f16":
        return data.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        log.info("%s: rows of %d do not divide into blocks of %d; written as f16", name, data.shape[-1], block)
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}


def estimate_bytes(n_params: int, quant: str) -> int:
    per = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[quant]
    return int(n_params * per) + 64 * 1024**2  # the vocabulary and metadata, generously


def write_gguf(model: Any, tokenizer_dir: Path, path: Path, quant: str, name: str) -> dict[str, Any]:
    """Write ``model`` (a merged transformers causal LM) and the tokenizer in ``tokenizer_dir`` to ``path``."""
    import gguf

    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    config = model.config
    arch, permute = _arch(config)
    theta, _ = _rope_theta(config)
    n_layers = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    state = model.state_dict()
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    tied = bool(getattr(config, "tie_word_embeddings", False))

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

    names = gguf.get_tensor_name_map(arch, n_layers)
    written = 0
    for hf_name, t in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFExportError(f"no GGUF name for tensor {hf_name} of {gguf.MODEL_ARCH_NAMES[arch]}")
        data = t.detach().float().cpu().numpy()
        if permute and hf_name.endswith("self_attn.q_proj.weight"):
            data = llama_rope_permute(data, n_head)
        elif permute and hf_name.endswith("self_attn.k_proj.weight"):
            data = llama_rope_permute(data, n_kv)
        array, raw = _tensor(new, data, quant)
        writer.add_tensor(new, array, raw_dtype=raw)
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "quant": quant, "tensors": written,
            "tokenizer_pre": pre, "vocab_size": n_vocab}
