"""The workbench (workbench.py, port 8082) over a tiny random model and a fake run history, driven
through its real HTTP API with gradio_client: chat, compare, evaluation of two checkpoints, history,
lineage; the Host guard; and that starting it imports no torch."""

from __future__ import annotations

import html
import json
import subprocess
import sys

import pytest

from _workbench_helpers import UvicornThread, make_workbench_project, raw_get
from conftest import REPO, write_jsonl
from ultimate_trainer.core.config import load as load_config


def text(message: dict) -> str:
    """A chat message's text: Gradio returns the content as text parts, HTML-escaped by the workbench."""
    c = message["content"]
    return html.unescape(c if isinstance(c, str) else "".join(p["text"] for p in c))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    return make_workbench_project(tmp_path_factory.mktemp("wb"), tiny_model_dir)


@pytest.fixture(scope="module")
def served(project):
    from ultimate_trainer.workbench.app import create_app

    config, _ = project
    cfg = load_config(config)
    with UvicornThread(create_app(cfg, cfg.path("status"))) as srv:
        yield cfg, srv


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[1].url, verbose=False, analytics_enabled=False)


def test_chat_base_and_a_checkpoint_answer_differently(client):
    base = client.predict("Hello there", [], [], "base", "base", False, "", 8, 0.0, 1.0, api_name="/chat")
    ckpt = client.predict("Hello there", [], [], "checkpoint-6", "base", False, "", 8, 0.0, 1.0, api_name="/chat")
    hist_base, hist_ckpt = base[0], ckpt[0]
    assert [m["role"] for m in hist_base] == ["user", "assistant"]
    answer_base, answer_ckpt = text(hist_base[-1]), text(hist_ckpt[-1])
    assert answer_ckpt.strip() and answer_base != answer_ckpt  # the tiny base answers newlines
    assert "CPU" in ckpt[3]
    # Multi-turn: the conversation so far goes back in and grows.
    again = client.predict("And then?", hist_ckpt, [], "checkpoint-6", "base", False, "", 4, 0.0, 1.0,
                           api_name="/chat")
    assert [m["role"] for m in again[0]] == ["user", "assistant", "user", "assistant"]
    assert text(again[0][1]) == answer_ckpt and text(again[0][2]) == "And then?"
    # Shown as text: the chat boxes get HTML-escaped content (Gradio would render markup).
    marked = client.predict("<b>bold?</b>", [], [], "base", "base", False, "", 2, 0.0, 1.0, api_name="/chat")
    raw = marked[0][0]["content"]
    assert "&lt;b&gt;bold?&lt;/b&gt;" in (raw if isinstance(raw, str) else raw[0]["text"])


def test_compare_mode_answers_one_conversation_with_two_models(client):
    a, b, _, where = client.predict("Compare me", [], [], "checkpoint-3", "latest", True, "Be brief.", 8, 0.0, 1.0,
                                    api_name="/chat")
    assert text(a[0]) == text(b[0]) == "Compare me"
    assert text(a[1]) != text(b[1])  # two different adapters
    assert "checkpoint-3" in where and "checkpoint-6" in where  # latest = the newest checkpoint


def test_a_model_that_cannot_load_is_reported_and_the_app_keeps_running(client, served):
    cfg, _ = served
    bad = cfg.path("checkpoints") / "checkpoint-9"
    bad.mkdir()
    (bad / "ut_checkpoint.json").write_text(json.dumps({"global_step": 9, "base_model": "/nowhere"}))
    try:
        hist, _, _, where = client.predict("hi", [], [], "checkpoint-9", "base", False, "", 4, 0.0, 1.0,
                                           api_name="/chat")
        assert "cannot answer" in where and "checkpoint-9" in where
        assert [m["role"] for m in hist] == ["user"]
        ok = client.predict("hi", [], [], "base", "base", False, "", 4, 0.0, 1.0, api_name="/chat")
        assert ok[0][-1]["role"] == "assistant"
    finally:
        import shutil

        shutil.rmtree(bad)


def _answers(cfg, key: str, prompts: list[str]) -> list[str]:
    from ultimate_trainer.workbench.models import ModelPool

    _, out = ModelPool(cfg, capacity=1).answers(
        key, [[{"role": "system", "content": cfg.data.system_prompt}, {"role": "user", "content": p}]
              for p in prompts], cfg.eval.max_new_tokens, 4)
    return out


def test_evaluating_two_checkpoints_gives_accuracies_and_the_fixed_and_broken_answers(client, served, tmp_path):
    from gradio_client import handle_file

    cfg, _ = served
    prompts = ["Say one", "Say two", "Say three"]
    a3, a6 = _answers(cfg, "checkpoint-3", prompts), _answers(cfg, "checkpoint-6", prompts)
    assert a3[0] != a6[0] and a3[1] != a6[1]
    # Expected answers chosen so that: 1 is right only for checkpoint-3 (broken by checkpoint-6),
    # 2 only for checkpoint-6 (fixed), 3 for neither.
    evalset = write_jsonl(tmp_path / "set.jsonl", [
        {"prompt": prompts[0], "response": a3[0], "metadata": {"skill": "counting"}},
        {"prompt": prompts[1], "response": a6[1], "metadata": {"skill": "counting"}},
        {"prompt": prompts[2], "response": "something else entirely"},
        "{not json",
    ])
    overall, breakdown, changed, notes = client.predict(
        ["checkpoint-3", "checkpoint-6"], "uploaded JSONL", handle_file(str(evalset)), api_name="/evaluate")
    rows = {r[0]: r for r in overall["data"]}
    heads = overall["headers"]
    acc = heads.index("accuracy")
    assert rows["checkpoint-3"][acc] == pytest.approx(33.3) and rows["checkpoint-6"][acc] == pytest.approx(33.3)
    by = {(r[0], r[1]): dict(zip(breakdown["headers"], r)) for r in breakdown["data"]}
    assert by[("skill", "counting")]["checkpoint-3"] == 50.0 and by[("skill", "counting")]["examples"] == 2
    assert by[("skill", "set.jsonl")]["checkpoint-6"] == 0.0  # no metadata.skill: grouped by its file
    assert by[("file", "set.jsonl")]["checkpoint-6"] == pytest.approx(33.3)
    ch = [dict(zip(changed["headers"], r)) for r in changed["data"]]
    assert [(c["change"], c["source"]) for c in ch] == [("broken", "set.jsonl:1"), ("fixed", "set.jsonl:2")]
    assert ch[1]["after"] == a6[1]
    assert "set.jsonl:4: invalid JSON" in notes
    assert "from the cache" not in notes

    again = client.predict(["checkpoint-3", "checkpoint-6"], "uploaded JSONL", handle_file(str(evalset)),
                           api_name="/evaluate")
    assert "checkpoint-3 from the cache, checkpoint-6 from the cache" in again[3]
    assert [r[:4] for r in again[0]["data"]] == [r[:4] for r in overall["data"]]
    assert again[2]["data"] == changed["data"]


def test_evaluation_on_the_held_out_set_recorded_by_training(client):
    overall, breakdown, _, notes = client.predict(["base", "checkpoint-3"], "held-out (recorded by training)", None,
                                                  api_name="/evaluate")
    assert "held-out examples recorded by training: 4 examples" in notes
    assert [r[0] for r in overall["data"]] == ["base", "checkpoint-3"]
    assert {r[1] for r in breakdown["data"] if r[0] == "skill"} == {"arithmetic", "geography"}


def test_history_per_skill_and_file_and_the_answer_browser(client):
    skill, file, loss, grad, files, skills = client.predict(api_name="/history")

    def points(plot: dict, key: str, value: str) -> dict:
        rows = [dict(zip(plot["columns"], r)) for r in plot["data"]]
        return {(r[key], r["step"]): r[value] for r in rows}

    assert points(skill, "group", "accuracy") == {("arithmetic", 2): 50.0, ("arithmetic", 4): 100.0,
                                                  ("geography", 2): 0.0, ("geography", 4): 50.0}
    assert points(file, "group", "accuracy")[("geo.jsonl", 4)] == 50.0
    assert points(loss, "metric", "value") == {("loss", 1): 3.5, ("loss", 2): 3.0, ("loss", 3): 2.5, ("loss", 4): 2.0,
                                               ("val_loss", 2): 2.5, ("val_loss", 4): 2.0}
    assert points(grad, "metric", "value")[("grad_norm", 4)] == pytest.approx(1.4)
    assert [c[0] for c in files["choices"]] == ["", "geo.jsonl", "math.jsonl"]
    assert [c[0] for c in skills["choices"]] == ["", "arithmetic", "geography"]
    wrong = client.predict("wrong", "geo.jsonl", "", 4, 4, api_name="/answers")
    assert [r[wrong["headers"].index("source")] for r in wrong["data"]] == ["geo.jsonl:2"]
    shown = dict(zip(wrong["headers"], wrong["data"][0]))
    assert shown["prompt"] == "<b>bold</b> & **stars**?" and shown["expected"] == "<script>x</script>"
    everything = client.predict("all", "", "arithmetic", None, None, api_name="/answers")
    assert len(everything["data"]) == 4


def test_lineage_of_a_checkpoint_built_from_two_runs(client, project):
    _, files = project
    table, _, _ = client.predict(api_name="/lineage")
    assert [r[0] for r in table["data"]] == ["checkpoint-6", "checkpoint-3"]
    got = client.predict("checkpoint-6", api_name="/lineage_model")
    rows = [dict(zip(got["headers"], r)) for r in got["data"]]
    assert [(r["name"], r["sha256"], r["size"], r["examples"], r["run_id"]) for r in rows] == [
        (f["name"], f["sha256"], f["size"], f["examples"], rid) for f, rid in zip(files, ["r1", "r2"])]
    holders = client.predict("a.jsonl", api_name="/lineage_file")
    assert [r[holders["headers"].index("name")] for r in holders["data"]] == ["checkpoint-3", "checkpoint-6"]


def test_foreign_host_headers_are_refused(served):
    _, srv = served
    code, body = raw_get(srv.port, "/", "evil.example:8082")
    assert code == 403 and "not served here" in body
    code, _ = raw_get(srv.port, "/config", "attacker.test")
    assert code == 403
    code, body = raw_get(srv.port, "/health", f"localhost:{srv.port}")
    assert code == 200 and json.loads(body)["ok"] is True


def test_the_app_starts_without_importing_torch(project):
    config, _ = project
    code = ("import sys; from ultimate_trainer.core.config import load as load_config; "
            "from ultimate_trainer.workbench.app import create_app; "
            f"cfg = load_config({str(config)!r}); create_app(cfg, cfg.path('status')); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_qwen2_base_and_its_checkpoint_answer_in_the_workbench(tmp_path, qwen2_model_dir):
    """Qwen2.5's architecture (tiny, random) loads in the workbench, base and checkpoint, and answers."""
    from gradio_client import Client

    from ultimate_trainer.workbench.app import create_app

    config, _ = make_workbench_project(tmp_path / "qwen2", qwen2_model_dir)
    cfg = load_config(config)
    with UvicornThread(create_app(cfg, cfg.path("status"))) as srv:
        client = Client(srv.url, verbose=False, analytics_enabled=False)
        base = client.predict("Hello there", [], [], "base", "base", False, "", 4, 0.0, 1.0, api_name="/chat")
        ckpt = client.predict("Hello there", [], [], "checkpoint-6", "base", False, "", 4, 0.0, 1.0, api_name="/chat")
    assert [m["role"] for m in ckpt[0]] == ["user", "assistant"] and "CPU" in ckpt[3]
    assert text(ckpt[0][-1]).strip() and text(ckpt[0][-1]) != text(base[0][-1])
