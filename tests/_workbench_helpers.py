"""A fake project for the workbench tests: a tiny random model, two runs of known files with real
(randomly initialised, so answers differ) LoRA adapters sealed as complete checkpoints, and a run
history in ``status/history/``. Also a real uvicorn server in a background thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import status
from ultimate_trainer.core.lineage import run_files
from ultimate_trainer.core.records import FileReport

SKILLS = {"math.jsonl": "arithmetic", "geo.jsonl": "geography"}


def add_checkpoint(root: Path, model_dir: Path, step: int, run_id: str, files: list[dict], run_step: int,
                   total: int, seed: int) -> Path:
    """A real PEFT adapter over ``model_dir`` with random (non-zero) LoRA weights, sealed like training seals it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    path = root / "checkpoints" / f"checkpoint-{step}"
    peft.save_pretrained(path)
    ck.mark_complete(path, {"global_step": step, "run_id": run_id, "run_step": run_step, "run_total_steps": total,
                            "run_complete": run_step >= total, "files": files, "base_model": str(model_dir),
                            "base_model_name": str(model_dir), "load_in_4bit": False})
    return path


def fake_history(status_dir: Path) -> None:
    """Two evaluations (steps 2 and 4) over two files with skills, plus logged steps and val loss."""
    hist = status_dir / "history"
    hist.mkdir(parents=True, exist_ok=True)
    for step, right in ((2, {"math.jsonl:1"}), (4, {"math.jsonl:1", "math.jsonl:2", "geo.jsonl:1"})):
        for source, prompt, expected in (("math.jsonl:1", "2+2?", "4"), ("math.jsonl:2", "3+3?", "6"),
                                         ("geo.jsonl:1", "Capital of France?", "Paris"),
                                         ("geo.jsonl:2", "<b>bold</b> & **stars**?", "<script>x</script>")):
            ok = source in right
            status.append_jsonl(hist / "examples.jsonl", {
                "time": "2026-11-27T10:00:00+00:00", "global_step": step, "prompt": prompt, "expected": expected,
                "generated": expected if ok else "no idea", "correct": ok, "matcher": "normalized",
                "source": source, "skill": SKILLS[source.split(":")[0]]})
        status.append_jsonl(hist / "evals.jsonl", {"global_step": step, "run_id": "r1", "correct": len(right),
                                                   "total": 4, "accuracy": 25.0 * len(right),
                                                   "val_loss": 3.0 - step * 0.25})
    for step in range(1, 5):
        status.append_jsonl(hist / "steps.jsonl", {"global_step": step, "run_id": "r1", "loss": 4.0 - step * 0.5,
                                                   "grad_norm": 1.0 + step * 0.1, "learning_rate": 1e-3})


def make_workbench_project(root: Path, model_dir: Path) -> tuple[Path, list[dict]]:
    """The config path and the files trained: run r1 trained a.jsonl (checkpoint-3), run r2 b.jsonl (checkpoint-6)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.json"
    config.write_text(json.dumps({
        "base_model": str(model_dir), "load_in_4bit": False, "paths": {"root": str(root)},
        "training": {"device": "cpu", "max_seq_length": 256},
        "eval": {"max_new_tokens": 6, "batch_size": 4, "matcher": "exact"},
        "monitor": {"workbench_threads": 1}}))
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "a.jsonl").write_text('{"prompt": "1?", "response": "1"}\n{"prompt": "2?", "response": "2"}\n')
    (data / "b.jsonl").write_text('{"prompt": "3?", "response": "3"}\n')
    reports = {str(data / n): FileReport(sha256=f"{n[0] * 64}", size_bytes=(data / n).stat().st_size,
                                         examples=2 if n == "a.jsonl" else 1) for n in ("a.jsonl", "b.jsonl")}
    r1 = run_files([data / "a.jsonl"], reports, "2026-11-27T09:00:00+00:00")
    r2 = run_files([data / "b.jsonl"], reports, "2026-11-27T11:00:00+00:00")
    add_checkpoint(root, model_dir, 3, "r1", r1, 3, 3, seed=1)
    add_checkpoint(root, model_dir, 6, "r2", r2, 3, 3, seed=2)
    fake_history(root / "status")
    return config, r1 + r2


class UvicornThread:
    """The workbench ASGI app served by a real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1"):
        from ultimate_trainer.workbench.app import bind, server

        self.sock = bind(host, 0)
        assert self.sock is not None
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/"
        self.server = server(app, self.sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "UvicornThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def raw_get(port: int, path: str, host_header: str) -> tuple[int, str]:
    """A GET with a chosen Host header (http clients set it from the URL)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def dumps(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False)


def light_project(root: Path, checkpoints: int = 2) -> Path:
    """A project without any model: a base that does not exist and ``checkpoints`` sealed but empty
    checkpoint folders (listed in the pickers; loading one fails). For the guard's tests, which need
    the page and its routes, never an answer. Returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.json"
    config.write_text(json.dumps({"base_model": str(root / "no-model"), "load_in_4bit": False,
                                  "paths": {"root": str(root)}, "training": {"device": "cpu"}}))
    for step in range(1, checkpoints + 1):
        path = root / "checkpoints" / f"checkpoint-{step}"
        path.mkdir(parents=True)
        ck.mark_complete(path, {"global_step": step, "run_id": "r1", "run_step": step, "run_total_steps": step,
                                "run_complete": True, "files": [], "base_model": str(root / "no-model"),
                                "load_in_4bit": False})
    return config
