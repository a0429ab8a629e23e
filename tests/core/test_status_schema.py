"""A real run's training_status.json matches the schema documented in docs/STATUS.md, field by field."""

from __future__ import annotations

import json
import re

from conftest import REPO, chat, run_train, write_jsonl

TYPES = {"int": int, "float": (int, float), "string": str, "bool": bool, "list": list, "object": dict}


def documented_fields() -> dict[str, str]:
    """Field -> type word from the training_status.json table of docs/STATUS.md."""
    text = (REPO / "docs" / "STATUS.md").read_text()
    section = text.split("## `training_status.json`", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]+?) \|", section, re.M)}


def check_type(value, spec: str) -> bool:
    allowed = [w.strip() for w in spec.replace(" of string", "").split(" or ")]
    if value is None:
        return "null" in allowed
    return any(isinstance(value, TYPES[w]) and not (w in ("int", "float") and isinstance(value, bool))
               for w in allowed if w in TYPES)


def test_real_run_status_file_matches_documented_schema(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=2)
    data = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}?", f"a{i}") for i in range(150)])  # packed: ~8 a row
    r = run_train(cfg, data, extra=["--max-steps", "4"])
    assert r.returncode == 0, r.stderr
    status = json.loads((cfg.parent / "status" / "training_status.json").read_text())
    fields = documented_fields()
    assert len(fields) > 20
    assert set(status) == set(fields), f"undocumented: {set(status) - set(fields)}, missing: {set(fields) - set(status)}"
    wrong = {k: status[k] for k, spec in fields.items() if not check_type(status[k], spec)}
    assert not wrong, wrong
    assert status["state"] == "idle" and status["global_step"] == 4
    assert set(status["accuracy"]) >= {"overall", "last_20", "last_50", "trend", "evaluations"}
    assert status["accuracy"]["evaluations"] == 3  # before step 1, at step 2, at step 4
    ex = status["recent_examples"][-1]
    assert set(ex) == {"step", "prompt", "expected", "generated", "correct", "source"}
    assert [c["global_step"] for c in status["checkpoints"]] == [3, 4]


def test_documented_example_file_matches_the_schema():
    example = json.loads((REPO / "docs" / "examples" / "training_status.json").read_text())
    fields = documented_fields()
    assert set(example) == set(fields)
    assert all(check_type(example[k], spec) for k, spec in fields.items())


def test_no_non_finite_number_is_written_and_old_ones_read_as_null(tmp_path):
    import math

    from ultimate_trainer.core import status as st

    record = {"loss": float("nan"), "grad_norm": float("inf"), "nested": [{"x": -math.inf}, 1.5], "n": 3}
    st.atomic_write_json(tmp_path / "a.json", record)
    st.append_jsonl(tmp_path / "h.jsonl", record)
    for text in ((tmp_path / "a.json").read_text(), (tmp_path / "h.jsonl").read_text()):
        assert "NaN" not in text and "Infinity" not in text
        assert json.loads(text) == {"loss": None, "grad_norm": None, "nested": [{"x": None}, 1.5], "n": 3}
    (tmp_path / "old.jsonl").write_text('{"loss": NaN, "grad_norm": -Infinity, "ok": 1}\n')
    assert list(st.iter_jsonl(tmp_path / "old.jsonl")) == [{"loss": None, "grad_norm": None, "ok": 1}]
    (tmp_path / "old.json").write_text('{"loss": NaN}')
    assert st.read_json(tmp_path / "old.json") == {"loss": None}


def test_the_record_tables_of_status_md_are_generated_from_the_code():
    """docs/STATUS.md documents the report, the marker and training_status.json from core/records.py."""
    from ultimate_trainer.core.records import RECORDS

    text = (REPO / "docs" / "STATUS.md").read_text()
    for title, cls in RECORDS.items():
        section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
        assert cls.markdown_table() in section, \
            f"{title}: regenerate its table (python -m ultimate_trainer.core.records --markdown)"


def test_old_records_read_unchanged(tmp_path):
    """A marker and a report written before the records were typed read back, unknown keys kept."""
    from ultimate_trainer.core import checkpoints as ck
    from ultimate_trainer.core.records import CheckpointMarker, FileReport

    old = {"schema_version": 1, "global_step": 7, "run_id": "abc", "run_step": 2, "run_total_steps": 5,
           "files": [{"name": "a.jsonl", "sha256": "s"}], "base_model": "b", "created_at": "t", "later": {"x": 1}}
    m = CheckpointMarker.from_json(old)
    assert (m.global_step, m.run_complete, m.world_size, m.replay) == (7, True, 1, None)
    assert m.to_json() == {**CheckpointMarker().to_json(), **old}
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / ck.MARKER).write_text(json.dumps(old))
    assert ck.newest_complete(tmp_path).marker.run_id == "abc"
    rep = FileReport.from_json({"file": "/x/a.jsonl", "examples": 3, "usable": True})
    assert (rep.examples, rep.usable, rep.bad) == (3, True, [])
    assert FileReport.from_json(None) is None and FileReport.from_json([1]) is None


def test_records_read_old_files_keep_unknown_fields_and_report_wrong_types(tmp_path, caplog):
    """core/records.py: a reader parses a file once; an older file loads, a newer one's fields survive,
    a field of the wrong type is named (and read as its default), and the strict parse lists every problem."""
    import pytest

    from ultimate_trainer.core import checkpoints as ck
    from ultimate_trainer.core.records import CheckpointMarker, RecordError, TrainingStatus

    old = {"global_step": 4, "run_id": "r", "run_step": 2, "run_total_steps": 4, "files": []}  # before run_complete
    marker = CheckpointMarker.from_json(old)
    assert marker.run_complete and marker.global_step == 4 and "run_complete" in marker.missing
    assert ck.steps_done(marker, "r") == 0  # a marker without the field counts as complete, as ever

    newer = {**marker.to_json(), "from_the_future": {"x": 1}}
    again = CheckpointMarker.from_json(newer)
    assert again.unknown == ["from_the_future"] and again.to_json() == newer  # written back as it was

    with caplog.at_level("WARNING"):
        ts = TrainingStatus.from_json({"state": "training", "global_step": "7", "pid": True}, "status.json")
    assert ts.state == "training" and ts.global_step == 0 and ts.pid == 0
    assert "status.json" in caplog.text and "global_step: str" in caplog.text and "pid: bool" in caplog.text

    with pytest.raises(RecordError) as e:
        TrainingStatus.from_json({"state": 3, "zzz": 1}, "t.json", strict=True)
    text = str(e.value)
    assert text.startswith("t.json: ") and "state: int" in text and "zzz: not a field" in text \
        and "global_step: missing" in text

    ck.mark_complete(tmp_path, ck.marker_meta(global_step=3, run_id="r", run_step=1, run_total_steps=2, files=[],
                                              base_model="b"))
    written = st_read(tmp_path / ck.MARKER)
    sealed = CheckpointMarker.from_json(written, strict=True)  # the writer's marker has every field, typed
    assert sealed.run_complete is False and sealed.created_at and "replay" not in written
    assert TrainingStatus.from_json(json.loads((REPO / "docs" / "examples" / "training_status.json").read_text()),
                                    strict=True) is not None


def st_read(path):
    from ultimate_trainer.core import status

    return status.read_json(path)
