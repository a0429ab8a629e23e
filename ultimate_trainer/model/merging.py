"""Base + LoRA adapter merged one stored tensor at a time: the one merge of exports and consolidations.

``merged_tensors`` reads the base's safetensors shards as stored, one shard open at a time and one
tensor at a time, in the model's own order (its ``state_dict``'s, as ``save_pretrained`` writes it):

- a weight stored in 4-bit (with its quantization state) is dequantized with bitsandbytes, the same
  function its layers compute with;
- a full-precision weight of a base that was *trained* in 4-bit (``requantize``) goes through the
  same NF4 round trip the 4-bit loader applies, so the merge equals what was trained;
- where the adapter has the module, ``scale * B @ A`` is added in float32 (PEFT's merge);
- the result is cast to the requested dtype and handed on.

Nothing but that tensor (and the adapter, a few MB) is in full precision at any moment. Its readers:
``write_merged`` (a Hugging Face model folder, written shard by shard: one output shard of at most
``SHARD_BYTES`` in the output dtype is held) and the GGUF writer (export/to_gguf.py, tensor by
tensor). ``plan`` gives every tensor's name, shape and stored dtype from the headers alone, so
writers can lay out their files before the first weight is read.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ultimate_trainer.core.progress import Progress
from ultimate_trainer.core.status import atomic_write_json
from ultimate_trainer.model.loading import ModelError

SHARD_BYTES = 1024**3  # an output shard: two layers of a 7B model in bf16 (vLLM and transformers read any count)
STATE_MARK = ".weight."  # bitsandbytes stores a 4-bit weight's quantization state as <weight>.<part>
INT_BYTES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "BOOL": 1}


class MergeError(ModelError):
    """The adapter does not fit the base (a module the base has no weight for)."""


@dataclass(frozen=True)
class Stored:
    """One tensor of the merged model: where the base stores it, its shape (dequantized) and dtype."""

    name: str
    shard: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name of the stored dtype (U8 for a 4-bit weight: the merge makes it float)


def lora_deltas(adapter_dir: str | Path) -> tuple[dict[str, tuple[Any, Any]], float]:
    """``{module name in the base: (A, B)}`` of a PEFT LoRA adapter and its scale (alpha / r, or rsLoRA's)."""
    from safetensors.torch import load_file

    adapter = Path(adapter_dir)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = conf["r"], conf["lora_alpha"]
    scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(adapter / "adapter_model.safetensors")).items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
    return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}, scale


def _meta_model(base_path: str | Path) -> Any:
    """The base's architecture on the meta device (no weights): names, order and shapes of its tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def quantized_linears(model: Any) -> set[str]:
    """Weights bitsandbytes turns to 4-bit when this base is loaded so: every Linear but the output layer."""
    import torch

    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _shards(base_path: Path) -> list[str]:
    index = base_path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base_path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ModelError(f"{base_path} has no safetensors weights (model.safetensors or an index): merging reads "
                     "them as stored")


def plan(base_path: str | Path, meta: Any = None) -> list[Stored]:
    """Every tensor the merged model will have, in the order ``merged_tensors`` yields them (headers only).

    Shard by shard; within a shard in the model's ``state_dict`` order (a tensor the model does not
    name comes after, by name). A tied output projection that the base does not store is not listed.
    """
    from safetensors import safe_open

    src = Path(base_path)
    meta = meta if meta is not None else _meta_model(src)
    state = meta.state_dict()
    order = {name: i for i, name in enumerate(state)}
    out: list[Stored] = []
    for shard in _shards(src):
        with safe_open(str(src / shard), framework="pt") as f:
            names = [k for k in f.keys() if STATE_MARK not in k]
            names.sort(key=lambda k: (order.get(k, len(order)), k))
            for k in names:
                piece = f.get_slice(k)
                shape = tuple(state[k].shape) if k in state else tuple(piece.get_shape())
                out.append(Stored(k, shard, shape, piece.get_dtype()))
    return out


def merged_tensors(base_path: str | Path, adapter_dir: str | Path | None, dtype: Any, *,
                   requantize: dict[str, Any] | None = None, should_stop: Callable[[], bool] | None = None,
                   tensors: list[Stored] | None = None, meta: Any = None,
                   on_update: Callable[[dict[str, Any]], None] | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` of base + adapter merged, one at a time, in ``plan``'s order, cast to ``dtype``.

    ``requantize`` (``quant_type``, ``double_quant``, ``dtype``): the base is stored in full precision
    but was trained in 4-bit; each weight the 4-bit loader quantizes goes through the same NF4 round
    trip first. ``should_stop`` is asked after every tensor (``Stopped`` is raised then); ``on_update``
    gets the count's ``Progress`` snapshot as it moves (the consolidation shows it on the page). Raises
    MergeError, after the last tensor, when the adapter has a module the base has no weight for.
    """
    import torch
    from safetensors import safe_open

    src = Path(base_path)
    if meta is None and (tensors is None or requantize):
        meta = _meta_model(src)
    tensors = tensors if tensors is not None else plan(src, meta)
    deltas, scale = lora_deltas(adapter_dir) if adapter_dir is not None else ({}, 1.0)
    roundtrip = quantized_linears(meta) if requantize else set()
    del meta
    used: set[str] = set()
    progress = Progress("merge, tensor by tensor", len(tensors), "tensors", should_stop=should_stop,
                        on_update=on_update)
    i = 0
    while i < len(tensors):
        shard = tensors[i].shard
        with safe_open(str(src / shard), framework="pt") as f:  # one shard mapped at a time
            keys = set(f.keys())
            while i < len(tensors) and tensors[i].shard == shard:
                name = tensors[i].name
                tensor = f.get_tensor(name)
                state = {k.removeprefix(name + "."): f.get_tensor(k) for k in keys if k.startswith(name + ".")}
                if state:
                    from bitsandbytes.functional import QuantState, dequantize_4bit

                    tensor = dequantize_4bit(tensor, QuantState.from_dict(state, device=torch.device("cpu")))
                elif name in roundtrip:
                    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

                    q, qs = quantize_4bit(tensor.to(requantize["dtype"]), blocksize=64,  # type: ignore[index]
                                          quant_type=requantize["quant_type"],  # type: ignore[index]
                                          compress_statistics=requantize["double_quant"])  # type: ignore[index]
                    tensor = dequantize_4bit(q, qs)
                del state
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and module in deltas:
                    a, b = deltas[module]
                    tensor = tensor.float() + scale * (b.float() @ a.float())
                    used.add(module)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
                del tensor
                i += 1
                progress.advance()
                progress.check()
    missing = sorted(set(deltas) - used)
    if missing:
        raise MergeError(f"the adapter in {adapter_dir} has modules the base has no weight for: "
                         f"{', '.join(missing[:3])}")


def write_merged(base_path: str | Path, adapter_dir: str | Path | None, out: Path, dtype: Any, *,
                 requantize: dict[str, Any] | None = None, should_stop: Callable[[], bool] | None = None,
                 shard_bytes: int | None = None, on_update: Callable[[dict[str, Any]], None] | None = None) -> int:
    """The merged model as a Hugging Face folder in ``out``: safetensors shard by shard, the index, config.json.

    Shards are cut before a tensor that would take the current one past ``shard_bytes`` (a tensor
    larger than that gets a shard of its own); one shard is ``model.safetensors`` with no index,
    as ``save_pretrained`` writes it. The config is the base's, without its ``quantization_config``,
    with ``dtype`` and the KV cache on. Returns the bytes of the weights written.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    src = Path(base_path)
    meta = _meta_model(src)
    tensors = plan(src, meta)

    def nbytes(t: Stored) -> int:  # floats (and 4-bit weights, dequantized) come out in dtype; integers as stored
        return math.prod(t.shape) * INT_BYTES.get(t.dtype, dtype.itemsize)

    groups: list[list[str]] = [[]]
    size = 0
    for t in tensors:
        n = nbytes(t)
        if groups[-1] and size + n > (shard_bytes or SHARD_BYTES):
            groups.append([])
            size = 0
        groups[-1].append(t.name)
        size += n
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    shard_of = {name: file for file, group in zip(names, groups) for name in group}
    weight_map: dict[str, str] = {}
    total = 0
    pending: dict[str, Any] = {}
    current = names[0]

    def flush() -> None:
        nonlocal total
        save_file(pending, str(out / current), metadata={"format": "pt"})
        for key, t in pending.items():
            weight_map[key] = current
            total += t.numel() * t.element_size()
        pending.clear()

    for name, tensor in merged_tensors(src, adapter_dir, dtype, requantize=requantize, should_stop=should_stop,
                                       tensors=tensors, meta=meta, on_update=on_update):
        if shard_of[name] != current:
            flush()
            current = shard_of[name]
        pending[name] = tensor
        del tensor
    flush()
    if len(names) > 1:
        atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                                "weight_map": weight_map})
    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(out)
    return total


def merge_layerwise(base_path: str | Path, adapter_dir: str | Path, out: Path, dtype: Any, *,
                    requantize: dict[str, Any] | None = None, should_stop: Callable[[], bool] | None = None,
                    on_update: Callable[[dict[str, Any]], None] | None = None) -> None:
    """The daily consolidation's merge: ``write_merged`` plus the base's generation config."""
    write_merged(base_path, adapter_dir, out, dtype, requantize=requantize, should_stop=should_stop,
                 on_update=on_update)
    src = Path(base_path)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")
