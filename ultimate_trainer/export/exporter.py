"""Export a model by name to the formats serving engines load (docs/EXPORT.md).

- ``hf``: base + adapter merged (a 4-bit-trained base dequantized first, the merge in float32, then
  cast) into a bf16/fp16/f32 safetensors folder with the tokenizer, its chat template and a
  generation config that stops at the template's end of turn: ``AutoModelForCausalLM``, vLLM, SGLang.
- ``adapter``: the checkpoint's PEFT adapter whose ``base_model_name_or_path`` is portable (the Hub
  id when the adapter sits on the configured Hub base; otherwise ``base``, a copy of the base weights
  beside it), plus SERVING.md with the vLLM and Ollama command lines.
- ``gguf``: the merged model as one GGUF file (to_gguf.py) with an Ollama ``Modelfile`` beside it.

An export only reads what training uses (checkpoints, consolidations, the base) and writes one
folder: built as a hidden temp sibling, then renamed, so it is complete or absent. It refuses before
loading anything when the disk cannot hold the estimated size.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.core.checkpoints import ModelSpec
from ultimate_trainer.core.config import BUILTIN_MODEL, Config
from ultimate_trainer.core.status import atomic_write_json, atomic_write_text
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.export import to_gguf
from ultimate_trainer.model.pool import resolve

log = logging.getLogger(__name__)

FORMATS = ("hf", "adapter", "gguf")
DTYPES = ("bf16", "f16", "f32")
MANIFEST = "ut_export.json"
GiB = 1024**3
RESERVE = 256 * 1024**2  # left free on the disk after the export


class ExportError(RuntimeError):
    """The export cannot be made; the message is one line and says what to do."""


@dataclass
class Export:
    path: Path
    format: str
    spec: ModelSpec
    manifest: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- sizes and the disk

def count_parameters(model_dir: str | Path) -> int:
    """Parameters in a model folder's safetensors files, read from their headers (no weights loaded)."""
    from safetensors import safe_open

    from ultimate_trainer.model.loading import weights_bytes

    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:  # .bin weights: assume 16-bit, the usual case
        return weights_bytes(model_dir) // 2
    for f in files:
        with safe_open(f, "np") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def estimate_bytes(fmt: str, n_params: int, *, dtype: str, quant: str, base_copy: int, adapter: int) -> int:
    if fmt == "hf":
        return n_params * (4 if dtype == "f32" else 2) + 64 * 1024**2
    if fmt == "adapter":
        return adapter + base_copy + 16 * 1024**2
    return to_gguf.estimate_bytes(n_params, quant)


def check_disk(folder: Path, need: int) -> None:
    """ExportError unless ``folder``'s disk holds ``need`` bytes and still keeps ``RESERVE`` free."""
    free = shutil.disk_usage(folder).free
    if free < need + RESERVE:
        raise ExportError(f"not enough disk space in {folder}: this export needs about {need / GiB:.2f} GiB "
                          f"(+{RESERVE / GiB:.2f} GiB kept free), {free / GiB:.2f} GiB are free; free some space "
                          "or write it elsewhere with --out")


# --------------------------------------------------------------------------- the formats

def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", key).strip("-")


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hugging Face Hub id (``org/model``), not a path or the built-in name."""
    if not name or name == BUILTIN_MODEL or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return None
    return None if Path(name).exists() else name


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]


def _requantize(cfg: Config, spec: ModelSpec) -> dict[str, Any] | None:
    """The NF4 round trip of a checkpoint trained on the 4-bit base (stored in full precision), as the
    4-bit loader on this machine's CPU applies it; None when the weights trained on are the stored ones."""
    if not (spec.quantized and spec.adapter is not None):
        return None
    from ultimate_trainer.model.loading import compute_dtype

    return {"quant_type": cfg.quantization.quant_type, "double_quant": cfg.quantization.double_quant,
            "dtype": compute_dtype(cfg, "cpu")}


def _threads(cfg: Config) -> None:
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), cfg.monitor.workbench_threads)))


def _write_hf(cfg: Config, spec: ModelSpec, base_path: str, tmp: Path, dtype: str) -> dict[str, Any]:
    from transformers import AutoConfig, GenerationConfig

    from ultimate_trainer.model.loading import load_tokenizer
    from ultimate_trainer.model.merging import write_merged
    from ultimate_trainer.model.scoring import stop_token_ids

    _threads(cfg)
    tokenizer = load_tokenizer(base_path)
    write_merged(base_path, spec.adapter, tmp, _torch_dtype(dtype), requantize=_requantize(cfg, spec))
    try:
        gen = GenerationConfig.from_pretrained(base_path)
    except OSError:  # no generation_config.json: the one transformers derives from the config
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(tmp))
    gen.eos_token_id = stop_token_ids(tokenizer) or gen.eos_token_id  # engines stop at the end of the turn
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"dtype": dtype, "stop_token_ids": gen.eos_token_id}


def _copy_model_files(src: Path, dest: Path) -> None:
    """A model folder's weights, config and tokenizer files (not this project's manifests)."""
    dest.mkdir(parents=True)
    skip = {"manifest.json", "ut_cache.json", "ut_checkpoint.json", MANIFEST}
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in skip and f.suffix in (".safetensors", ".json", ".jinja", ".txt", ".model"):
            shutil.copy2(f, dest / f.name)


def _write_adapter(cfg: Config, spec: ModelSpec, base_path: str, tmp: Path, base_ref: str | None,
                   name: str) -> dict[str, Any]:
    adapter = Path(spec.adapter or "")
    hub = base_ref or (_hub_id(spec.base_name) if _on_configured_base(spec) else None)
    if hub is None:
        _copy_model_files(Path(base_path), tmp / "base")
        ref = "base"
    else:
        ref = hub
    (tmp / "adapter").mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(adapter / f, tmp / "adapter" / f)
    acfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    acfg["base_model_name_or_path"] = ref
    atomic_write_json(tmp / "adapter" / "adapter_config.json", acfg)
    atomic_write_text(tmp / "SERVING.md", serving_text(name, ref, int(acfg.get("r") or 16), spec.quantized,
                                                       included=hub is None))
    return {"base": ref, "base_included": hub is None, "lora_rank": acfg.get("r")}


def _on_configured_base(spec: ModelSpec) -> bool:
    """Whether the adapter was trained on the configured base_model itself (not on a consolidation)."""
    base = Path(spec.base) if spec.base else None
    return base is None or base.parent.name not in ("consolidated", ".refused", ".rolled-back")


def serving_text(name: str, base_ref: str, rank: int, quantized: bool, included: bool) -> str:
    """The command lines to serve an adapter export, run from the export folder."""
    base = "./base" if included else base_ref
    rank_flag = f" --max-lora-rank {rank}" if rank > 16 else ""
    bnb = " --quantization bitsandbytes" if quantized else ""
    lines = [
        f"# Serving {name}",
        "",
        "Run these from this folder." + (" `base/` is the base the adapter was trained on (this machine's "
                                         "copy; no public name holds these exact weights)." if included else
                                         f" The base is `{base_ref}` from the Hugging Face Hub."),
        "" if not quantized else "\nThe adapter was trained on the base loaded in 4-bit (NF4): "
        "`--quantization bitsandbytes` serves it on the same weights.\n",
        "## vLLM (OpenAI-compatible server, the adapter as a LoRA module)",
        "",
        "```",
        f"vllm serve {base}{bnb} --enable-lora --lora-modules {name}=./adapter{rank_flag}",
        "```",
        "",
        f"Ask for `\"model\": \"{name}\"`. To load a newer adapter into a running server without a restart:",
        "",
        "```",
        f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve {base}{bnb} --enable-lora{rank_flag}",
        "curl -X POST http://localhost:8000/v1/load_lora_adapter -H 'Content-Type: application/json' \\",
        f"  -d '{{\"lora_name\": \"{name}\", \"lora_path\": \"'\"$PWD\"'/adapter\"}}'",
        "```",
        "",
        "## Ollama (`ADAPTER`)",
        "",
        "```",
        f"printf 'FROM {base}\\nADAPTER ./adapter\\n' > Modelfile",
        f"ollama create {name} -f Modelfile && ollama run {name}",
        "```",
        "",
        "Ollama reads safetensors adapters for Llama, Mistral and Gemma bases; for a Qwen2 base export "
        "`--format gguf` instead (the merged model in one file).",
        "",
    ]
    return "\n".join(lines)


CHATML_OLLAMA = '''TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
PARAMETER stop "<|im_end|>"
'''


def modelfile_text(gguf_name: str, chat_template: str, system: str | None) -> str:
    """An Ollama Modelfile beside the GGUF: ``FROM`` it, and for ChatML the template spelled out."""
    text = f"FROM ./{gguf_name}\n"
    if "<|im_start|>" in chat_template:
        text += CHATML_OLLAMA
        if system:
            text += f'SYSTEM """{system}"""\n'
    return text


def _default_system(tokenizer: Any) -> str | None:
    """The system message the chat template adds when a chat has none (SmolLM2's does), else None."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return m.group(1) if m else None


def _write_gguf(cfg: Config, spec: ModelSpec, base_path: str, tmp: Path, quant: str, name: str) -> dict[str, Any]:
    from ultimate_trainer.model.loading import load_tokenizer

    tokenizer = load_tokenizer(base_path)
    tok_dir = tmp / ".tokenizer"
    tokenizer.save_pretrained(tok_dir)  # tokenizer.json + chat template, whatever the base folder held
    _threads(cfg)
    file_name = f"{name}.{quant}.gguf"
    info = to_gguf.write_gguf(base_path, spec.adapter, tok_dir, tmp / file_name, quant, name,
                              requantize=_requantize(cfg, spec))
    shutil.rmtree(tok_dir)
    atomic_write_text(tmp / "Modelfile", modelfile_text(file_name, tokenizer.chat_template,
                                                        _default_system(tokenizer)))
    return {"file": file_name, **info}


# --------------------------------------------------------------------------- one export

def export(cfg: Config, key: str, fmt: str, *, quant: str = "f16", dtype: str = "bf16", out: str | Path | None = None,
           base_ref: str | None = None) -> Export:
    """Export the model named ``key`` as ``fmt``; returns where it is. ExportError/ModelError/ValueError: why not."""
    from ultimate_trainer.model.loading import resolve_base, weights_bytes

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if fmt == "gguf" and quant not in to_gguf.QUANTS:
        raise ExportError(f"--quant {quant!r}: choose one of {', '.join(to_gguf.QUANTS)}")
    spec = resolve(cfg, key)
    if fmt == "adapter" and spec.adapter is None:
        raise ExportError(f"{spec.label} has no adapter (a consolidation's is merged into its weights, the base "
                          "has none): export it with --format hf or gguf, or name a checkpoint")
    name = f"ut-{_slug(spec.key.removeprefix('consolidated/'))}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = {"hf": dtype, "adapter": "adapter", "gguf": quant}[fmt]
    final = Path(out).expanduser() if out else cfg.path("root") / "exports" / f"{name}-{fmt}-{suffix}-{stamp}"
    final = final if final.is_absolute() else Path.cwd() / final
    if final.exists():
        raise ExportError(f"{final} already exists: choose another --out (an export never overwrites)")
    final.parent.mkdir(parents=True, exist_ok=True)

    base_path = spec.base or resolve_base(cfg)
    adapter_bytes = weights_bytes(spec.adapter) if spec.adapter else 0
    need = estimate_bytes(fmt, count_parameters(base_path), dtype=dtype, quant=quant,
                          base_copy=weights_bytes(base_path), adapter=adapter_bytes)
    check_disk(final.parent, need)

    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    t0 = time.monotonic()
    log.info("exporting %s as %s into %s (about %.2f GiB)", spec.label, fmt, final, need / GiB)
    try:
        tmp.mkdir()
        if fmt == "hf":
            info = _write_hf(cfg, spec, base_path, tmp, dtype)
        elif fmt == "adapter":
            info = _write_adapter(cfg, spec, base_path, tmp, base_ref, name)
        else:
            info = _write_gguf(cfg, spec, base_path, tmp, quant, name)
        manifest = {"schema_version": 1, "format": fmt, "model": key, "resolved": spec.key, "label": spec.label,
                    "global_step": spec.global_step, "base_model_name": spec.base_name,
                    "trained_in_4bit": spec.quantized, "seconds": round(time.monotonic() - t0, 1),
                    "created_at": now_iso(), **info}
        atomic_write_json(tmp / MANIFEST, manifest)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own half-written temp folder, never anything else
        raise
    log.info("exported %s in %.1f s: %s", spec.label, time.monotonic() - t0, final)
    return Export(final, fmt, spec, manifest)
