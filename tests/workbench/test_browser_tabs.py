"""The workbench page in headless Chromium (Debian's /usr/bin/chromium via Playwright): every tab
renders over a tiny model and a fake history, a chat answer appears, texts from data stay text, and
the page loads nothing from the network. Screenshots of each tab go to artifacts/."""

from __future__ import annotations

import pytest

from _workbench_helpers import UvicornThread, make_workbench_project
from conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS as ARGS
from ultimate_trainer.core.config import load as load_config

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    from ultimate_trainer.workbench.app import create_app

    config, _ = make_workbench_project(tmp_path_factory.mktemp("wbb"), tiny_model_dir)
    cfg = load_config(config)
    with UvicornThread(create_app(cfg, cfg.path("status"))) as srv:
        yield srv


def test_each_tab_renders_and_shows_data_as_text(served):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        foreign: list[str] = []
        page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(served.url[:-1]) and
                not r.url.startswith(("data:", "blob:")) else None)
        page.goto(served.url)
        page.wait_for_selector("text=Model workbench", timeout=60000)

        page.get_by_label("Message").fill("Hello <b>there</b>")
        page.get_by_role("button", name="Send", exact=True).click()
        page.wait_for_function("document.querySelectorAll('[data-testid=\"bot\"]').length >= 1", timeout=60000)
        page.screenshot(path=str(ARTIFACTS / "workbench-chat.png"), full_page=True)
        user = page.locator('[data-testid="user"]').first
        assert "Hello <b>there</b>" in user.inner_text(), user.inner_html()  # the user's text, not bold markup
        assert user.locator("b").count() == 0
        page.screenshot(path=str(ARTIFACTS / "workbench-chat.png"), full_page=True)

        page.get_by_role("tab", name="Evaluate").click()
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.wait_for_function("[...document.querySelectorAll('textarea')].some("
                               "t => t.value.includes('held-out examples recorded by training: 4 examples'))",
                               timeout=120000)
        page.screenshot(path=str(ARTIFACTS / "workbench-evaluate.png"), full_page=True)

        page.get_by_role("tab", name="History").click()
        page.get_by_role("button", name="Show", exact=True).click()
        page.wait_for_timeout(1500)  # the plots draw after the data arrives
        page.screenshot(path=str(ARTIFACTS / "workbench-history.png"), full_page=True)
        page.wait_for_function("document.body.innerText.includes('Capital of France?')", timeout=180000)
        assert "<script>x</script>" in page.inner_text("body")  # an expected answer shown as text

        page.get_by_role("tab", name="Lineage").click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / "workbench-lineage.png"), full_page=True)
        page.wait_for_function("document.body.innerText.includes('b.jsonl')", timeout=60000)  # the newest model's files, picked by default
        page.screenshot(path=str(ARTIFACTS / "workbench-lineage.png"), full_page=True)

        assert page.evaluate("typeof window.__xss") == "undefined"
        browser.close()
    assert not foreign, foreign  # no fonts, scripts or analytics from the network
