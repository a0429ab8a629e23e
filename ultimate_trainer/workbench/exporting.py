"""The workbench's Export tab: runs ``export.py`` as a child process (docs/EXPORT.md).

The export is its own process (the workbench never imports another process package, and a merge
of a 7B model must not live in the workbench's memory); it runs at low CPU priority, one at a time,
with the workbench's own config written to its cache folder, and the tab shows its log and the
folder it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from ultimate_trainer.core.config import Config

REPO = Path(__file__).resolve().parents[2]
FORMATS = [("merged safetensors (hf: vLLM, SGLang, transformers)", "hf"),
           ("LoRA adapter + base reference (vLLM --enable-lora, Ollama ADAPTER)", "adapter"),
           ("GGUF + Ollama Modelfile (llama.cpp, Ollama)", "gguf")]
QUANTS = ["f16", "bf16", "f32", "q8_0", "q4_0"]
_running = threading.Lock()


def command(cfg: Config, key: str, fmt: str, quant: str) -> list[str]:
    """The export.py command line for the workbench's config (written to ``.work/workbench/``)."""
    conf = cfg.path("root") / ".work" / "workbench" / "export-config.json"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    return [sys.executable, str(REPO / "export.py"), "--config", str(conf), "--model", key, "--format", fmt,
            "--quant", quant]


def run(cfg: Config, key: str, fmt: str, quant: str) -> Iterator[str]:
    """The export's log as it grows; the last line says where the export is, or why there is none."""
    if not _running.acquire(blocking=False):
        yield "An export is already running: wait for it to finish."
        return
    try:
        proc = subprocess.Popen(command(cfg, key, fmt, quant), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: os.nice(10))
        log = ""
        assert proc.stdout is not None
        for line in proc.stdout:
            log += line
            yield log
        rc = proc.wait()
        yield log + ("\nDone." if rc == 0 else f"\nThe export failed (exit code {rc}); the reason is above.")
    finally:
        _running.release()


def build_tab(gr: Any, cfg: Config, choices: Any) -> None:
    """The Export tab, inside the workbench's ``gr.Tabs()``; ``choices()`` gives the model picker's entries."""
    with gr.Tab("Export", id="export"):
        gr.Markdown("Export a model for vLLM, SGLang, llama.cpp or Ollama (docs/EXPORT.md). It runs as "
                    "`python export.py` at low priority and writes a new folder under `exports/`.")
        with gr.Row():
            model = gr.Dropdown(choices=[("adopted (newest consolidation the gate accepted)", "adopted"),
                                         *choices()], value="latest", label="model")
            fmt = gr.Radio(choices=FORMATS, value="hf", label="format")
            quant = gr.Dropdown(choices=QUANTS, value="f16", label="GGUF tensor type")
        go = gr.Button("Export", variant="primary")
        out = gr.Textbox(label="export log", lines=12, max_lines=30, autoscroll=True)

        def export(key: str, form: str, q: str) -> Iterator[str]:
            yield from run(cfg, key, form, q)

        go.click(export, [model, fmt, quant], out, api_name="export")
