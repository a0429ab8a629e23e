"""Qwen2.5-7B's exact shape, random weights, through the real train.py, the worker and the merge, on the CPU.

    python bench/qwen7b_cpu.py [--out DIR] [--layers 28] [--hidden 3584 ...] [--stages build,train,worker,merge]

1. **build**: the base folder, in NF4 from the start. Qwen2.5-7B-Instruct's config values (hidden
   3,584, 28 layers, 28 query / 4 key-value heads, intermediate 18,944, vocabulary 152,064,
   untied, q/k/v biases, rope theta 1e6) with random weights (std 0.02), written one decoder layer
   a shard. ONE decoder layer's seven projections are drawn in bf16 and quantized by bitsandbytes
   (NF4, double quantization, blocks of 64), one at a time, and those same quantized tensors are
   written for all 28 layers (each layer keeps its own random biases): a step's speed and memory
   do not depend on the weights' values, and quantizing every layer took 40 min on two busy cores
   (24 s this way). The embeddings and the output layer are drawn in their stored dtype (bf16).
   No full-precision copy of the model ever exists (a bf16 copy is 15 GB). The folder is what
   transformers saves for a 4-bit model, so ``base_model`` points at it. The tokenizer is the
   built-in model's (ChatML, like Qwen's).
2. **train**: ``train.py --max-steps 1`` on 8 chat examples of ~128 tokens, LoRA r64 on all seven
   projections, gradient checkpointing, padding-free rows of 4 examples (~512 tokens): one
   optimizer step and its checkpoint.
3. **worker**: the daemon's worker process takes the same file: it resumes the interrupted run
   and trains its second step, and checkpoints it.
4. **merge**: ``python -m ultimate_trainer.trainer.consolidation`` with its gate: the 7B does not
   fit twice in full precision here, so it merges layer by layer (trainer/consolidation/merge.py).
5. **layerwise** (only when named in ``--stages``): the layer-by-layer merge alone
   (``merge_layerwise``) on a random r64 adapter, for its time and memory without a trained checkpoint.

Compute is ``quantization.compute_dtype: auto``: float32 on the CPU. bf16 matmuls on a CPU without
AVX512-BF16 run 3x to 100x slower (docs/PERFORMANCE.md); the first attempt asked for bf16 and its
step never ended.

Rehearsal is off and the probe has two questions of 4 answer tokens: generating hundreds of
answers with a 7B model on two CPU cores would take hours. Each stage is a child process; its wall
time, peak RSS and the 1-minute load average (polled every 0.5 s) and what it logged go to
``DIR/qwen7b_cpu.json`` as each stage ends, so a run cut short still reports what it reached.
``--layers 2`` (or smaller ``--hidden``/``--intermediate``) checks the script in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QWEN7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064)
STAGES = ("build", "train", "worker", "merge")  # and "layerwise", on request only (below)


def _rss_tree(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
    except psutil.Error:
        return 0


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                 until: Any = None) -> dict[str, Any]:
    """Run ``cmd`` to its end (or until ``until()`` holds, then SIGTERM): seconds, peak RSS, exit code."""
    t0 = time.monotonic()
    peak = 0
    loads: list[float] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, _rss_tree(proc.pid))
            loads.append(os.getloadavg()[0])
            if until is not None and until():
                proc.send_signal(signal.SIGTERM)
                until = None
            time.sleep(0.5)
    return {"exit_code": proc.returncode, "seconds": round(time.monotonic() - t0, 1), "peak_rss_gb": round(peak / 1e9, 2),
            "load_average_1min": {"min": min(loads, default=None), "max": max(loads, default=None),
                                  "mean": round(sum(loads) / len(loads), 2) if loads else None},
            "log": str(log_path)}


def qwen_config(shape: dict[str, int], tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=32768, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")


def build_base(out: Path, shape: dict[str, int], seed: int = 0, device: str = "cpu",
               tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """The NF4 base folder, one decoder layer a shard; returns its size and the time it took.

    ``device``: where the weights are drawn and quantized (``cuda`` in bench/gpu_proof.py)."""
    import resource

    import torch
    from bitsandbytes.functional import quantize_4bit
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from ultimate_trainer.model.loading import ensure_builtin_cache

    t0 = time.monotonic()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or ensure_builtin_cache(REPO / "models" / "cache"))
    cfg = qwen_config(shape, tok)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i, kv = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    weight_map: dict[str, str] = {}
    total = 0

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.bfloat16, device=device) * 0.02

    def write(tensors: dict[str, torch.Tensor], name: str) -> None:
        nonlocal total
        tensors = {k: t.cpu().contiguous() for k, t in tensors.items()}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    n_shards = shape["layers"] + 2
    write({"model.embed_tokens.weight": rand(shape["vocab"], h)}, f"model-00001-of-{n_shards:05d}.safetensors")
    projections = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                   "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    # One decoder layer's projections, quantized once and written for every layer: a step's time and
    # memory do not depend on the weights' values, and quantizing 28 layers on two cores took 40 min.
    shared: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in projections.items():
        w = rand(fan_out, fan_in)
        q, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        del w
        shared[f"{name}.weight"] = q.cpu()
        for k, v in state.as_dict(packed=True).items():
            shared[f"{name}.weight.{k}"] = v.cpu()
    print(f"build: one layer's 7 projections quantized ({time.monotonic() - t0:.0f} s)", flush=True)
    for layer in range(shape["layers"]):
        prefix = f"model.layers.{layer}"
        tensors = {f"{prefix}.{k}": v for k, v in shared.items()}
        for name, width in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            tensors[f"{prefix}.self_attn.{name}.bias"] = rand(width)
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        if device != "cpu":
            torch.cuda.synchronize()
        write(tensors, f"model-{layer + 2:05d}-of-{n_shards:05d}.safetensors")
        del tensors
        print(f"build: layer {layer + 1}/{shape['layers']} written ({time.monotonic() - t0:.0f} s)", flush=True)
    write({"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(shape["vocab"], h)},
          f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors")
    config = cfg.to_dict()
    config["architectures"] = ["Qwen2ForCausalLM"]
    config["quantization_config"] = quant.to_dict()
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=1))
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"seconds": round(time.monotonic() - t0, 1), "size_gb": round(total / 1e9, 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}


def make_project(root: Path, base: Path, probe: bool = True) -> tuple[Path, Path]:
    """The project's config.json and its data file (8 chat examples of ~128 tokens: 2 padding-free rows of ~512)."""
    root.mkdir(parents=True, exist_ok=True)
    words = "river stone cloud paper light orbit maple copper garden signal harbor winter".split()
    with open(root / "data.jsonl", "w") as f:
        for n in range(8):
            q = " ".join(words[(n + k) % len(words)] for k in range(50))
            a = " ".join(words[(3 * n + k) % len(words)] for k in range(60))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    (root / "probe.jsonl").write_text(
        json.dumps({"prompt": "What is 2 plus 2? Answer with the number.", "completion": "4"}) + "\n"
        + json.dumps({"prompt": "Capital of France? One word.", "completion": "Paris"}) + "\n")
    cfg = {
        "base_model": str(base), "load_in_4bit": True, "eval_steps": 0, "save_steps": 1,
        "paths": {"root": str(root), "model_cache": str(REPO / "models" / "cache")},
        "quantization": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "lora": {"r": 64, "alpha": 128, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "training": {"batch_size": 4, "gradient_accumulation_steps": 1, "max_seq_length": 512, "warmup_steps": 0,
                     "gradient_checkpointing": True, "device": "cpu", "packing": "on", "rehearsal_fraction": 0.0,
                     "replay_fraction": 0.0, "seed": 42},
        "data": {"heldout_fraction": 0.0},
        "eval": {"at_start": False, "probe_file": "probe.jsonl" if probe else None, "probe_max_new_tokens": 4, "batch_size": 2,
                 "max_new_tokens": 4},
        "consolidation": {"gate": True, "max_prompts": 2},
        "daemon": {"worker_max_growth_mb": 100000},
        "status": {"interval_seconds": 2.0},
    }
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    return root / "config.json", root / "data.jsonl"


def step_seconds(log_path: Path) -> list[float]:
    """Seconds between consecutive step lines of a training log (the first from the run's start line)."""
    stamps = []
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", line)
        if m and (" run " in line and "examples" in line or re.search(r" step \d+ \(run", line)):
            stamps.append(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def dir_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "qwen7b_cpu")
    for k, v in QWEN7B.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--no-probe", action="store_true", help="no probe (training's baseline, the gate's probe): "
                    "its 2 x 4 tokens took 6-10 min of a 7B on this shared CPU")
    args = ap.parse_args(argv)
    shape = {k: getattr(args, k) for k in QWEN7B}
    stages = args.stages.split(",")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "qwen7b_cpu.json"
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update(shape=shape, machine=f"{os.cpu_count()} CPUs, shared with other sessions")

    def save() -> None:
        report_path.write_text(json.dumps(report, indent=2))

    base = out / "base"
    if "build" in stages or not base.is_dir():
        report["build"] = build_base(base, shape)
        save()
    config, data = make_project(out / "project", base, probe=not args.no_probe)
    py = [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if "train" in stages:
        shutil.rmtree(out / "project" / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "project" / "status", ignore_errors=True)
        r = run_measured(py + [str(REPO / "train.py"), str(data), "--config", str(config), "--max-steps", "1"],
                         out / "train.log", env)
        r["step_seconds"] = step_seconds(out / "train.log")
        ck = out / "project" / "checkpoints" / "checkpoint-1"
        r["checkpoint_gb"] = dir_gb(ck) if ck.is_dir() else None
        report["train"] = r
        save()
    if "worker" in stages:
        from ultimate_trainer.core import worker_files

        wdir = out / "worker"
        shutil.rmtree(wdir, ignore_errors=True)
        wdir.mkdir()
        req = worker_files.write_request(wdir, [data])
        r = run_measured(py + ["-m", "ultimate_trainer.trainer.worker", "--worker-dir", str(wdir), "--config",
                               str(config)], out / "worker.log", env,
                         until=lambda: worker_files.read_result(wdir, req.seq) is not None)
        r["result"] = worker_files.read_result(wdir, req.seq)
        r["step_seconds"] = step_seconds(out / "worker.log")
        ck = out / "project" / "checkpoints" / "checkpoint-2"
        r["checkpoint_gb"] = dir_gb(ck) if ck.is_dir() else None
        report["worker"] = r
        save()
    if "merge" in stages:
        r = run_measured(py + ["-m", "ultimate_trainer.trainer.consolidation", "--config", str(config)],
                         out / "merge.log", env)
        merged = sorted((out / "project" / "models" / "consolidated").glob("2*"))
        r["merged_gb"] = dir_gb(merged[-1]) if merged else None
        r["layer_by_layer"] = "layer by layer" in (out / "merge.log").read_text(errors="replace")
        report["merge"] = r
        save()
    if "layerwise" in stages:  # the layer-by-layer merge alone, on a random r64 adapter (no training needed)
        ck = out / "random-adapter"
        write_random_adapter(ck, shape)
        merged = out / "layerwise-merged"
        shutil.rmtree(merged, ignore_errors=True)
        merged.mkdir()
        code = ("import sys, torch; from pathlib import Path;"
                " from ultimate_trainer.model.merging import merge_layerwise;"
                " merge_layerwise(sys.argv[1], sys.argv[2], Path(sys.argv[3]), torch.float32)")
        r = run_measured(py + ["-c", code, str(base), str(ck), str(merged)], out / "layerwise.log", env)
        r["merged_gb"] = dir_gb(merged)
        report["layerwise"] = r
        save()
    print(json.dumps(report, indent=2))
    return 0


def write_random_adapter(path: Path, shape: dict[str, int], r: int = 64) -> None:
    """A PEFT LoRA folder of rank ``r`` on the seven projections of every layer, random A and B (fp32, as trained)."""
    import torch
    from safetensors.torch import save_file

    h, i, kv = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    dims = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(shape["layers"]):
        for name, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r) * 0.01
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r}))


if __name__ == "__main__":
    raise SystemExit(main())
