"""Training metrics on the stats API's /metrics, read from the status files; checked by promtool when installed."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _stats_helpers import FakeNVML
from _web_helpers import FIXTURE_STATUS
from ultimate_trainer.core import status
from ultimate_trainer.core.times import epoch_seconds
from ultimate_trainer.web import sampler as stats
from ultimate_trainer.web import stats_api


def scrape(status_dir) -> str:
    sampler = stats.Sampler(status_dir, stats.Thresholds(), gpu=stats.GpuReader(FakeNVML()))
    r = stats_api.create_app(sampler).test_client().get("/metrics")
    assert r.status_code == 200
    return r.get_data(as_text=True)


def values(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def status_dir(tmp_path):
    d = tmp_path / "status"
    shutil.copytree(FIXTURE_STATUS, d)
    ts = json.loads((d / status.TRAINING_STATUS).read_text())
    ts["stability"] = {"loss_slope": -0.0031, "score": 91.5, "anomalies": 2, "anomalies_this_run": 1,
                       "last_anomaly": None}
    ts["retention"] = {"ratio": 0.97}
    status.atomic_write_json(d / status.TRAINING_STATUS, ts)
    return d


def test_training_figures_are_exported_from_the_status_files(status_dir):
    ts = json.loads((status_dir / status.TRAINING_STATUS).read_text())
    ds = json.loads((status_dir / status.DAEMON_STATUS).read_text())
    v = values(scrape(status_dir))
    assert v[("ut_training_global_step", ())] == ts["global_step"]
    assert v[("ut_training_loss", ())] == ts["loss"] and v[("ut_training_val_loss", ())] == ts["val_loss"]
    assert v[("ut_training_learning_rate", ())] == ts["learning_rate"]
    assert v[("ut_training_grad_norm", ())] == ts["grad_norm"]
    assert v[("ut_training_tokens_per_second", ())] == ts["tokens_per_second"]
    for w in ("overall", "last_20", "last_50"):
        assert v[("ut_training_accuracy_percent", (("window", w),))] == ts["accuracy"][w]
    assert v[("ut_training_retention_ratio", ())] == 0.97
    assert v[("ut_training_loss_slope", ())] == -0.0031 and v[("ut_training_stability_score", ())] == 91.5
    assert v[("ut_training_anomalies_total", ())] == 2
    assert v[("ut_training_state", (("state", ts["state"]),))] == 1.0
    assert sum(val for (name, _), val in v.items() if name == "ut_training_state") == 1.0
    assert v[("ut_checkpoint_last_step", ())] == ts["checkpoints"][-1]["global_step"]
    # Both ages are taken at the same scrape: they differ by the time between the two writes.
    ckpt_age, status_age = v[("ut_checkpoint_last_age_seconds", ())], v[("ut_training_status_age_seconds", ())]
    written_apart = epoch_seconds(ts["updated_at"]) - epoch_seconds(ts["checkpoints"][-1]["created_at"])
    assert ckpt_age >= 0 and ckpt_age - status_age == pytest.approx(written_apart, abs=1e-3)
    waiting = sum(1 for q in ds["queue"] if q["state"] == "waiting")
    assert v[("ut_queue_files", (("state", "waiting"),))] == waiting
    assert v[("ut_queue_files", (("state", "failed"),))] == ds["failed_files"]
    assert v[("ut_queue_files", (("state", "done"),))] == ds["done_files"]


def test_the_controller_is_exported(status_dir):
    v = values(scrape(status_dir))
    assert v[("ut_controller_enabled", ())] == 1.0 and v[("ut_controller_lr_scale", ())] == 0.5
    assert v[("ut_controller_rehearsal_fraction", ())] == 0.3
    assert v[("ut_controller_next_rehearsal_fraction", ())] == 0.4
    assert v[("ut_controller_rehearsal_weight", ())] == 1.333333
    assert v[("ut_controller_decisions_total", (("kind", "step_down"),))] == 1
    assert v[("ut_controller_decisions_total", (("kind", "hold"),))] == 3
    assert v[("ut_controller_decisions_total", (("kind", "step_back"),))] == 0
    ts = json.loads((status_dir / status.TRAINING_STATUS).read_text())
    del ts["controller"]  # a status file from before the controller: nothing about it
    status.atomic_write_json(status_dir / status.TRAINING_STATUS, ts)
    assert not [k for k in values(scrape(status_dir)) if k[0].startswith("ut_controller")]


def test_figures_not_known_yet_are_absent_not_zero(tmp_path):
    status.atomic_write_json(tmp_path / status.TRAINING_STATUS, {"state": "loading", "global_step": 0, "loss": None,
                                                                 "accuracy": {"overall": None}})
    v = values(scrape(tmp_path))
    names = {name for name, _ in v}
    assert v[("ut_training_global_step", ())] == 0
    assert not names & {"ut_training_loss", "ut_training_accuracy_percent", "ut_training_retention_ratio",
                        "ut_queue_files", "ut_checkpoint_last_step"}
    # Garbage in a status file is not a crash: the scrape still answers.
    (tmp_path / status.DAEMON_STATUS).write_text("{not json")
    assert "ut_training_global_step" in scrape(tmp_path)


def test_promtool_accepts_the_metrics(status_dir, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    r = subprocess.run([promtool, "check", "metrics"], input=scrape(status_dir), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_retention_since_the_original_base_is_exported(status_dir):
    from ultimate_trainer.daemon.snapshot import retention_since_original

    # Manifests as the consolidation gate writes them: the newest adopted base and the best one.
    hist = [{"global_step": 100, "gate": {"retention_since_original": 1.02}},
            {"global_step": 200, "gate": {"retention_since_original": None}},  # no probe that day
            {"global_step": 300, "gate": {"retention_since_original": 0.96}}]
    kept = retention_since_original(hist)
    assert kept == {"ratio": 0.96, "global_step": 300, "best": 1.02, "consolidations": 2}
    assert retention_since_original([{"global_step": 1}]) is None
    ds = json.loads((status_dir / status.DAEMON_STATUS).read_text())
    ds.setdefault("consolidation", {})["retention_since_original"] = kept
    status.atomic_write_json(status_dir / status.DAEMON_STATUS, ds)
    v = values(scrape(status_dir))
    assert v[("ut_consolidation_retention_since_original_ratio", ())] == 0.96
    assert v[("ut_consolidation_best_retention_ratio", ())] == 1.02
