"""The monitor page's panel layout (static/layout.js) in a real headless Chromium.

Panels hidden, shown, reordered and made wide or narrow with the keyboard alone (focus stays on the control that moved
a panel), the layout kept across a reload, a card's own hide button, the default restored by one
control, and a broken or older saved layout read safely. Screenshots go to artifacts/.
"""

from __future__ import annotations

import json

import pytest

from _web_helpers import ServerThread, live_status_dir
from conftest import ARTIFACTS, CHROMIUM
from ultimate_trainer.web.monitor import create_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)"),
]

DEFAULT = ["training", "loss", "stability", "accuracy", "examples", "ram", "gpu", "queue", "ckpt"]
ORDER = "[...document.querySelectorAll('main.grid > section.card')].map(c => c.id)"
HIDDEN = "[...document.querySelectorAll('main.grid > section.card')].filter(c => c.hidden).map(c => c.id)"
FOCUS = "document.activeElement.getAttribute('aria-label') || document.activeElement.id"
WIDE = "[...document.querySelectorAll('main.grid > section.card.span2')].map(c => c.id)"
DEFAULT_WIDE = ["training", "loss", "stability", "accuracy", "examples"]


@pytest.fixture()
def server(tmp_path):
    sd = live_status_dir(tmp_path / "status")
    with ServerThread(create_app(sd, refresh_seconds=0.5, workbench_port=8082)) as srv:
        yield srv


def _open(browser, url: str, width: int = 1400, height: int = 1000):
    ctx = browser.new_context(viewport={"width": width, "height": height}, color_scheme="dark")
    page = ctx.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    page.wait_for_selector("body[data-loaded='1']", timeout=15000)
    return ctx, page, problems


def _reload(page) -> None:
    page.reload()
    page.wait_for_selector("body[data-loaded='1']", timeout=15000)


def test_keyboard_reorders_and_hides_panels_and_the_layout_survives_a_reload(browser, server):
    ctx, page, problems = _open(browser, server.url)
    try:
        assert page.evaluate(ORDER) == DEFAULT and page.evaluate(HIDDEN) == []
        page.keyboard.press("l")  # opens the Layout panel, focus on its first control
        assert page.is_visible("#layout-panel") and page.get_attribute("#layout", "aria-expanded") == "true"
        assert page.evaluate("document.activeElement.id") == "layout-show-training"
        page.keyboard.press("Tab")
        assert page.evaluate(FOCUS) == "Wide Training"
        page.keyboard.press("Tab")  # the first panel's ↑ is disabled: Tab lands on its ↓
        assert page.evaluate(FOCUS) == "Move Training down"
        page.keyboard.press("Enter")
        page.keyboard.press("Space")
        assert page.evaluate(ORDER)[:4] == ["loss", "stability", "training", "accuracy"]
        assert page.evaluate(FOCUS) == "Move Training down"  # the focus moved with the panel
        page.keyboard.press("Shift+Tab")
        assert page.evaluate(FOCUS) == "Move Training up"
        page.keyboard.press("Enter")
        assert page.evaluate(ORDER)[:3] == ["loss", "training", "stability"]
        assert "Training moved to position 2 of 9" in page.text_content("#layout-status")
        page.focus("#layout-show-gpu")
        page.keyboard.press("Space")  # unticked: the GPU panel is hidden, the checkbox keeps the focus
        assert page.evaluate(HIDDEN) == ["gpu"] and not page.is_visible("#gpu")
        assert page.evaluate("document.activeElement.id") == "layout-show-gpu"
        assert page.text_content("#layout-count") == "1"
        page.focus("#layout-wide-ram")  # RAM two columns wide, Loss one: pressed state and focus kept
        page.keyboard.press("Space")
        page.focus("#layout-wide-loss")
        page.keyboard.press("Enter")
        assert page.get_attribute("#layout-wide-ram", "aria-pressed") == "true"
        assert page.get_attribute("#layout-wide-loss", "aria-pressed") == "false"
        assert page.evaluate("document.activeElement.id") == "layout-wide-loss"
        wide = ["training", "stability", "accuracy", "examples", "ram"]
        assert sorted(page.evaluate(WIDE)) == sorted(wide)
        page.keyboard.press("Escape")
        assert not page.is_visible("#layout-panel") and page.evaluate("document.activeElement.id") == "layout"
        # Moving to the last place: the ↓ becomes disabled, the focus goes to the same panel's ↑.
        page.keyboard.press("Enter")  # the focused Layout button opens the panel again
        page.focus("#layout-list button[aria-label='Move Checkpoints & consolidations up']")
        page.keyboard.press("Enter")
        page.focus("#layout-list button[aria-label='Move Checkpoints & consolidations down']")
        page.keyboard.press("Enter")
        assert page.evaluate(ORDER)[-1] == "ckpt"
        assert page.evaluate(FOCUS) == "Move Checkpoints & consolidations up"
        expected = ["loss", "training", "stability", "accuracy", "examples", "ram", "gpu", "queue", "ckpt"]
        assert page.evaluate(ORDER) == expected

        _reload(page)
        assert page.evaluate(ORDER) == expected and page.evaluate(HIDDEN) == ["gpu"]
        assert sorted(page.evaluate(WIDE)) == sorted(wide)
        assert page.text_content("#layout-count") == "1"
        saved = json.loads(page.evaluate("localStorage.getItem('ut-layout')"))
        assert saved == {"version": 1, "order": expected, "hidden": ["gpu"], "wide": wide}
        assert page.text_content("#bar-step") == "1,120"  # the page still fills its panels
        assert page.locator("#loss-chart path.line").count() >= 1
        assert not [p for p in problems if "page error" in p or "Content Security Policy" in p], problems
    finally:
        ctx.close()


def test_a_cards_hide_button_and_the_default_coming_back(browser, server):
    ctx, page, problems = _open(browser, server.url)
    try:
        page.click("#loss .card-hide")
        assert page.evaluate(HIDDEN) == ["loss"] and page.evaluate("document.activeElement.id") == "layout"
        assert "Loss hidden" in page.text_content("#layout-status")
        page.click("#layout")
        page.click("#layout-list button[aria-label='Move Queue up']")
        page.click("#layout-show-ram")
        page.click("#layout-wide-gpu")
        assert page.evaluate(HIDDEN) == ["loss", "ram"] and page.evaluate(ORDER).index("queue") == 6
        assert "gpu" in page.evaluate(WIDE)
        _reload(page)
        assert page.evaluate(HIDDEN) == ["loss", "ram"] and page.evaluate(ORDER).index("queue") == 6
        page.click("#layout")
        page.click("#layout-reset")
        assert page.evaluate(ORDER) == DEFAULT and page.evaluate(HIDDEN) == []
        assert sorted(page.evaluate(WIDE)) == sorted(DEFAULT_WIDE)
        assert page.evaluate("localStorage.getItem('ut-layout')") is None
        assert page.is_disabled("#layout-reset") and page.evaluate("document.activeElement.id") == "layout-show-training"
        assert page.text_content("#layout-count") == "" and not page.is_visible("#layout-count")
        assert page.get_attribute("#layout", "aria-label") == "Layout"
        _reload(page)
        assert page.evaluate(ORDER) == DEFAULT and page.evaluate(HIDDEN) == []
        assert not [p for p in problems if "page error" in p], problems
    finally:
        ctx.close()


def test_every_panel_hidden_says_how_to_get_them_back(browser, server):
    ctx, page, _ = _open(browser, server.url)
    try:
        page.evaluate(f"localStorage.setItem('ut-layout', JSON.stringify({{order: [], hidden: {json.dumps(DEFAULT)}}}))")
        _reload(page)
        assert page.is_visible("#layout-empty") and "▦ Layout shows them again" in page.text_content("#layout-empty")
        assert page.text_content("#layout-count") == "9"
        assert page.get_attribute("#layout", "aria-label") == "Layout: 9 panels hidden"
    finally:
        ctx.close()


def test_a_broken_or_older_saved_layout_is_read_safely(browser, server):
    ctx, page, problems = _open(browser, server.url)
    try:
        page.evaluate("localStorage.setItem('ut-layout', '{not json')")
        _reload(page)
        assert page.evaluate(ORDER) == DEFAULT and page.evaluate(HIDDEN) == []
        # Saved by another version of the page: a panel gone (dropped), panels it did not have (put back
        # after the panel that precedes them by default, at their default width), repeated ids (once),
        # no widths saved (the defaults).
        page.evaluate("localStorage.setItem('ut-layout', JSON.stringify("
                      "{order: ['ckpt', 'gone', 'loss', 'ckpt'], hidden: ['gone', 'ram', 'ram']}))")
        _reload(page)
        assert page.evaluate(ORDER) == ["training", "ckpt", "loss", "stability", "accuracy", "examples", "ram",
                                        "gpu", "queue"]
        assert page.evaluate(HIDDEN) == ["ram"] and sorted(page.evaluate(WIDE)) == sorted(DEFAULT_WIDE)
        # Widths saved for the panels that layout knew: Loss made narrow stays narrow, the panels it
        # did not know (Training, Stability, ...) keep their default width.
        page.evaluate("localStorage.setItem('ut-layout', JSON.stringify({order: ['loss', 'ram'], hidden: [],"
                      " wide: ['ram']}))")
        _reload(page)
        assert sorted(page.evaluate(WIDE)) == sorted(["training", "ram", "stability", "accuracy", "examples"])
        assert not [p for p in problems if "page error" in p], problems
    finally:
        ctx.close()


@pytest.mark.parametrize("theme", ["dark", "light"])
@pytest.mark.parametrize("width,height,name", [(1400, 1000, "desktop"), (390, 844, "phone")])
def test_layout_screenshots(browser, server, theme, width, height, name):
    ctx, page, _ = _open(browser, server.url, width, height)
    try:
        if page.evaluate("document.documentElement.dataset.theme") != theme:
            page.click("#theme")
        page.evaluate("localStorage.setItem('ut-layout', JSON.stringify("
                      "{order: ['accuracy', 'training', 'queue', 'ram', 'loss', 'stability', 'examples', 'gpu', 'ckpt'],"
                      " hidden: ['gpu', 'examples'], wide: ['accuracy', 'training', 'loss', 'stability', 'ckpt']}))")
        _reload(page)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"monitor-layout-{name}-{theme}.png"), full_page=True)
        page.click("#layout")
        page.focus("#layout-list button[aria-label='Move Training up']")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.screenshot(path=str(ARTIFACTS / f"monitor-layout-{name}-{theme}-panel.png"))
    finally:
        ctx.close()
