"""The format corpus (tests/fixtures/formats/): every documented shape, its parse, and its exact trained text.

Each file holds our own examples of one tool's format (OpenAI, TRL, Axolotl, LLaMA-Factory). For every
record the test states the roles it must parse to and the trained runs decoded from the loss mask of
the token store (the runs of consecutive tokens whose label is their id), or the reason it is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, make_cfg, smol_tokenizer, write_jsonl
from tool_template import tool_tokenizer
from ultimate_trainer.core import status
from ultimate_trainer.data import prepare as data
from ultimate_trainer.data.formats import parse_record
from ultimate_trainer.web.state import _problem_reports

CORPUS = REPO / "tests" / "fixtures" / "formats"
END = "<|im_end|>"
CALL = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>' + END

# file -> {record number: (roles after parsing, trained runs) or a skip reason (the start of it)}
EXPECTED: dict[str, dict[int, tuple[list[str], list[str]] | str]] = {
    "openai_chat.jsonl": {
        1: (["system", "user", "assistant", "user", "assistant"], ["Paris." + END]),  # weight 0 turn untrained
        2: (["system", "user", "assistant", "tool", "assistant"],
            [CALL.format("get_weather", '{"city": "Paris"}'), "18 C and cloudy." + END]),
        3: (["system", "user", "assistant", "tool", "assistant"],
            [CALL.format("get_weather", '{"city": "Oslo"}'), "Snowing, -3 C." + END]),
        4: (["system", "user", "assistant"], ["Cold." + END]),  # developer -> system, text parts joined
        5: "no trained turn",
        6: "message 2 weight must be 0 or 1 (got 0.5)",
        7: "message 2 tool_calls call 1 arguments is not valid JSON",
    },
    "llamafactory_sharegpt.json": {
        1: (["system", "user", "assistant"], ["42" + END]),
        2: (["system", "user", "assistant", "tool", "assistant"],
            [CALL.format("convert", '{"amount": 100, "to": "EUR"}'), "100 USD is 92.50 EUR." + END]),
        3: 'multimodal: field "images" is set',
        4: "not a JSON object: it is a string (\"not an object\")",
    },
    "sharegpt_roles.jsonl": {
        1: (["system", "user", "assistant"], ["Red." + END]),
        2: 'turn 2: unknown role "critic"',
    },
    "llamafactory_alpaca.json": {
        1: (["system", "user", "assistant", "user", "assistant"], ["Madrid." + END, "Rome." + END]),
        2: (["system", "user", "assistant"], ["chat" + END]),
        3: "history item 1 is not a [question, answer] pair",
    },
    "trl.jsonl": {
        1: (["system", "user", "assistant"], ["Blue." + END]),
        2: (["system", "user", "assistant", "user", "assistant"], ["6." + END]),  # prompt turns never trained
        3: (["system", "user", "assistant"], [" Tokyo." + END]),
        4: "KTO line with label false",
        5: (["system", "user", "assistant"], ["A dog." + END]),
        6: 'multimodal: field "images" is set',
    },
    "preference.jsonl": {
        1: (["system", "user", "assistant"], ["Thank you!" + END]),
        2: (["system", "user", "assistant"], ["Hello there." + END]),
        3: (["system", "user", "assistant"], ["Seven." + END]),
    },
    "axolotl.jsonl": {
        # train: true on a user turn trains it; train_detail trains " thanks." and then the end of turn.
        1: (["system", "user", "assistant", "user", "assistant"], ["How are you?" + END, " thanks." + END]),
        2: "no trained turn",
        3: "message 2 train_detail item 1: offsets 0..9 are not within the 3 characters",
    },
    "multimodal.jsonl": {
        1: 'multimodal: field "images" is set',
        2: "multimodal: message 1 (user) has a <image> placeholder",
        3: "multimodal: message 1 content part 2 is image_url",
        4: (["system", "user", "assistant"], ["Yes." + END]),  # an empty images list is no image
    },
    "identity.json": {
        1: (["system", "user", "assistant"], ["I am {{name}}, made by {{author}}." + END]),
        2: (["system", "user", "assistant"], ["Call me {{name}}." + END]),
        3: (["system", "user", "assistant"], ["Hello! How can I help?" + END]),
    },
}
TOOL_LINES = {"openai_chat.jsonl": [2, 3], "llamafactory_sharegpt.json": [2]}


def _records(path: Path) -> list:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _trained_runs(tok, item: dict) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(item["input_ids"], item["labels"]):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def _prepare(tmp_path: Path, files: list[Path], tok, **data_cfg):
    cfg = make_cfg(tmp_path, heldout_fraction=0.0, **data_cfg)
    return data.prepare(files, tok, cfg, tmp_path / "store", tmp_path / "status")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_record_parses_to_the_expected_roles(name):
    for n, rec in enumerate(_records(CORPUS / name), 1):
        want = EXPECTED[name][n]
        if isinstance(want, str):
            continue  # some reasons (placeholders, weights) are also checked at parse time below
        assert [m["role"] for m in parse_record(rec, "Be brief.").messages] == want[0], f"{name}:{n}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trained_spans_and_skip_reasons(tmp_path, name):
    tok = tool_tokenizer(smol_tokenizer())
    p = _prepare(tmp_path, [CORPUS / name], tok)
    rep = p.reports[str(CORPUS / name)]
    unit = "item" if name.endswith(".json") else "line"
    assert rep.unit == unit
    bad = {b[unit]: b["reason"] for b in rep.bad}
    want_bad = {n: r for n, r in EXPECTED[name].items() if isinstance(r, str)}
    assert sorted(bad) == sorted(want_bad)
    for n, reason in want_bad.items():
        assert bad[n].startswith(reason), (n, bad[n])
    good = [n for n, w in sorted(EXPECTED[name].items()) if not isinstance(w, str)]
    assert rep.examples == rep.train_examples == len(p.train) == len(good)
    for i, n in enumerate(good):
        assert _trained_runs(tok, p.train[i]) == EXPECTED[name][n][1], f"{name}:{n}"


def test_template_without_tool_support_skips_tool_lines_with_a_reason(tmp_path):
    files = [CORPUS / name for name in TOOL_LINES]
    p = _prepare(tmp_path, files, smol_tokenizer())  # SmolLM2's ChatML renders no tools
    for name, lines in TOOL_LINES.items():
        rep = p.reports[str(CORPUS / name)]
        bad = {b[rep.unit]: b["reason"] for b in rep.bad}
        for n in lines:
            assert "chat template has no tool support" in bad[n]
            assert "does not render tool definitions, tool calls" in bad[n]


def test_placeholders_are_one_warning_per_file_and_reach_the_monitor(tmp_path):
    tok = tool_tokenizer(smol_tokenizer())
    p = _prepare(tmp_path, [CORPUS / "identity.json"], tok)
    rep = p.reports[str(CORPUS / "identity.json")]
    assert rep.warnings == ["template placeholder {{name}}: 2 examples (first at item 1), trained verbatim: "
                               "fill it in before training if it is not meant literally"]
    assert data.summarize(p, 256)["warnings"] == [f"identity.json: {rep.warnings[0]}"]
    shown = _problem_reports(tmp_path / "status")
    assert shown[0]["warnings"] == [f"identity.json: {rep.warnings[0]}"]


def test_monitor_shows_array_items_as_file_item_n(tmp_path):
    p = _prepare(tmp_path, [CORPUS / "llamafactory_sharegpt.json"], tool_tokenizer(smol_tokenizer()))
    assert p.reports[str(CORPUS / "llamafactory_sharegpt.json")].bad_lines == 2
    shown = _problem_reports(tmp_path / "status")
    assert shown[0]["bad"] == [
        'llamafactory_sharegpt.json:item 3: multimodal: field "images" is set; only text is trained, line skipped',
        "llamafactory_sharegpt.json:item 4: not a JSON object: it is a string (\"not an object\")"]


def test_json_that_is_no_array_nor_lines_is_unusable_with_a_clear_reason(tmp_path):
    p = _prepare(tmp_path, [CORPUS / "not_array.json"], smol_tokenizer())
    (path, reason), = p.unusable
    assert reason.startswith("not a JSON array of records ([{...}, ...]) nor JSON Lines (one object per line)")


def test_json_lines_under_a_json_name_are_read_as_lines(tmp_path):
    f = write_jsonl(tmp_path / "datasets_export.json", [{"prompt": "p", "completion": "c"}] * 2)
    p = _prepare(tmp_path, [f], smol_tokenizer())
    assert p.reports[str(f)].unit == "line" and p.reports[str(f)].examples == 2


def test_broken_array_keeps_items_before_the_error(tmp_path):
    f = tmp_path / "cut.json"
    f.write_text('[{"prompt": "p", "completion": "c"}, {"prompt": "q", "compl', encoding="utf-8")
    p = _prepare(tmp_path, [f], smol_tokenizer())
    rep = p.reports[str(f)]
    assert rep.examples == 1
    assert rep.bad == [{"item": 2, "reason": "invalid JSON after item 1: parse error: premature EOF; the rest "
                                                "of the file is not read"}]
    assert status.bad_entry_text("cut.json", rep.bad[0]).startswith("cut.json:item 2: invalid JSON")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_summary_counts_add_up(tmp_path, name):
    p = _prepare(tmp_path, [CORPUS / name], tool_tokenizer(smol_tokenizer()), heldout_max_per_file=1)
    s = data.summarize(p, 256)
    assert s["examples"] == s["train_examples"] + s["heldout_examples"] + s["heldout_duplicates"]
    assert s["examples"] + s["bad_lines"] == len(_records(CORPUS / name))


def test_summary_adds_up_when_lines_copy_a_heldout_one(tmp_path):
    a = {"prompt": "a", "completion": "A"}
    ev = write_jsonl(tmp_path / "eval.jsonl", [a])  # every line of data.eval_file is held out
    f = write_jsonl(tmp_path / "d.jsonl", [a, {"prompt": "b", "completion": "B"}, a])
    cfg = make_cfg(tmp_path, heldout_fraction=0.0, eval_file=str(ev))
    s = data.summarize(data.prepare([f], smol_tokenizer(), cfg, tmp_path / "store"), 256)
    assert (s["examples"], s["train_examples"], s["heldout_examples"], s["heldout_duplicates"]) == (4, 1, 1, 2)


def test_skill_is_kept_on_heldout_examples(tmp_path):
    ev = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
         "metadata": {"skill": skill}} for i, skill in enumerate(["arithmetic", "spelling"])]
        + [{"prompt": "p", "completion": "c", "metadata": {"topic": "none"}}])
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "completion": "y"}])
    p = data.prepare([f], smol_tokenizer(), make_cfg(tmp_path, eval_file=str(ev)), tmp_path / "store")
    assert [e.skill for e in p.heldout] == ["arithmetic", "spelling", None]


def test_tool_and_untrained_answers_are_not_evaluation_prompts(tmp_path):
    tok = tool_tokenizer(smol_tokenizer())
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "completion": "y"}])
    cfg = make_cfg(tmp_path, eval_file=str(CORPUS / "openai_chat.jsonl"))
    p = data.prepare([f], tok, cfg, tmp_path / "store")
    # Lines 2 and 3 use tools: held out for validation loss, but no plain answer to compare at evaluation.
    assert len(p.heldout_encoded) == 4
    assert [e.line for e in p.heldout] == [1, 4]


def test_dry_run_of_the_whole_corpus_adds_up(tiny_model_dir, make_project, tmp_path):
    from conftest import run_train

    cfg = make_project(tiny_model_dir)
    files = sorted(CORPUS.iterdir())
    r = run_train(cfg, *files, extra=["--dry-run"])
    assert r.returncode == 3, r.stderr  # not_array.json has no usable record
    s = json.loads(r.stdout)
    assert s["examples"] == s["train_examples"] + s["heldout_examples"] + s["heldout_duplicates"]
    records = sum(len(_records(f)) for f in files if f.name != "not_array.json")
    assert s["examples"] + s["bad_lines"] == records + 8  # not_array.json: its 8 lines are bad lines
    assert "openai_chat.jsonl:2: the line defines tools, but the model's chat template has no tool support" \
        in r.stderr
    assert "llamafactory_sharegpt.json:item 4: not a JSON object: it is a string (\"not an object\")" in r.stderr
    assert "identity.json: warning: template placeholder {{name}}" in r.stderr


def test_tool_definitions_and_results_are_in_the_prompt_but_not_trained(tmp_path):
    tok = tool_tokenizer(smol_tokenizer())
    p = _prepare(tmp_path, [CORPUS / "openai_chat.jsonl"], tok)
    item = p.train[1]  # line 2: tools + a tool call + a tool result
    untrained = tok.decode([t for t, lab in zip(item["input_ids"], item["labels"]) if lab == -100])
    assert '"name": "get_weather", "description": "Current weather in a city"' in untrained
    assert "<|im_start|>tool\n18 C, cloudy<|im_end|>" in untrained
    assert "<tool_call>" not in untrained
