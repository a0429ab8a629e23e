"""A small least-recently-used pool of loaded models, by name (the workbench's and serve.py's).

A name is resolved at every ``get`` (``core/checkpoints.resolve_model``), so ``latest`` follows new
checkpoints and ``adopted`` new consolidations: a model whose files changed is loaded again.

Loading never starves training: at most ``capacity`` models are held (the least recently used is
dropped first), generation runs one at a time with ``threads`` CPU threads, and a model goes on the
GPU only when its free memory leaves ``monitor.workbench_gpu_margin_gb`` (``loading.inference_device``).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

from ultimate_trainer.core.checkpoints import ModelSpec, resolve_model
from ultimate_trainer.core.config import Config

log = logging.getLogger(__name__)


def resolve(cfg: Config, key: str) -> ModelSpec:
    """The folders behind a model name, in ``cfg``'s project; ValueError for a name that names nothing."""
    return resolve_model(cfg.path("checkpoints"), cfg.path("models"), cfg.base_model, cfg.load_in_4bit, key)


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
               top_p: float, stats: dict[str, Any] | None = None) -> Iterator[tuple[Loaded, str]]:
        """``(model, answer so far)`` as the answer grows; ``stats`` gets the token counts and why it stopped."""
        from ultimate_trainer.model.scoring import stream_reply

        m = self.get(key)
        with self.generating:
            for text in stream_reply(m.model, m.tokenizer, messages, max_new_tokens, temperature, top_p,
                                     stats=stats):
                yield m, text

    def answers(self, key: str, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                batch_size: int) -> tuple[Loaded, list[str]]:
        """Greedy answers, exactly as the training-time evaluation makes them."""
        from ultimate_trainer.model.scoring import generate_answers

        m = self.get(key)
        with self.generating:
            return m, generate_answers(m.model, m.tokenizer, prompts, max_new_tokens, batch_size)
