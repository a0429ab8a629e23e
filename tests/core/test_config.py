"""The typed configuration: shipped files load, every problem is reported at once, docs stay in step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from ultimate_trainer.core import config


def test_shipped_config_json_loads_and_targets_qwen_in_4bit():
    cfg = config.load(REPO / "config.json")
    assert cfg.base_model == "Qwen/Qwen2.5-7B-Instruct" and cfg.load_in_4bit
    assert (cfg.eval_steps, cfg.save_steps, cfg.data.tokenize_chunk_size) == (25, 100, 1000)
    assert cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant


def test_shipped_config_json_spells_out_every_default():
    assert json.loads((REPO / "config.json").read_text()) == config.Config().to_dict()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    config.load(path)


def test_docs_config_md_matches_the_code():
    assert (REPO / "docs" / "CONFIG.md").read_text() == config.markdown(), \
        "regenerate: python -m ultimate_trainer.core.config --markdown > docs/CONFIG.md"


def test_all_problems_are_reported_together_naming_each_key(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({
        "eval_steps": "often", "save_stepz": 5, "lora": {"r": 0, "target_modules": "q_proj"},
        "eval": {"matcher": "fuzzy"}, "training": {"learning_rate": True},
    }))
    with pytest.raises(config.ConfigError) as err:
        config.load(p)
    text = str(err.value)
    for fragment in ("eval_steps: expected integer", "save_stepz: unknown key (did you mean save_steps?)",
                     "lora.r: 0 is below the minimum 1", "lora.target_modules: expected list of string",
                     'eval.matcher: "fuzzy" is not one of', "training.learning_rate: expected number"):
        assert fragment in text
    assert len(err.value.problems) == 6


def test_contradictory_options_are_rejected():
    with pytest.raises(config.ConfigError) as err:
        config.load(None, ["daemon.disk_critical_gb=50", "daemon.disk_warn_gb=10", "monitor.stats_port=8080",
                           "monitor.oom_medium_percent=90"])
    problems = "\n".join(err.value.problems)
    assert "daemon.disk_critical_gb" in problems and "monitor.stats_port" in problems
    assert "monitor.oom_medium_percent" in problems
    with pytest.raises(config.ConfigError, match="controller.step_down_margin: must not exceed controller.safe_margin"):
        config.load(None, ["controller.step_down_margin=0.05", "controller.safe_margin=0.03"])


def test_set_overrides_parse_json_values_and_dotted_keys():
    cfg = config.load(None, ["training.learning_rate=1e-5", "base_model=smollm2-135m-instruct",
                             "daemon.consolidation_hour=null", 'lora.target_modules=["q_proj"]'])
    assert cfg.training.learning_rate == 1e-5 and cfg.base_model == "smollm2-135m-instruct"
    assert cfg.daemon.consolidation_hour is None and cfg.lora.target_modules == ["q_proj"]


def test_set_without_equals_and_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="expected KEY=VALUE"):
        config.load(None, ["training.learning_rate"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"eval_steps": 3,,}')
    with pytest.raises(config.ConfigError, match=r"bad.json:1:\d+: not valid JSON"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.json")


def test_paths_resolve_against_root(tmp_path):
    cfg = config.load(None, [f"paths.root={tmp_path}", "paths.status=s", "paths.checkpoints=/abs/ck"])
    assert cfg.path("status") == tmp_path / "s"
    assert cfg.path("checkpoints") == Path("/abs/ck")
