"""The GPU proof's driver (``bench/gpu_proof.sh`` runs it): every GPU figure the project lacks, in one go.

    python bench/gpu_proof.py --out DIR [--dry-run] [--budget 480]

Stages, each a child process with a time limit, each writing its result into ``DIR/gpu_proof.json``
as it ends (a stage that fails or runs out of time is recorded so, and the next one runs):

1. ``env``: the GPU's name and memory, torch/CUDA, transformers, peft, bitsandbytes versions, and
   which attention kernels exist (FlashAttention 2 varlen, flex attention, SDPA's backends).
2. ``builtin`` / ``qwen7b``: the built-in model's architecture (SmolLM2-135M's config, random
   weights) and Qwen2.5-7B's exact shape (built in NF4 layer by layer on the GPU, bench/qwen7b_cpu.py)
   through the real ``train.py`` in NF4 with bf16 compute: 2 steps and a checkpoint, then a resume
   for a third step; the attention path the loaded model used, seconds per step, peak VRAM.
3. ``throughput``: tokens/s, peak VRAM and MFU on the built-in architecture at 2,048-token
   padding-free rows, a plain Hugging Face Trainer + PEFT baseline (the same examples, dynamic
   padding by ``DataCollatorForSeq2Seq``, batch of the same examples) beside ``train.py``, both in
   NF4 with bf16 compute, gradient checkpointing, LoRA r16 on the seven projections; MFU counts 4N
   FLOPs a trained token (forward 2N, backward to the activations 2N; the frozen base has no weight
   gradients) against the GPU's dense bf16 peak.
4. ``worker`` / ``workbench``: the daemon's worker trains a run on the GPU (``training_status.json``
   says ``cuda``), and the workbench's loader places a model and a checkpoint there and answers.

``--dry-run``: the same stages and code on the CPU with tiny shapes (fp32, minutes): what the test
runs. Peak VRAM is read through NVML per process (the same reading for both sides of the
throughput comparison); on the CPU it is null.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# Dense bf16 peak of the GPUs this project may be lent (datasheets; SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}
BUILTIN_SHAPE = dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536)  # SmolLM2-135M
DRY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
QWEN7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064)
DRY_QWEN = dict(hidden=56, layers=2, heads=7, kv_heads=1, intermediate=112, vocab=152064)


# ----------------------------------------------------------------------------------------------- helpers

def gpu_memory_of(pid: int) -> int | None:
    """Bytes of GPU memory NVML says ``pid`` and its children hold now; None without a GPU."""
    try:
        import psutil
        import pynvml

        pynvml.nvmlInit()
        pids = {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid in pids and p.usedGpuMemory:
                    total += p.usedGpuMemory
        return total
    except Exception:  # noqa: BLE001 - no NVML, no GPU, or the process is gone
        return None


def run_child(cmd: list[str], log_path: Path, timeout: float, env: dict[str, str] | None = None,
              until: Any = None) -> dict[str, Any]:
    """``cmd`` to its end, or SIGTERM when ``until()`` holds, or killed at ``timeout``: code, seconds, peak VRAM."""
    import signal

    t0 = time.monotonic()
    peak: int | None = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env or os.environ.copy())
        while proc.poll() is None:
            used = gpu_memory_of(proc.pid)
            if used is not None:
                peak = max(peak or 0, used)
            if until is not None and until():
                proc.send_signal(signal.SIGTERM)
                until = None
            if time.monotonic() - t0 > timeout:
                proc.kill()
                proc.wait()
                return {"exit_code": None, "timed_out": True, "seconds": round(time.monotonic() - t0, 1),
                        "peak_vram_gb": None if peak is None else round(peak / 1e9, 2), "log": log_path.name}
            try:
                proc.wait(timeout=0.25)  # returns as the child ends: no poll interval added to each stage
            except subprocess.TimeoutExpired:
                pass
    return {"exit_code": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "peak_vram_gb": None if peak is None else round(peak / 1e9, 2), "log": log_path.name}


def chat_lines(n: int, seed: int, min_words: int, max_words: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = "river stone cloud paper light orbit maple copper garden signal harbor winter amber delta".split()
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(words, int(rng.integers(min_words, max_words)) // 3))
        a = " ".join(rng.choice(words, int(rng.integers(min_words, max_words))))
        out.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    return out


def project_config(root: Path, base: Path, *, device: str, max_len: int, batch: int, r: int, save_steps: int,
                   probe: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "base_model": str(base), "load_in_4bit": True, "eval_steps": 0, "save_steps": save_steps,
        "paths": {"root": str(root), "model_cache": str(root / "cache")},
        "quantization": {"compute_dtype": "auto"},
        "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "training": {"batch_size": batch, "gradient_accumulation_steps": 1, "max_seq_length": max_len,
                     "warmup_steps": 0, "gradient_checkpointing": True, "device": device, "packing": "on",
                     "rehearsal_fraction": 0.0, "replay_fraction": 0.0, "logging_steps": 1},
        "data": {"heldout_fraction": 0.0},
        "eval": {"at_start": False, "probe_file": None},
        "daemon": {"worker_max_growth_mb": 1e6, "prefetch_tokenize": "off"},
        "status": {"interval_seconds": 1.0},
    }
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    return root / "config.json"


def build_llama(out: Path, tokenizer_dir: Path, shape: dict[str, int]) -> Path:
    """The built-in model's architecture (a Llama, tied embeddings) with random weights, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=8192, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def steps_logged(root: Path) -> list[dict[str, Any]]:
    path = root / "status" / "history" / "steps.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def peak_tflops(gpu_name: str | None) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if gpu_name and key in gpu_name:
            return value
    return None


# ----------------------------------------------------------------------------------------------- children

def child_attention(base: str, device: str) -> None:
    """Print which attention the project's loader gives this base, and the kernels available."""
    from ultimate_trainer.core import config
    from ultimate_trainer.model.loading import load_base_model

    cfg = config.load(None, [f"training.device={device}", "load_in_4bit=true"])
    model = load_base_model(cfg, base, quantize=True, device=device)
    import torch

    info = {"implementation": model.config._attn_implementation,
            "flash_attn_installed": _importable("flash_attn"),
            "flex_attention": hasattr(torch.nn.attention, "flex_attention") if hasattr(torch.nn, "attention") else False}
    if torch.cuda.is_available():
        info["sdpa_backends"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    print(json.dumps(info))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def child_baseline(base: str, data: str, device: str, max_len: int, batch: int, steps: int, r: int) -> None:
    """A plain HF Trainer + PEFT QLoRA run, dynamic padding; prints tokens/s over steps after the first two."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainerCallback, TrainingArguments)

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa",
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
                                                 **({"device_map": {"": 0}} if cuda else {}))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    rows = []
    for line in Path(data).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"][:max_len]
        rows.append({"input_ids": ids, "labels": [-100] * len(p_ids) + ids[len(p_ids):]})
    counted = {"tokens": 0, "t0": None}

    class Count(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                if cuda:
                    torch.cuda.synchronize()
                counted["t0"] = time.perf_counter()

    class Counting(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step >= 2:
                counted["tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    args = TrainingArguments(output_dir=str(Path(data).parent / "baseline-out"), max_steps=steps,
                             per_device_train_batch_size=batch, learning_rate=2e-4, logging_steps=1,
                             save_strategy="no", report_to="none", bf16=cuda, use_cpu=not cuda,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                             train_sampling_strategy="sequential")
    trainer = Counting(model=model, args=args, train_dataset=rows, callbacks=[Count()],
                       data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - counted["t0"]
    print(json.dumps({"tokens_per_second": counted["tokens"] / seconds, "tokens": counted["tokens"],
                      "torch_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None}))


# ----------------------------------------------------------------------------------------------- stages

class Proof:
    def __init__(self, out: Path, dry_run: bool, budget: float, tokenizer: Path):
        self.out, self.dry, self.budget, self.tokenizer = out, dry_run, budget, tokenizer
        self.t0 = time.monotonic()
        self.device = "cpu" if dry_run else "cuda"
        self.report: dict[str, Any] = {"dry_run": dry_run, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime())}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.report["seconds"] = round(time.monotonic() - self.t0, 1)
        (self.out / "gpu_proof.json").write_text(json.dumps(self.report, indent=2))

    def stage(self, name: str, fn: Any, share: float) -> None:
        """Run ``fn`` with ``share`` of the time left; record its result or why it failed."""
        t = time.monotonic()
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        try:
            result = fn(max(60.0, self.left() * share))
        except Exception as e:  # noqa: BLE001 - recorded; the next stage runs
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        result.setdefault("seconds", round(time.monotonic() - t, 1))
        self.report[name] = result
        self.save()
        print(f"   {json.dumps(result)[:400]}", flush=True)

    def py(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # -- stages
    def env_stage(self, _: float) -> dict[str, Any]:
        import torch
        import transformers

        info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                                "cuda": torch.version.cuda, "device": self.device}
        for name in ("peft", "bitsandbytes", "accelerate", "flash_attn"):
            try:
                info[name] = __import__(name).__version__
            except Exception:  # noqa: BLE001
                info[name] = None
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1),
                        peak_bf16_tflops=peak_tflops(p.name))
        self.report["gpu"] = info.get("gpu")
        return {"ok": True, **info}

    def train_stage(self, name: str, base: Path, timeout: float, steps: int) -> dict[str, Any]:
        """``steps`` steps and a checkpoint, then a resume for one more: exit codes, s/step, VRAM, attention."""
        root = self.out / name
        shutil.rmtree(root, ignore_errors=True)
        config = project_config(root, base, device=self.device, max_len=512, batch=4,
                                r=64 if name == "qwen7b" else 16, save_steps=steps)
        data = root / "data.jsonl"
        data.write_text("\n".join(chat_lines(4 * (steps + 1), 1, *((60, 140) if not self.dry else (10, 40)))) + "\n")
        first = run_child(self.py(str(REPO / "train.py"), str(data), "--config", str(config), "--max-steps",
                                  str(steps)), self.out / f"{name}-train.log", timeout * 0.6, self.env)
        ckpts = sorted((root / "checkpoints").glob("checkpoint-*"))
        second = run_child(self.py(str(REPO / "train.py"), str(data), "--config", str(config)),
                           self.out / f"{name}-resume.log", max(30.0, timeout * 0.4), self.env)
        resumed_text = (self.out / f"{name}-resume.log").read_text(errors="replace")
        logged = steps_logged(root)
        status = json.loads((root / "status" / "training_status.json").read_text())
        att = subprocess.run(self.py(__file__, "--child", "attention", str(base), self.device), capture_output=True,
                             text=True, cwd=REPO, env=self.env, timeout=max(60.0, timeout * 0.3)) \
            if name == "builtin" else None  # the same loader decides it for both models
        return {"ok": first["exit_code"] == 0 and second["exit_code"] == 0 and "continuing interrupted run"
                in resumed_text, "train": first, "resume": second,
                "checkpoint_after_first": ckpts[-1].name if ckpts else None,
                "global_step": status.get("global_step"), "device": status.get("device"),
                "losses": [s.get("loss") for s in logged], "tokens_per_second": [s.get("tokens_per_second")
                                                                                for s in logged],
                "attention": None if att is None else json.loads(att.stdout.strip().splitlines()[-1])
                if att.returncode == 0 else att.stderr[-500:]}

    def throughput_stage(self, base: Path, timeout: float) -> dict[str, Any]:
        """HF Trainer + PEFT (dynamic padding) beside train.py (padding-free rows), the same examples."""
        root = self.out / "throughput"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        max_len, batch, steps = (2048, 8, 14) if not self.dry else (256, 4, 4)
        data = root / "data.jsonl"
        # ~250 tokens an example on the GPU: 8 make a padding-free row of ~2,048 tokens
        data.write_text("\n".join(chat_lines(batch * steps, 7, *((20, 330) if not self.dry else (10, 60)))) + "\n")
        row_tokens = _mean_row_tokens(data, base, batch)
        base_run = run_child(self.py(__file__, "--child", "baseline", str(base), str(data), self.device, str(max_len),
                                     str(batch), str(steps), "16"), self.out / "baseline.log", timeout / 2, self.env)
        text = (self.out / "baseline.log").read_text(errors="replace").strip().splitlines()
        base_figures = json.loads(text[-1]) if base_run["exit_code"] == 0 and text else {}
        config = project_config(root / "project", base, device=self.device, max_len=max_len, batch=batch, r=16,
                                save_steps=10**6)
        proj = run_child(self.py(str(REPO / "train.py"), str(data), "--config", str(config)),
                         self.out / "project.log", timeout / 2, self.env)
        logged = steps_logged(root / "project")
        proj_tps = logged[-1].get("tokens_per_second") if len(logged) > 2 else None
        params = _params(base)
        peak = (self.report.get("env") or {}).get("peak_bf16_tflops")

        def mfu(tps: float | None) -> float | None:
            return None if not tps or not peak else round(4 * params * tps / (peak * 1e12), 4)

        b_tps = base_figures.get("tokens_per_second")
        return {"ok": base_run["exit_code"] == 0 and proj["exit_code"] == 0, "mean_row_tokens": row_tokens,
                "examples_a_step": batch, "steps": steps, "params": params,
                "baseline": {**base_run, **base_figures, "mfu": mfu(b_tps)},
                "train_py": {**proj, "tokens_per_second": proj_tps, "mfu": mfu(proj_tps)},
                "speedup": round(proj_tps / b_tps, 3) if proj_tps and b_tps else None}

    def worker_stage(self, base: Path, timeout: float) -> dict[str, Any]:
        from ultimate_trainer.core import worker_files

        root = self.out / "worker"
        shutil.rmtree(root, ignore_errors=True)
        config = project_config(root, base, device=self.device, max_len=128, batch=4, r=8, save_steps=100)
        data = root / "data.jsonl"
        data.write_text("\n".join(chat_lines(8, 3, 10, 40)) + "\n")
        wdir = root / "worker-dir"
        wdir.mkdir()
        req = worker_files.write_request(wdir, [data])
        r = run_child(self.py("-m", "ultimate_trainer.trainer.worker", "--worker-dir", str(wdir), "--config",
                              str(config)), self.out / "worker.log", timeout, self.env,
                      until=lambda: worker_files.read_result(wdir, req.seq) is not None)
        result = worker_files.read_result(wdir, req.seq) or {}
        status = json.loads((root / "status" / "training_status.json").read_text())
        return {"ok": result.get("code") == 0 and status.get("device") == self.device, **r, "result": result,
                "device": status.get("device")}

    def workbench_stage(self, base: Path, timeout: float) -> dict[str, Any]:
        ckpts = sorted((self.out / "builtin" / "checkpoints").glob("checkpoint-*"))
        r = subprocess.run(self.py(__file__, "--child", "workbench", str(base), str(ckpts[-1]) if ckpts else "",
                                   self.device), capture_output=True, text=True, cwd=REPO, env=self.env,
                           timeout=timeout)
        if r.returncode != 0:
            return {"ok": False, "error": r.stderr[-800:]}
        return {"ok": True, **json.loads(r.stdout.strip().splitlines()[-1])}


def child_workbench(base: str, checkpoint: str, device: str) -> None:
    """What the workbench does to answer: pick the device, load base + checkpoint there, answer."""
    from ultimate_trainer.core import config
    from ultimate_trainer.model.loading import inference_device, load_inference_model, load_tokenizer
    from ultimate_trainer.model.scoring import generate_answers

    cfg = config.load(None, [f"training.device={device}"])
    where, why = inference_device(cfg, base, cfg.monitor.workbench_gpu_margin_gb)
    model = load_inference_model(cfg, base, checkpoint or None, where)
    answers = generate_answers(model, load_tokenizer(base), [[{"role": "user", "content": "Hello"}]], 8, 1)
    print(json.dumps({"device": where, "why": why, "param_device": str(next(model.parameters()).device),
                      "answer_chars": len(answers[0])}))


def _mean_row_tokens(data: Path, base: Path, batch: int) -> float:
    """Mean tokens of ``batch`` examples back to back (a padding-free row), by the base's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    lengths = [len(tok(tok.apply_chat_template(json.loads(x)["messages"], tokenize=False),
                       add_special_tokens=False)["input_ids"]) for x in data.read_text().splitlines() if x.strip()]
    return round(sum(lengths) / len(lengths) * batch, 1) if lengths else 0.0


def _params(base: Path) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, rest = argv[1], argv[2:]
        if kind == "attention":
            child_attention(*rest)
        elif kind == "baseline":
            b, d, dev, ml, bs, st, r = rest
            child_baseline(b, d, dev, int(ml), int(bs), int(st), int(r))
        elif kind == "workbench":
            child_workbench(*rest)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny shapes")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all stages together (default 480 on the GPU, 3600 for a dry run on a busy CPU)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a ChatML tokenizer folder (default: the built-in model's, converted here)")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from ultimate_trainer.model.loading import ensure_builtin_cache

        tokenizer = ensure_builtin_cache(REPO / "models" / "cache")
    proof = Proof(args.out, args.dry_run, args.budget or (3600.0 if args.dry_run else 480.0), tokenizer)
    skip = set(filter(None, args.skip.split(",")))
    proof.stage("env", proof.env_stage, 0.01)
    models = args.out / "models"
    builtin = build_llama(models / "builtin", tokenizer, DRY_SHAPE if args.dry_run else BUILTIN_SHAPE)
    if "builtin" not in skip:
        proof.stage("builtin", lambda t: proof.train_stage("builtin", builtin, t, 2), 0.15)
    if "throughput" not in skip:
        proof.stage("throughput", lambda t: proof.throughput_stage(builtin, t), 0.35)
    if "worker" not in skip:
        proof.stage("worker", lambda t: proof.worker_stage(builtin, t), 0.15)
    if "workbench" not in skip:
        proof.stage("workbench", lambda t: proof.workbench_stage(builtin, t), 0.2)
    if "qwen7b" not in skip:
        from qwen7b_cpu import build_base

        def qwen(t: float) -> dict[str, Any]:
            shape = DRY_QWEN if args.dry_run else QWEN7B
            built = build_base(models / "qwen7b", shape, device="cpu" if args.dry_run else "cuda",
                               tokenizer_dir=tokenizer)
            return {"build": built, **proof.train_stage("qwen7b", models / "qwen7b", t, 1)}

        proof.stage("qwen7b", qwen, 0.95)
    proof.report["ok"] = all(isinstance(v, dict) and v.get("ok") for k, v in proof.report.items()
                             if k in ("env", "builtin", "throughput", "worker", "workbench", "qwen7b"))
    proof.save()
    print(json.dumps({"ok": proof.report["ok"], "json": str(args.out / "gpu_proof.json")}))
    return 0 if proof.report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
