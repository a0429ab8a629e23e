"""The workbench's Export tab: export.py run as a child from the page's API, its log shown."""

from __future__ import annotations

import json

import pytest

from _export_helpers import tiny_model
from _workbench_helpers import UvicornThread, add_checkpoint
from ultimate_trainer.core.config import load as load_config


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ultimate_trainer.workbench.app import create_app

    root = tmp_path_factory.mktemp("wb-export")
    model_dir = tiny_model(root / "model", "llama")
    (root / "config.json").write_text(json.dumps({
        "base_model": str(model_dir), "load_in_4bit": False, "paths": {"root": str(root)},
        "training": {"device": "cpu"}, "monitor": {"workbench_threads": 1}}))
    add_checkpoint(root, model_dir, 3, "r1", [], 3, 3, seed=1)
    cfg = load_config(root / "config.json")
    with UvicornThread(create_app(cfg, cfg.path("status"))) as srv:
        yield cfg, srv


def test_the_export_tab_writes_a_gguf_and_shows_where(served):
    from gradio_client import Client

    cfg, srv = served
    client = Client(srv.url, verbose=False, analytics_enabled=False)
    log = client.predict("checkpoint-3", "gguf", "q8_0", api_name="/export")
    assert log.rstrip().endswith("Done."), log
    (folder,) = (cfg.path("root") / "exports").iterdir()
    assert folder.name.startswith("ut-checkpoint-3-gguf-q8_0-") and str(folder) in log
    assert (folder / "Modelfile").is_file() and list(folder.glob("*.q8_0.gguf"))


def test_an_impossible_export_shows_the_reason(served):
    from gradio_client import Client

    _cfg, srv = served
    log = Client(srv.url, verbose=False, analytics_enabled=False).predict("base", "adapter", "f16",
                                                                           api_name="/export")
    assert "has no adapter" in log and "failed" in log
