"""bench/gpu_proof.sh's logic, run here as its dry run: every stage on the CPU with tiny shapes.

The real run needs a GPU (docs/PERFORMANCE.md, "GPU proof"); this checks that each stage runs the
project's real code to the end and that the JSON it leaves holds the figures the issue asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_proof_dry_run_runs_every_stage_and_writes_its_figures(tmp_path, builtin_model_dir):
    out = tmp_path / "proof"
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_proof.sh"), str(out), "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "PYTHON": sys.executable})
    report = json.loads((out / "gpu_proof.json").read_text())
    assert r.returncode == 0, (r.stdout[-3000:], json.dumps(report)[:3000])
    assert report["dry_run"] and report["ok"] and (out / "gpu_proof.log").is_file()
    for model in ("builtin", "qwen7b"):  # NF4 steps, a checkpoint, a resume that continues the run
        stage = report[model]
        assert stage["train"]["exit_code"] == 0 and stage["resume"]["exit_code"] == 0
        assert stage["checkpoint_after_first"] and stage["global_step"] > int(stage["checkpoint_after_first"][11:])
    assert report["builtin"]["attention"]["implementation"] == "segmented_sdpa"
    assert report["qwen7b"]["build"]["size_gb"] > 0
    t = report["throughput"]  # both sides measured on the same examples
    assert t["baseline"]["tokens_per_second"] > 0 and t["train_py"]["tokens_per_second"] > 0 and t["speedup"]
    assert report["worker"]["device"] == "cpu" and report["worker"]["result"]["code"] == 0
    assert report["workbench"]["device"] == "cpu" and report["workbench"]["answer_chars"] >= 0
