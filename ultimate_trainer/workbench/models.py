"""Which models can be talked to, and a small least-recently-used pool of the loaded ones.

A model key is ``base`` (the configured base model), ``latest`` (whatever training would continue
from now: the newest checkpoint, or a newer consolidation; resolved again at every use, so it
follows new checkpoints), a checkpoint folder name (``checkpoint-120``) or ``consolidated/<name>``.

Loading never starves training: at most ``monitor.workbench_models`` models are held (the least
recently used is dropped first), generation runs one at a time with ``monitor.workbench_threads``
CPU threads, and a model goes on the GPU only when its free memory leaves
``monitor.workbench_gpu_margin_gb`` (model/loading.py ``inference_device``).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.config import Config

log = logging.getLogger(__name__)

BASE, LATEST, CONSOLIDATED = "base", "latest", "consolidated/"


@dataclass(frozen=True)
class ModelSpec:
    """A model resolved to folders: the base weights and, for a checkpoint, its adapter."""

    key: str           # the concrete key (``latest`` resolved)
    label: str
    base: str | None   # base weights folder; None: resolve the configured base_model
    adapter: str | None
    fingerprint: str   # changes when the model's files are replaced (cache key for evaluations)
    quantized: bool = False


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def choices(cfg: Config) -> list[tuple[str, str]]:
    """``(label, key)`` pairs for the model pickers: base, latest, then checkpoints and consolidations, newest first."""
    out = [(f"base model ({cfg.base_model})", BASE), ("latest (follows new checkpoints)", LATEST)]
    for c in reversed(ck.list_complete(cfg.path("checkpoints"))):
        out.append((f"{c.name} (step {c.global_step})", c.name))
    for c in reversed(ck.list_consolidations(cfg.path("models"))):
        out.append((f"consolidated {c.path.name} (step {c.global_step})", CONSOLIDATED + c.path.name))
    return out


def resolve(cfg: Config, key: str) -> ModelSpec:
    """The folders behind a model key; ValueError for a key that names nothing (any more)."""
    if key == LATEST:
        start = ck.start_point(cfg.path("checkpoints"), cfg.path("models"))
        if start.kind == "checkpoint":
            key = start.checkpoint.name
        elif start.kind == "consolidation":
            key = CONSOLIDATED + start.consolidation.path.name
        else:
            key = BASE
    if key == BASE:
        return ModelSpec(BASE, f"base model {cfg.base_model}", None, None, _fingerprint("base", cfg.base_model),
                         cfg.load_in_4bit)
    if key.startswith(CONSOLIDATED):
        name = key[len(CONSOLIDATED):]
        for c in ck.list_consolidations(cfg.path("models")):
            if c.path.name == name:
                return ModelSpec(key, f"consolidated {name} (step {c.global_step})", str(c.path), None,
                                 _fingerprint(c.path, c.manifest.get("created_at")))
        raise ValueError(f"no complete consolidation named {name}")
    for c in ck.list_complete(cfg.path("checkpoints")):
        if c.name == key:
            base = c.meta.get("base_model")
            base = base if base and Path(base).is_dir() else None  # moved: resolve by name at load time
            return ModelSpec(key, f"{c.name} (step {c.global_step})", base, str(c.path),
                             _fingerprint(c.path, c.meta.get("created_at")), bool(c.meta.get("load_in_4bit")))
    raise ValueError(f"no complete checkpoint named {key}")


@dataclass
class Loaded:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: str
    where: str  # for the page: which device and why


class ModelPool:
    """Loaded models, least recently used first; thread-safe; one generation at a time."""

    def __init__(self, cfg: Config, capacity: int | None = None, threads: int | None = None):
        self.cfg = cfg
        self.capacity = capacity or cfg.monitor.workbench_models
        self.threads = threads or cfg.monitor.workbench_threads
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()        # the pool's contents
        self.generating = threading.Lock()   # one answer at a time: the CPU share stays bounded

    def loaded(self) -> list[str]:
        with self._lock:
            return [f"{m.spec.label} on {m.where}" for m in self._models.values()]

    def get(self, key: str) -> Loaded:
        """The model for ``key``, loaded if needed; raises ModelError/ValueError with a one-line reason."""
        spec = resolve(self.cfg, key)
        with self._lock:
            hit = self._models.get(spec.key)
            if hit is not None and hit.spec.fingerprint == spec.fingerprint:
                self._models.move_to_end(spec.key)
                return hit
            self._models.pop(spec.key, None)
            while len(self._models) >= self.capacity:
                old_key, _old = self._models.popitem(last=False)
                log.info("unloading %s (least recently used)", old_key)
                del _old
                self._free()
            loaded = self._load(spec)
            self._models[spec.key] = loaded
            return loaded

    def _free(self) -> None:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, spec: ModelSpec) -> Loaded:
        import torch

        from ultimate_trainer.model import loading

        torch.set_num_threads(self.threads)
        base = spec.base or loading.resolve_base(self.cfg)
        device, where = loading.inference_device(self.cfg, base, self.cfg.monitor.workbench_gpu_margin_gb)
        log.info("loading %s on %s", spec.label, where)
        tokenizer = loading.load_tokenizer(base)
        model = loading.load_inference_model(self.cfg, base, spec.adapter, device, quantize=spec.quantized)
        return Loaded(spec, model, tokenizer, device, where)

    def stream(self, key: str, messages: list[dict[str, str]], max_new_tokens: int, temperature: float,
               top_p: float) -> Iterator[tuple[Loaded, str]]:
        """``(model, answer so far)`` as the answer grows."""
        from ultimate_trainer.model.scoring import stream_reply

        m = self.get(key)
        with self.generating:
            for text in stream_reply(m.model, m.tokenizer, messages, max_new_tokens, temperature, top_p):
                yield m, text

    def answers(self, key: str, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                batch_size: int) -> tuple[Loaded, list[str]]:
        """Greedy answers, exactly as the training-time evaluation makes them."""
        from ultimate_trainer.model.scoring import generate_answers

        m = self.get(key)
        with self.generating:
            return m, generate_answers(m.model, m.tokenizer, prompts, max_new_tokens, batch_size)
