"""Typed configuration: ``config.json`` loaded once, overridden by ``--set KEY=VALUE``, validated as a whole.

Every setting is a dataclass field with a ``doc`` string; ``docs/CONFIG.md`` is generated from them
(``python -m ultimate_trainer.core.config --markdown``) and a test keeps the two in step.

A config file may leave keys out: missing keys take the defaults below. Unknown keys, wrong types,
values out of range and contradictory options are all collected and reported together in one
``ConfigError`` that names every offending key.

Paths (group ``paths``) are relative to ``paths.root``, which is itself relative to the current
working directory unless absolute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

BUILTIN_MODEL = "smollm2-135m-instruct"
REPO_DIR = Path(__file__).resolve().parents[2]  # where train.py, daemon.py and the servers live


def _f(default: Any, doc: str, **check: Any) -> Any:
    """A dataclass field carrying its documentation and range checks (min, max, choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"doc": doc, **check})
    return field(default=default, metadata={"doc": doc, **check})


@dataclass
class PathsConfig:
    root: str = _f(".", "Project root; every other path here is relative to it. Relative to the working directory.")
    inbox: str = _f("inbox", "Folder the user drops JSONL files (or folders of them) into.")
    queue: str = _f("queue", "Spool the daemon moves files through: processing/, done/, failed/.")
    checkpoints: str = _f("checkpoints", "Checkpoints, one folder per save: checkpoint-<global_step>/. None is deleted.")
    status: str = _f("status", "Status and history files read by the monitors (schema: docs/STATUS.md).")
    models: str = _f("models", "Consolidated models: models/consolidated/<timestamp>/.")
    model_cache: str = _f("models/cache", "Where the built-in GGUF model is converted to safetensors once.")
    work: str = _f(".work", "Scratch space: memory-mapped token stores of the current run (removed after it), and "
                   "the base's rehearsal answers (rehearsal/, one file per base).")


@dataclass
class QuantizationConfig:
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "bitsandbytes 4-bit data type.")
    double_quant: bool = _f(True, "Quantize the quantization constants too (QLoRA double quantization).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "Matmul dtype of the 4-bit layers; auto = bfloat16 on a CUDA GPU that supports it, float32 on the CPU."
    )


@dataclass
class LoraConfig:
    r: int = _f(64, "LoRA rank.", min=1, max=4096)
    alpha: int = _f(128, "LoRA alpha; the update is scaled by alpha / r.", min=1)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", min=0.0, max=0.9)
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers that get an adapter (Qwen2 and Llama names).",
    )


@dataclass
class TrainingConfig:
    batch_size: int = _f(4, "Examples per forward pass.", min=1, max=1024)
    gradient_accumulation_steps: int = _f(4, "Forward passes per optimizer step.", min=1, max=4096)
    learning_rate: float = _f(2e-4, "Peak learning rate.", min=0.0, max=1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = _f(
        "constant_with_warmup",
        "Schedule over global steps. Training never ends, so the default holds the rate after warm-up; "
        "linear/cosine decay towards the end of the current run (see docs/TRAINING.md).",
    )
    warmup_steps: int = _f(20, "Warm-up optimizer steps (counted from a fresh optimizer).", min=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0, max=1.0)
    max_grad_norm: float = _f(0.3, "Gradient clipping norm (0 disables).", min=0.0)
    optimizer: str = _f("adamw_torch", "transformers optimizer name, e.g. adamw_torch or paged_adamw_8bit (CUDA).")
    epochs_per_file: float = _f(1.0, "Passes over each batch of incoming files.", min=0.01, max=1000.0)
    max_seq_length: int = _f(2048, "Longest tokenized example; longer ones follow data.overlong.", min=16, max=1_048_576)
    seed: int = _f(42, "Seed for data order, LoRA init and dropout.")
    logging_steps: int = _f(1, "Log loss, learning rate and grad norm every N optimizer steps.", min=1)
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward to save memory.")
    device: Literal["auto", "cuda", "cpu"] = _f("auto", "auto = CUDA when available, else CPU.")
    packing: Literal["auto", "on", "off", "rows"] = _f(
        "auto",
        "on (= auto) = padding-free: each micro-batch's batch_size examples back to back in one row, each "
        "attending only to itself; the same steps as off, without the padding. off = one example a row, padded, "
        "batches of similar lengths. rows = examples packed into rows of up to max_seq_length tokens, batch_size "
        "rows a micro-batch (far more examples per step: fewer updates per pass). docs/TRAINING.md.",
    )
    chunked_loss: bool = _f(
        True, "Compute the loss in chunks of tokens, never holding batch x length x vocabulary logits at once."
    )
    num_processes: Union[Literal["auto"], int] = _f(
        "auto",
        "Training processes on this machine (one per GPU). auto = the visible CUDA GPUs, 1 on the CPU. Above 1, "
        "train.py relaunches itself through torchrun; a step still means batch_size x gradient_accumulation_steps "
        "examples when gradient_accumulation_steps divides by the world size (docs/TRAINING.md, \"Several GPUs\").",
        min=1, max=1024,
    )
    distributed: Literal["ddp", "fsdp", "deepspeed"] = _f(
        "ddp",
        "How several processes share the work: ddp = each loads its own (4-bit) copy and trains a shard of the "
        "batch; fsdp = the base is sharded across GPUs (bases too large for one); deepspeed = ZeRO "
        "(needs the deepspeed package). Ignored with one process.",
    )
    deepspeed_stage: Literal[2, 3] = _f(2, "ZeRO stage when distributed is deepspeed (3 also shards the weights).")
    collective_timeout_seconds: int = _f(
        1800, "How long a rank waits for the others in a collective before the whole run fails "
              "(a dead or hung rank). Must exceed the longest evaluation, which rank 0 runs alone.",
        min=10, max=86400,
    )
    replay_fraction: float = _f(
        0.05, "Share of each run's examples replayed from files trained before (queue/done/), chosen from the run "
        "id; never held-out lines; 0 disables (docs/TRAINING.md, Replay).", min=0.0, max=0.5)
    rehearsal_fraction: float = _f(
        0.3, "Share of each run's examples that are general prompts answered by the base itself (rehearsal: "
        "self-distillation that keeps what the base knew), chosen from the run id; 0 disables "
        "(docs/TRAINING.md, Rehearsal).", min=0.0, max=0.9)
    rehearsal_file: str = _f(
        "", "Rehearsal prompts: JSONL of {\"prompt\": ...}; empty = the shipped general set "
        "(relative to paths.root).")
    rehearsal_loss: Literal["distill", "answers"] = _f(
        "distill", "What a rehearsal line trains: distill = at each of its answer's tokens, the base's whole "
        "next-token distribution (KL divergence from the model with its adapter off: one more forward pass, "
        "without gradient, on each batch that holds a rehearsal line); answers = the base's answer itself "
        "(cross-entropy on its tokens, as any line). docs/TRAINING.md, Rehearsal.")
    rehearsal_max_new_tokens: int = _f(
        64, "Bound on each of the base's rehearsal answers (one generation per base, cached under paths.work); "
        "an answer cut by it keeps its complete sentences.", min=1, max=4096)


@dataclass
class DataConfig:
    system_prompt: str = _f("You are a helpful assistant.", "System message used when an example has none.")
    tokenize_chunk_size: int = _f(1000, "Records tokenized per chunk; memory stays flat whatever the file size.", min=1)
    overlong: Literal["skip", "truncate"] = _f(
        "skip", "What to do with an example longer than max_seq_length: skip it (reported) or cut it."
    )
    max_line_bytes: int = _f(8_000_000, "Lines longer than this are reported as bad without being parsed.", min=64)
    heldout_fraction: float = _f(0.05, "Share of each file held out for evaluation and never trained on.", min=0.0, max=0.5)
    heldout_max_per_file: int = _f(50, "At most this many held-out examples per file.", min=0)
    eval_file: Optional[str] = _f(None, "Optional fixed JSONL of evaluation examples (relative to paths.root).")


@dataclass
class EvalConfig:
    matcher: Literal["exact", "normalized", "contains", "numeric"] = _f(
        "normalized", "How an answer is scored against the expected one (docs/TRAINING.md)."
    )
    max_prompts: int = _f(20, "Held-out prompts answered per evaluation.", min=1)
    max_new_tokens: int = _f(64, "Bound on each generated answer.", min=1, max=4096)
    batch_size: int = _f(8, "Prompts generated together.", min=1)
    val_loss: bool = _f(True, "Also compute the loss on the held-out examples.")
    val_loss_max_examples: int = _f(80, "Held-out examples the validation loss runs over (an even sample of them).",
                                    min=1)
    recent_examples: int = _f(20, "Scored examples kept in training_status.json.", min=0, max=1000)
    margin_last_20: float = _f(5.0, "Points by which last-20 accuracy must differ from overall to be coloured.", min=0.0)
    margin_last_50: float = _f(3.0, "Points by which last-50 accuracy must differ from overall to be coloured.", min=0.0)
    margin_trend: float = _f(3.0, "Points last-50 must beat (or trail) overall for improving (regressing).", min=0.0)
    at_start: bool = _f(True, "Evaluate once before the first step of a run, so the starting accuracy is known.")
    probe_file: Optional[str] = _f(
        "builtin", "Base-knowledge probe: questions the base answers right, scored to measure forgetting. 'builtin' = "
        "the shipped general-knowledge set, else a JSONL path (relative to paths.root); null disables.")
    probe_every: int = _f(2, "Score the probe at every Nth evaluation (the first of each run included).", min=1)
    probe_max_new_tokens: int = _f(64, "Bound on each probe answer, as long as the base's rehearsal answers: an "
                                   "answer that names its fact late still counts.", min=1, max=512)
    retention_warn: float = _f(0.95, "Retention (probe score / baseline) below which the page warns of forgetting and the "
                               "controller steps the learning rate down.",
                               min=0.0, max=1.0)


@dataclass
class ControllerConfig:
    enabled: bool = _f(True, "The retention-aware controller: after each probe, raise the rehearsal share and then "
                       "lower the learning rate while retention is under eval.retention_warn, and step them back towards the "
                       "configured values once held-out accuracy stalls with retention safe (docs/TRAINING.md, "
                       "\"Retention-aware controller\"). false: the configured values, always.")
    step_down_first: Literal["rate", "share"] = _f(
        "rate", "Which lever a step down moves first: 'rate' lowers the learning rate to controller.min_lr_scale, "
        "then raises the rehearsal share; 'share' the other way round. A step back undoes them in the reverse "
        "order. Measured: with distilled rehearsal (training.rehearsal_loss distill) the rate first kept more; with "
        "'answers' the share first did (docs/PERFORMANCE.md, \"Retention-aware controller\").")
    lr_factor: float = _f(0.5, "A step down multiplies the learning rate's scale by this (controller.step_down_first); a "
                          "step back divides it by this, never above 1 (the configured rate).", min=0.05, max=0.95)
    min_lr_scale: float = _f(0.25, "Lowest scale of the configured learning rate the controller steps down to. The "
                             "rehearsal that repairs a dip in retention trains at this rate too: a low floor keeps "
                             "the dip from deepening but also from recovering (docs/PERFORMANCE.md, "
                             "\"Retention-aware controller\"). 1: the controller moves only the rehearsal share.",
                             min=0.001, max=1.0)
    rehearsal_step: float = _f(0.1, "A step down adds this to the rehearsal share (controller.step_down_first; in the "
                               "current run as a weight on its rehearsal lines' loss, drawn at that share from the "
                               "next run); a step back takes it off again. 0: the controller leaves the share alone "
                               "and steps the rate.", min=0.0, max=0.5)
    max_rehearsal_fraction: float = _f(0.6, "Highest rehearsal share the controller raises it to (the configured "
                                       "training.rehearsal_fraction when that is higher). A run with rehearsal off "
                                       "(0) is never given any.", min=0.0, max=0.9)
    stall_evaluations: int = _f(3, "Probed evaluations in a row without a better held-out accuracy after which "
                                "accuracy counts as stalled (one step back, when retention is safe).", min=1)
    safe_margin: float = _f(0.03, "Retention counts as safe for a step back at eval.retention_warn plus this.",
                            min=0.0, max=1.0)
    step_down_margin: float = _f(0.03, "Step down when retention falls below eval.retention_warn plus this: before "
                                 "the warning is reached (0: at the warning). Not above controller.safe_margin. "
                                 "Measured: at the warning itself a run that read one answer short until its last "
                                 "31 steps lost two more there (docs/PERFORMANCE.md, \"Retention-aware controller\").",
                                 min=0.0, max=1.0)


@dataclass
class GuardConfig:
    enabled: bool = _f(True, "Check every optimizer step before its update; skip the update of an anomalous one.")
    spike_k: float = _f(10.0, "A loss above the loss its mix of sources predicts + k * max(1.4826 * MAD of the fit's "
                         "residuals, 0.05 * that loss) is a spike.", min=0.0)
    window: int = _f(50, "Accepted steps (of this run and, at its start, of earlier ones) the spike rule fits.", min=2)
    min_history: int = _f(20, "Accepted steps needed in the window before spikes are judged (non-finite values are "
                          "always caught).", min=1)
    min_run_steps: int = _f(4, "Steps of this run's own files before their loss level is known and judged.", min=1)
    max_growth: float = _f(10.0, "A loss more than this many times the lowest level of this run is an anomaly "
                           "whatever the spread.", min=1.0)
    new_file_growth: float = _f(3.0, "Until this run's own files have a known level (guard.min_run_steps), a step "
                                "of them whose loss is more than this many times what earlier runs' files cost "
                                "when they were new is an anomaly (word salad at its first step).", min=1.0)
    max_anomalies: int = _f(3, "Anomalies in one run after which it stops and its files are failed (not retried).", min=1)
    slope_steps: int = _f(20, "Steps over which the loss slope is fitted.", min=2)


@dataclass
class ConsolidationConfig:
    gate: bool = _f(True, "Score the merged candidate before adopting it; refuse it when it lost too much.")
    max_accuracy_drop: float = _f(5.0, "Held-out accuracy points the candidate may lose against the current base.",
                                  min=0.0, max=100.0)
    max_retention_drop: float = _f(0.05, "Retention (probe score / baseline) the candidate may lose against the "
                                   "current base.", min=0.0, max=1.0)
    max_total_retention_drop: float = _f(0.1, "Retention the candidate may have lost since the original base, and "
                                         "against the best base adopted since: a floor that thirty small "
                                         "merges cannot ratchet down.", min=0.0, max=1.0)
    max_prompts: int = _f(40, "Held-out prompts (from queue/done/ and data.eval_file) the gate asks.", min=1)
    noise_answers: int = _f(1, "Answers the candidate may lose on each measure whatever the margins: on a small "
                            "probe or held-out set one answer is greedy decoding's noise, not forgetting.", min=0)


@dataclass
class StatusConfig:
    interval_seconds: float = _f(2.0, "How often training_status.json is rewritten while training.", min=0.1, max=60.0)


@dataclass
class DaemonConfig:
    poll_interval: float = _f(10.0, "Seconds between scans of the inbox.", min=0.1)
    file_stable_seconds: float = _f(5.0, "A file is taken once its size and mtime are unchanged this long.", min=0.0)
    start_monitors: bool = _f(True, "Start monitor_server.py and memory_stats_api.py as children.")
    start_workbench: bool = _f(True, "Also start workbench.py (the model workbench, monitor.workbench_port) as a child.")
    skip_duplicates: bool = _f(True, "Do not retrain a file byte-identical to one already trained.")
    batch_max_files: int = _f(64, "Most files handed to one training run.", min=1)
    batch_max_mb: float = _f(1024.0, "Most megabytes handed to one training run.", min=0.001)
    retry_initial_seconds: float = _f(30.0, "First back-off after a trainer crash; doubles each time.", min=0.0)
    retry_max_seconds: float = _f(1800.0, "Longest back-off.", min=0.0)
    max_attempts: int = _f(3, "Crashes of the same file before it is put in queue/failed/.", min=1)
    consolidation_hour: Optional[int] = _f(3, "Local hour of the daily merge of the adapter into the base; null disables.", min=0, max=23)
    disk_warn_gb: float = _f(20.0, "Free disk below which status warns.", min=0.0)
    disk_critical_gb: float = _f(5.0, "Free disk below which intake and training pause.", min=0.0)
    throughput_window_hours: float = _f(6.0, "Window of finished runs behind the queue estimate.", min=0.01)
    worker: bool = _f(True, "Train in one long-lived worker that keeps the model loaded between runs (false: one train.py per run).")
    worker_max_growth_mb: float = _f(4096.0, "Recycle the worker when its RSS or GPU memory grew this much past its size after the first run; 0 never.", min=0.0)
    prefetch_tokenize: Literal["auto", "on", "off"] = _f(
        "auto", "While the worker trains a run, tokenize the next queued run's files in a background process at the "
        "lowest CPU priority (auto: when training on a GPU; on a CPU it would take cores from training)."
    )


NOTIFY_EVENTS = ("run_done", "file_failed", "anomaly", "accuracy_regressing", "retention_falling", "oom_high",
                 "disk_critical", "consolidation_adopted", "consolidation_refused", "trainer_error", "daemon_error")


@dataclass
class NotifyConfig:
    urls: list[str] = _f([], "apprise notification URLs (e.g. ntfy://topic, json://host/path, mailto://...); empty = off.")
    events: list[str] = _f(list(NOTIFY_EVENTS), "Events that are sent (docs/DAEMON.md, Notifications).")
    min_interval_seconds: float = _f(900.0, "Each event kind is sent at most once per this many seconds.", min=0.0)
    timeout_seconds: float = _f(10.0, "Connect/read timeout of one delivery.", min=0.1, max=300.0)


@dataclass
class MonitorConfig:
    host: str = _f("127.0.0.1", "Address the web servers bind.")
    port: int = _f(8080, "Port of the live monitor page.", min=1, max=65535)
    stats_port: int = _f(8081, "Port of the memory/GPU stats API.", min=1, max=65535)
    workbench_port: int = _f(8082, "Port of the model workbench (chat, compare, evaluate, history, lineage).",
                             min=1, max=65535)
    serve_port: int = _f(8083, "Port of serve.py, the OpenAI-compatible API (docs/SERVING.md).", min=1, max=65535)
    workbench_models: int = _f(2, "Models the workbench keeps loaded at once; the least recently used is evicted.",
                               min=1, max=4)
    workbench_threads: int = _f(2, "CPU threads the workbench generates with (at low priority, beside training).",
                                min=1)
    workbench_gpu_margin_gb: float = _f(
        2.0, "GPU memory that must stay free beyond a model's size for the workbench to load it there (else CPU).",
        min=0.0)
    refresh_seconds: float = _f(2.0, "How often the page refreshes.", min=0.2)
    sample_interval: float = _f(1.0, "Seconds between RAM/GPU samples.", min=0.1)
    oom_medium_percent: float = _f(70.0, "System RAM use at which OOM risk is MEDIUM.", min=1.0, max=100.0)
    oom_high_percent: float = _f(85.0, "System RAM use at which OOM risk is HIGH.", min=1.0, max=100.0)


@dataclass
class Config:
    base_model: str = _f(
        "Qwen/Qwen2.5-7B-Instruct",
        f"Hub id (from the local Hugging Face cache), a local model folder, or '{BUILTIN_MODEL}' (ships with the install).",
    )
    load_in_4bit: bool = _f(True, "Load the base in bitsandbytes 4-bit (QLoRA); false trains LoRA on a full-precision base.")
    eval_steps: int = _f(25, "Evaluate on held-out prompts every N optimizer steps and at the end of each run (0 disables).",
                        min=0)
    save_steps: int = _f(100, "Save a checkpoint every N optimizer steps (and always at the end of a run).", min=1)
    paths: PathsConfig = field(default_factory=PathsConfig, metadata={"doc": "Where things live."})
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig, metadata={"doc": "4-bit loading."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "The adapter."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"doc": "Optimizer and batches."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Reading and tokenizing JSONL."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Held-out evaluation while training."})
    guard: GuardConfig = field(default_factory=GuardConfig, metadata={"doc": "The divergence guard (docs/TRAINING.md)."})
    controller: ControllerConfig = field(default_factory=ControllerConfig, metadata={
        "doc": "The retention-aware controller of the learning rate and the rehearsal share (docs/TRAINING.md)."})
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig,
                                               metadata={"doc": "The gate before a merge is adopted (docs/DAEMON.md)."})
    status: StatusConfig = field(default_factory=StatusConfig, metadata={"doc": "The status files."})
    daemon: DaemonConfig = field(default_factory=DaemonConfig, metadata={"doc": "The inbox daemon."})
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata={"doc": "The web monitor and stats API."})
    notify: NotifyConfig = field(default_factory=NotifyConfig, metadata={"doc": "Notifications sent by the daemon."})

    # ----------------------------------------------------------------- paths
    def path(self, name: str) -> Path:
        """Absolute path of ``paths.<name>`` (relative ones resolved against ``paths.root``)."""
        root = Path(self.paths.root).expanduser()
        if name == "root":
            return root.resolve()
        p = Path(getattr(self.paths, name)).expanduser()
        return (p if p.is_absolute() else root / p).resolve()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------- building and validation

def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _check_value(key: str, value: Any, tp: Any, meta: dict, problems: list[str]) -> Any:
    """Return the value coerced to ``tp`` (int -> float only), appending a problem if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _check_value(key, value, args[0], meta, problems)
        fits: list[str] = []  # the problem of an alternative of the right type (a range, say)
        for alt in args:  # e.g. "auto" | integer: the first alternative the value fits
            tried: list[str] = []
            checked = _check_value(key, value, alt, meta, tried)
            if not tried:
                return checked
            fits = fits or [t for t in tried if "expected" not in t and "is not one of" not in t]
        problems.extend(fits or [f"{key}: expected {_type_name(tp)}, got {json.dumps(value)}"])
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{key}: {json.dumps(value)} is not one of {_type_name(tp)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__}")
            return value
        return [_check_value(f"{key}[{i}]", v, item_tp, {}, problems) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp, True)
    if not ok:
        problems.append(f"{key}: expected {_type_name(tp)}, got {json.dumps(value)}")
        return value
    if tp is float:
        value = float(value)
    if "min" in meta and value < meta["min"]:
        problems.append(f"{key}: {value} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        problems.append(f"{key}: {value} is above the maximum {meta['max']}")
    return value


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or '<top level>'}: expected an object, got {json.dumps(data)[:60]}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = [n for n in fields if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if _is_group(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.", problems)
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", data[name], tp, dict(f.metadata), problems)
    return cls(**kwargs)


def _contradictions(cfg: Config) -> list[str]:
    p: list[str] = []
    if cfg.daemon.disk_critical_gb > cfg.daemon.disk_warn_gb:
        p.append("daemon.disk_critical_gb: must not exceed daemon.disk_warn_gb")
    if cfg.monitor.oom_medium_percent >= cfg.monitor.oom_high_percent:
        p.append("monitor.oom_medium_percent: must be below monitor.oom_high_percent")
    if cfg.monitor.port == cfg.monitor.stats_port:
        p.append("monitor.stats_port: must differ from monitor.port")
    if cfg.monitor.workbench_port in (cfg.monitor.port, cfg.monitor.stats_port):
        p.append("monitor.workbench_port: must differ from monitor.port and monitor.stats_port")
    if cfg.monitor.serve_port in (cfg.monitor.port, cfg.monitor.stats_port, cfg.monitor.workbench_port):
        p.append("monitor.serve_port: must differ from monitor.port, monitor.stats_port and monitor.workbench_port")
    if cfg.daemon.retry_initial_seconds > cfg.daemon.retry_max_seconds:
        p.append("daemon.retry_initial_seconds: must not exceed daemon.retry_max_seconds")
    if cfg.eval.max_new_tokens >= cfg.training.max_seq_length:
        p.append("eval.max_new_tokens: must be below training.max_seq_length")
    p += [f"notify.events: unknown event {e!r} (known: {', '.join(NOTIFY_EVENTS)})" for e in cfg.notify.events
          if e not in NOTIFY_EVENTS]
    if not cfg.lora.target_modules:
        p.append("lora.target_modules: name at least one module")
    if cfg.training.replay_fraction + cfg.training.rehearsal_fraction >= 0.95:
        p.append("training.rehearsal_fraction: with training.replay_fraction it must leave at least 5% of a run "
                 "to the run's own files")
    if cfg.controller.enabled and cfg.training.replay_fraction + cfg.controller.max_rehearsal_fraction >= 0.95:
        p.append("controller.max_rehearsal_fraction: with training.replay_fraction it must leave at least 5% of a "
                 "run to the run's own files")
    if cfg.controller.step_down_margin > cfg.controller.safe_margin:
        p.append("controller.step_down_margin: must not exceed controller.safe_margin (a retention would be both "
                 "too low to keep the rate and safe enough to step back)")
    return p


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config; raise ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if not problems:
        problems += _contradictions(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=VALUE`` -> (``a.b``, value). VALUE is read as JSON when it parses, else as a plain string."""
    if "=" not in item:
        raise ConfigError([f"--set {item}: expected KEY=VALUE"])
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    problems = []
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            problems += e.problems
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"--set {key}: {part} is not a group")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return data


def load(path: str | Path | None = "config.json", overrides: list[str] | None = None) -> Config:
    """Load ``path`` (missing keys take defaults), apply ``--set`` overrides, validate.

    ``path=None`` starts from the defaults alone. A missing or unreadable file is a ConfigError.
    """
    data = read_object(Path(path))[1] if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


def read_object(path: Path, text: str | None = None) -> tuple[str, dict[str, Any]]:
    """A config file's text and its JSON object (``text``: already read); ConfigError with file:line when not one."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError([f"{path}: cannot read ({e.strerror or e})"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be an object"])
    return text, data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every entry script shares."""
    parser.add_argument("--config", default="config.json", metavar="PATH", help="configuration file (default: config.json)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, dotted for groups (repeatable), e.g. --set training.learning_rate=1e-4",
    )


def from_args(args: argparse.Namespace) -> Config:
    return load(args.config, args.overrides)


# --------------------------------------------------------------------------- documentation


def config_or_none(args: argparse.Namespace) -> Config | None:
    """The Config named by ``--config``/``--set``; None after printing every problem (exit code 2)."""
    try:
        return from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None

def markdown() -> str:
    """docs/CONFIG.md, generated from the dataclasses."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `ultimate_trainer/core/config.py` by `python -m ultimate_trainer.core.config --markdown`;",
        "a test fails when this file and the code disagree. Every key can be set in `config.json`",
        "or on the command line with `--set KEY=VALUE` (dotted for groups, VALUE read as JSON).",
        "Missing keys take the default shown here.",
        "",
    ]

    def table(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, groups = [], []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if _is_group(tp):
                groups.append((f, tp))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            rng = (f" Range {lo} to {hi}." if lo is not None and hi is not None
                   else f" At least {lo}." if lo is not None else f" At most {hi}." if hi is not None else "")
            doc = f.metadata["doc"].replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | {_type_name(tp).replace('|', 'or')} | `{json.dumps(default)}` | {doc}{rng} |")
        if rows:
            out.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for f, tp in groups:
            out.extend([f"## `{prefix}{f.name}`: {f.metadata['doc']}", ""])
            table(tp, f"{prefix}{f.name}.")

    out.extend(["## Top level", ""])
    table(Config, "")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a configuration, or print its reference.")
    add_arguments(parser)
    parser.add_argument("--markdown", action="store_true", help="print docs/CONFIG.md")
    parser.add_argument("--defaults", action="store_true", help="print the defaults as JSON")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    if args.defaults:
        print(json.dumps(Config().to_dict(), indent=2))
        return 0
    try:
        cfg = from_args(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
