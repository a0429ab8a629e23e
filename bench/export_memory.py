#!/usr/bin/env python3
"""Peak memory of ``export.py --format hf|gguf`` on the built-in model with a LoRA checkpoint.

Builds a project in a temp folder whose base is the built-in SmolLM2-135M-Instruct (this checkout's
``models/cache``, float32 safetensors, 538 MB) with one checkpoint (a random LoRA adapter, r=16 on
every projection), then runs ``export.py`` of this checkout or of ``--repo`` (an older checkout, for
the side by side) as a child at niceness 10, once per format, and reports the child's

- peak RSS (``ru_maxrss``: anonymous memory plus the file pages it mapped, such as a memory-mapped
  safetensors shard, which the kernel may drop at any time), and
- peak anonymous RSS (``RssAnon`` of ``/proc/<pid>/status``, sampled every 10 ms): the memory the
  process itself allocated, which is what runs a machine out of memory.

    .venv/bin/python bench/export_memory.py [--repo DIR] [--formats hf,gguf] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def make_project(root: Path, cache: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ultimate_trainer.core import checkpoints as ck

    base = cache / "smollm2-135m-instruct"
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({
        "base_model": str(base), "load_in_4bit": False, "paths": {"root": str(root)},
        "training": {"device": "cpu"}, "monitor": {"workbench_threads": 2}}))
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"],
                                     init_lora_weights=False, task_type="CAUSAL_LM"))
    path = root / "checkpoints" / "checkpoint-4"
    peft.save_pretrained(path)
    ck.mark_complete(path, {"global_step": 4, "run_id": "r1", "run_step": 4, "run_total_steps": 4,
                            "run_complete": True, "files": [], "base_model": str(base),
                            "base_model_name": str(base), "load_in_4bit": False})
    return root / "config.json"


def peak_of(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd`` in a fresh wrapper (so ru_maxrss is this child's alone); sample its RssAnon."""
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], env=env, stdout=subprocess.PIPE, text=True)
    anon = [0]

    def sample() -> None:
        import psutil

        while proc.poll() is None:
            try:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    text = Path(f"/proc/{p.pid}/status").read_text()
                    kb = int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("RssAnon:")))
                    anon[0] = max(anon[0], kb)
            except (OSError, StopIteration, psutil.Error):
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    maxrss, rc = out.split()[-2:]
    if rc != "0":
        raise SystemExit(f"{' '.join(cmd)} exited {rc}")
    return {"peak_rss_mb": int(maxrss) / 1024, "peak_anon_mb": anon[0] / 1024, "seconds": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=HERE, help="checkout whose export.py runs (default: this one)")
    ap.add_argument("--formats", default="hf,gguf")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory(prefix="ut-export-mem-") as tmp:
        conf = make_project(Path(tmp) / "p", HERE / "models" / "cache")
        env = {**os.environ, "PYTHONPATH": str(args.repo)}
        for fmt in args.formats.split(","):
            for i in range(args.repeat):
                out = Path(tmp) / f"{fmt}-{i}"
                cmd = ["nice", "-n", "10", sys.executable, str(args.repo / "export.py"), "--config", str(conf),
                       "--model", "checkpoint-4", "--format", fmt, "--out", str(out)]
                r = peak_of(cmd, env)
                print(json.dumps({"repo": str(args.repo), "format": fmt, **{k: round(v, 1) for k, v in r.items()}}),
                      flush=True)


if __name__ == "__main__":
    main()
