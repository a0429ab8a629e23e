"""The monitor page in a real headless Chromium (Debian's /usr/bin/chromium via Playwright).

Loads the page over the fixture status files served by the real waitress server and checks that the
figures appear, that the XSS fixture texts are shown as text and ran nothing, that the exports
download, and that the page triggers no CSP violation. Screenshots go to artifacts/.
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from _web_helpers import ServerThread, live_status_dir
from conftest import ARTIFACTS, CHROMIUM
from ultimate_trainer.web.monitor import create_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)"),
]


@pytest.fixture()
def server(tmp_path):
    sd = live_status_dir(tmp_path / "status")
    with ServerThread(create_app(sd, refresh_seconds=0.5, workbench_port=8082)) as srv:
        yield srv


def _open(browser, url: str, width: int, height: int, theme: str | None = None):
    ctx = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True,
                              color_scheme="dark")
    page = ctx.new_page()
    problems: list[str] = []
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    page.wait_for_selector("body[data-loaded='1']", timeout=15000)
    if theme and page.evaluate("document.documentElement.dataset.theme") != theme:
        page.click("#theme")
    return ctx, page, problems


def test_page_shows_the_figures_and_runs_no_injected_script(browser, server):
    ctx, page, problems = _open(browser, server.url, 1400, 1000)
    try:
        assert page.text_content("#bar-step") == "1,120"
        assert page.text_content("#bar-acc") == "77.5%"
        assert page.text_content("#bar-ram") == "72.1%"
        assert page.text_content("#bar-gpu") == "none"
        assert "120 / 300 steps" in page.text_content("#run-label")
        assert page.text_content("#ranks").startswith("2 · rank 0 cuda:0 5.00 GB / peak 7.00 GB, RAM 3.00 GB")
        assert "rank 1 cuda:1" in page.text_content("#ranks")
        assert page.text_content("#acc-overall") == "77.5%"
        assert "good" in page.get_attribute("#acc-20", "class")  # 'above' the baseline: green
        assert page.text_content("#loss-trend").endswith("falling")
        assert page.text_content("#oom") == "OOM MEDIUM"
        assert "No GPU" in page.text_content("#gpu-list")
        assert "next_batch.jsonl" in page.text_content("#q-list")
        assert "crashy.jsonl" in page.text_content("#failed-list")
        assert "checkpoint-1100" in page.text_content("#ck-list")
        assert page.locator("#loss-chart path.line").count() >= 1
        assert page.locator("#acc-chart circle").count() == 10
        assert page.locator("#gn-chart path.line").count() == 1
        assert page.text_content("#stab-score") == "91.5" and "good" in page.get_attribute("#stab-score", "class")
        assert page.text_content("#stab-anomalies") == "1"
        # The retention-aware controller: its scale and rate, this run's share and the next's, the last decision
        # and why (as text: the fixture's reason carries markup, which must create nothing).
        assert page.text_content("#ctl-lr") == "x0.5 · 0.0001" and "bad" in page.get_attribute("#ctl-lr", "class")
        assert page.text_content("#ctl-rehearsal") == "30.0% → 40.0% now (weighted x1.33), drawn from the next run"
        assert page.text_content("#ctl-last") == ("step 1100: step down (retention 0.9 < eval.retention_warn 0.95: "
                                                  "learning rate x1 -> x0.5 <img src=x onerror=alert(1)>) · hold 3, "
                                                  "step down 1")
        assert page.locator("#ctl-last *").count() == 0
        assert page.text_content("#stab-last") == "step 1050: loss spike · spiky<img src=x onerror=alert(1)>.jsonl"
        examples = page.text_content("#examples-body")
        assert "猫 (neko) 🐱" in examples
        # The XSS fixture is on the page as literal text, and created no element and ran nothing.
        assert "<script>window.__xss = 'script'</script>" in examples
        assert "<img src=x onerror=" in examples
        assert "javascript:window.__xss" in examples
        assert page.locator("#examples-body img, #examples-body a, #examples-body script").count() == 0
        assert "<script>alert(1)</script>" in page.text_content("#failed-list")
        assert "broken<img src=x onerror=alert(1)>.jsonl:2:" in page.text_content("#bad-list")
        assert page.locator("main script, main img, #alerts img").count() == 0
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert "geo.jsonl" in page.text_content("#skills-body") and "0/1" in page.text_content("#skills-body")
        assert page.get_attribute("#workbench-link", "href").endswith(":8082/")
        assert not [p for p in problems if "dialog" in p or "Content Security Policy" in p or "page error" in p], problems
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "monitor-desktop-dark.png"), full_page=True)
        page.click("#theme")
        assert page.evaluate("document.documentElement.dataset.theme") == "light"
        page.screenshot(path=str(ARTIFACTS / "monitor-desktop-light.png"), full_page=True)
        page.reload()
        page.wait_for_selector("body[data-loaded='1']")
        assert page.evaluate("document.documentElement.dataset.theme") == "light"  # the choice is remembered
    finally:
        ctx.close()


def test_exports_download_with_accuracy_and_memory(browser, server, tmp_path):
    ctx, page, _ = _open(browser, server.url, 1400, 1000)
    try:
        with page.expect_download() as dl:
            page.click("#export-csv")
        path = tmp_path / "h.csv"
        dl.value.save_as(path)
        assert dl.value.suggested_filename == "training-history.csv"
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
        assert len(rows) == 120
        assert rows[-1]["accuracy_overall"] == "77.5" and rows[-1]["ram_percent"] != ""
        with page.expect_download() as dl:
            page.keyboard.press("e")  # the E key exports JSON
        path = tmp_path / "h.json"
        dl.value.save_as(path)
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert len(doc["steps"]) == 120 and len(doc["evals"]) == 10 and len(doc["memory"]) == 41
    finally:
        ctx.close()


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_phone_width_has_no_horizontal_scroll(browser, server, theme):
    ctx, page, _ = _open(browser, server.url, 390, 844, theme)
    try:
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert page.is_visible("#bar-step")
        page.evaluate("window.scrollTo(0, 1500)")  # the status bar stays on screen while scrolling
        assert page.evaluate("window.scrollY") > 500
        assert page.evaluate("document.getElementById('bar').getBoundingClientRect().top") == 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / f"monitor-phone-{theme}.png"), full_page=True)
        page.screenshot(path=str(ARTIFACTS / f"monitor-phone-{theme}-top.png"))
    finally:
        ctx.close()


def test_empty_status_dir_shows_waiting(browser, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "training_status.json").write_text('{"state": "train', encoding="utf-8")  # half-written
    with ServerThread(create_app(tmp_path / "empty", refresh_seconds=0.5)) as srv:
        ctx, page, problems = _open(browser, srv.url, 1200, 900)
        try:
            assert page.is_visible("#waiting")
            assert "Waiting for the trainer" in page.text_content("#waiting")
            assert page.text_content("#bar-state").startswith("waiting")
            assert not [p for p in problems if "page error" in p], problems
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "monitor-waiting.png"), full_page=True)
        finally:
            ctx.close()


def test_a_nan_step_in_the_history_keeps_the_page_refreshing(browser, tmp_path):
    """Issue 23: one ``NaN`` in history/steps.jsonl made every refresh fail ("Monitor server not reachable")."""
    from ultimate_trainer.core import status

    sd = live_status_dir(tmp_path / "status")
    with open(sd / status.STEPS_HISTORY, "a") as f:  # as old versions wrote a skipped non-finite step
        f.write('\n{"global_step": 1121, "loss": 0.0, "grad_norm": NaN, "skipped": true}\n')
    status.append_jsonl(sd / status.STEPS_HISTORY, {"global_step": 1122, "loss": None, "loss_text": "nan",
                                                    "grad_norm": None, "skipped": True})
    ds = json.loads((sd / status.DAEMON_STATUS).read_text())
    ds["consolidation"]["retention_since_original"] = {"ratio": 0.962, "best": 1.0, "global_step": 900,
                                                       "consolidations": 3}
    status.atomic_write_json(sd / status.DAEMON_STATUS, ds)
    with ServerThread(create_app(sd, refresh_seconds=0.5)) as srv:
        ctx, page, problems = _open(browser, srv.url, 1400, 1000)
        try:
            page.wait_for_timeout(1500)  # three more refreshes
            assert not page.is_visible("#waiting")
            assert "bad" not in (page.get_attribute("#conn", "class") or "")
            assert page.locator("#loss-chart path.line").count() >= 1
            assert page.locator("#loss-chart circle.s5").count() >= 1  # the skipped step is marked
            assert page.text_content("#co-kept") == "96.2% (best 100.0%)"  # retention since the original base
            assert not [p for p in problems if "page error" in p], problems
        finally:
            ctx.close()


def test_the_merges_progress_shows_in_the_phase_bar(browser, tmp_path):
    """The daily merge shows its phase and ETA on the page as the trainer's long phases do."""
    import os

    from ultimate_trainer.core import status
    from ultimate_trainer.core.times import now_iso

    sd = live_status_dir(tmp_path / "status")
    ts = json.loads((sd / status.TRAINING_STATUS).read_text())
    status.atomic_write_json(sd / status.TRAINING_STATUS, {**ts, "state": "idle", "progress": None})
    status.atomic_write_json(sd / status.CONSOLIDATION_STATUS, {
        "schema_version": 1, "state": "running", "pid": os.getpid(), "updated_at": now_iso(),
        "stage": {"done": 1, "total": 5, "name": "score the base (gate)"},
        "progress": {"phase": "gate: the base", "done": 12, "total": 40, "unit": "prompts",
                     "elapsed_seconds": 60.0, "eta_seconds": 140.0, "started_at": now_iso()}})
    with ServerThread(create_app(sd, refresh_seconds=0.5)) as srv:
        ctx, page, problems = _open(browser, srv.url, 1400, 1000)
        try:
            assert page.is_visible("#phase")
            assert page.text_content("#phase-label") == ("consolidation · gate: the base 12 / 40 prompts · 30% · "
                                                         "2 min left")
            assert page.text_content("#co-next") == "running now · stage 2/5: score the base (gate)"
            assert not [p for p in problems if "page error" in p], problems
        finally:
            ctx.close()
