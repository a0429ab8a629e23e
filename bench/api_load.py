#!/usr/bin/env python3
"""Latency and throughput of the web endpoints under bounded concurrent load on loopback.

Starts, as real subprocesses over a copy of the fixture status files:
  - a baseline: a trivial Flask app on waitress returning a constant (the floor of this stack),
  - memory_stats_api.py (GET /api/memory_stats),
  - monitor_server.py (GET /api/state, the page's data endpoint, and GET /api/history),
then drives each endpoint with ``--concurrency`` keep-alive clients for ``--seconds`` and prints
p50/p99 latency and requests/s side by side, first with the machine idle, then "with training
running": a real ``train.py`` run of the built-in model on generated data, writing into the very
status folder the servers read (when the built-in model is in models/cache), otherwise a torch matmul
loop on all cores; ``--background matmul`` forces the latter. The output says which ran.

    .venv/bin/python bench/api_load.py [--seconds 5] [--concurrency 8] [--background auto|train|matmul]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXTURES = REPO / "tests" / "fixtures" / "status"
MATMUL = ("import torch, time\n"
          "torch.set_num_threads(os.cpu_count() or 1)\n"
          "a = torch.randn(1024, 1024)\n"
          "while True:\n"
          "    a = torch.tanh(a @ a)\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not ready after {timeout}s")


def serve_baseline(port: int) -> int:
    from flask import Flask, jsonify
    from waitress import serve

    app = Flask("baseline")

    @app.get("/")
    def const():  # type: ignore[no-untyped-def]
        return jsonify({"ok": True})

    serve(app, host="127.0.0.1", port=port, threads=8, _quiet=True)
    return 0


def load(port: int, path: str, seconds: float, concurrency: int) -> dict[str, float]:
    """``concurrency`` threads, each with one keep-alive connection, for ``seconds``."""
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    errors[i] += 1
            except OSError:
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            lat[i].append(time.perf_counter() - t0)
        conn.close()

    t_start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start
    all_lat = sorted(x for w in lat for x in w)
    n = len(all_lat)
    q = statistics.quantiles(all_lat, n=100) if n >= 2 else [all_lat[0] if n else float("nan")] * 99
    return {"requests": n, "errors": sum(errors), "rps": n / elapsed,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def start_real_training(tmp: Path, sd: Path) -> subprocess.Popen:
    """train.py on the built-in model, CPU, 4-bit, with its status going to ``sd``; returns once it trains."""
    from ultimate_trainer.core import config
    from ultimate_trainer.core import status

    data = tmp / "bench_data.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(4000):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i % 7}?"},
                                             {"role": "assistant", "content": str(i + i % 7)}]}) + "\n")
    cfg = {"base_model": config.BUILTIN_MODEL, "load_in_4bit": True, "eval_steps": 50, "save_steps": 100000,
           "paths": {"root": str(tmp), "status": str(sd), "model_cache": str(REPO / "models" / "cache")},
           "lora": {"r": 8, "alpha": 16},
           "training": {"batch_size": 4, "gradient_accumulation_steps": 1, "max_seq_length": 128,
                        "gradient_checkpointing": False, "device": "cpu"},
           "eval": {"max_prompts": 4, "max_new_tokens": 8, "batch_size": 4}}
    (tmp / "bench_config.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(data), "--config", str(tmp / "bench_config.json")],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "train.log", "wb"), cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        st = status.read_json(sd / status.TRAINING_STATUS) or {}
        if st.get("pid") == proc.pid and st.get("state") == "training" and (st.get("run_step") or 0) >= 2:
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"train.py exited with {proc.returncode}: see {tmp / 'train.log'}")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("train.py did not start training within 300 s")


def make_status_dir(root: Path) -> Path:
    from ultimate_trainer.core import status

    sd = root / "status"
    shutil.copytree(FIXTURES, sd)
    # A realistic history length for the charts: 20,000 logged steps.
    with open(sd / status.STEPS_HISTORY, "a", encoding="utf-8") as f:
        f.write("\n")
        for i in range(20_000):
            f.write(json.dumps({"time": "2026-11-24T21:00:00+0000", "global_step": 2000 + i, "loss": 1.0 / (1 + i / 1000),
                                "learning_rate": 2e-4, "grad_norm": 0.5, "tokens_per_second": 900.0}) + "\n")
    return sd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="load duration per endpoint and phase")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent keep-alive clients")
    ap.add_argument("--background", choices=["auto", "train", "matmul"], default="auto",
                    help="load of the 'training running' phase (auto: real train.py when the built-in model is cached)")
    ap.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline)

    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="api_load-"))
    procs: list[subprocess.Popen] = []
    try:
        sd = make_status_dir(tmp)
        ports = {name: free_port() for name in ("baseline", "stats", "monitor")}
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": REPO}
        procs.append(subprocess.Popen([py, __file__, "--serve-baseline", str(ports["baseline"])], **quiet))
        procs.append(subprocess.Popen([py, str(REPO / "memory_stats_api.py"), "--port", str(ports["stats"]),
                                       "--status-dir", str(sd)], **quiet))
        procs.append(subprocess.Popen([py, str(REPO / "monitor_server.py"), "--port", str(ports["monitor"]),
                                       "--status-dir", str(sd)], **quiet))
        targets = [("baseline constant (Flask+waitress)", ports["baseline"], "/", procs[0]),
                   ("stats  /api/memory_stats", ports["stats"], "/api/memory_stats", procs[1]),
                   ("monitor /api/state", ports["monitor"], "/api/state", procs[2]),
                   ("monitor /api/history", ports["monitor"], "/api/history", procs[2])]
        for _, port, path, proc in targets:
            wait_ready(port, path, proc)

        use_train = args.background == "train" or (
            args.background == "auto" and (REPO / "models" / "cache" / "smollm2-135m-instruct").is_dir())
        bg_name = ("real train.py: built-in SmolLM2-135M, 4-bit, CPU, status into the served folder" if use_train
                   else "torch matmul loop on all cores (no train.py run)")
        results: dict[str, dict[str, dict[str, float]]] = {}
        print(f"machine: {os.cpu_count()} CPU cores; concurrency {args.concurrency}; {args.seconds:g} s per endpoint;"
              f" history 20,120 steps")
        for phase in ("idle", "training"):
            bg = None
            if phase == "training":
                if use_train:
                    bg = start_real_training(tmp, sd)
                else:
                    bg = subprocess.Popen([py, "-c", "import os\n" + MATMUL], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, cwd=REPO)
                    time.sleep(2.0)  # let it reach full load
                print(f"\nwith training running ({bg_name})")
            else:
                print("\nwithout training")
            try:
                print(f"  {'endpoint':38} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6}")
                for name, port, path, _ in targets:
                    r = load(port, path, args.seconds, args.concurrency)
                    results.setdefault(phase, {})[name] = r
                    print(f"  {name:38} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['rps']:8.0f} {r['errors']:6d}")
            finally:
                if bg is not None:
                    st = json.loads((sd / "training_status.json").read_text()) if use_train else {}
                    if st:
                        print(f"  (trainer was at run step {st.get('run_step')}, {st.get('tokens_per_second')} tokens/s)")
                    bg.terminate()
                    try:
                        bg.wait(timeout=60)  # SIGTERM: train.py saves a checkpoint first
                    except subprocess.TimeoutExpired:
                        bg.kill()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"background": bg_name, "results": results}, indent=2))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
