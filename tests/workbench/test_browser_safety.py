"""Cross-site writes against the workbench from a real browser (headless Chromium, Debian's
/usr/bin/chromium via Playwright): a page served from a second local origin tries an upload and
queue joins every way a page can (fetch without CORS, fetch with a preflight, a multipart form and a
``text/plain`` JSON form); each is refused and nothing is stored. The workbench's own page, in the
same browser, uploads an evaluation set and evaluates it."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from _workbench_helpers import UvicornThread, light_project
from conftest import ARTIFACTS, CHROMIUM
from ultimate_trainer.core.config import load as load_config

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)"),
]

ATTACK = """<!doctype html><html><body>
<iframe name="sink"></iframe><iframe name="sink2"></iframe>
<form id="upform" method="post" enctype="multipart/form-data" action="WB/gradio_api/upload" target="sink">
  <input type="file" name="files" id="upfile"></form>
<form id="jsonform" method="post" enctype="text/plain" action="WB/gradio_api/queue/join" target="sink2">
  <input name='{"data": [], "fn_index": FN, "session_hash": "evil", "x": "' value='"}'></form>
<script>
window.results = {};
async function attack() {
  const file = new File(['{"prompt": "p", "response": "r"}\\n'], "evil.jsonl");
  const fd = new FormData(); fd.append("files", file);
  try { await fetch("WB/gradio_api/upload", {method: "POST", body: fd, mode: "no-cors", credentials: "include"});
        results.upload = "sent"; } catch (e) { results.upload = "blocked"; }
  const join = JSON.stringify({data: [], fn_index: FN, session_hash: "evil"});
  try { await fetch("WB/gradio_api/queue/join", {method: "POST", body: join, mode: "no-cors",
                    headers: {"Content-Type": "text/plain"}}); results.plain = "sent"; } catch (e) { results.plain = "blocked"; }
  try { const r = await fetch("WB/gradio_api/queue/join", {method: "POST", body: join,
                              headers: {"Content-Type": "application/json"}});
        results.cors = "read " + r.status; } catch (e) { results.cors = "blocked"; }
  try { const r = await fetch("WB/config"); results.read = "read " + r.status; } catch (e) { results.read = "blocked"; }
  const dt = new DataTransfer(); dt.items.add(file);
  document.getElementById("upfile").files = dt.files;
  document.getElementById("upform").submit();
  document.getElementById("jsonform").submit();
  results.done = true;
}
attack();
</script></body></html>"""


class AttackerSite:
    """A second local origin (another port) serving one page."""

    def __init__(self, page: str):
        body = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "AttackerSite":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ultimate_trainer.workbench.app import create_app

    cfg = load_config(light_project(tmp_path_factory.mktemp("wbbs")))
    app = create_app(cfg, cfg.path("status"))
    with UvicornThread(app) as srv:
        yield srv, app


def test_a_page_on_another_origin_cannot_write(served, browser):
    import httpx

    srv, app = served
    wb = srv.url.rstrip("/")
    fn = next(d["id"] for d in httpx.get(wb + "/config").json()["dependencies"] if d.get("api_name") == "evaluate")
    with AttackerSite(ATTACK.replace("WB", wb).replace("FN", str(fn))) as site:
        page = browser.new_page()
        answers: list[tuple[str, str, int]] = []
        page.on("response", lambda r: answers.append((r.request.method, r.url, r.status))
                if r.url.startswith(wb) else None)
        page.goto(site.url)
        page.wait_for_function("window.results && window.results.done === true", timeout=60000)
        page.wait_for_timeout(1000)  # the two form posts: navigations of the frames
        results = page.evaluate("window.results")
        page.close()
    writes = [(m, u, s) for m, u, s in answers if m in ("POST", "OPTIONS")]
    # Each way in reached the server: two uploads (fetch, form) and two text/plain joins (fetch, form).
    # The JSON join needs a CORS preflight, which is refused (the browser keeps preflights to itself),
    # so it is never sent.
    assert sorted(u.split("/gradio_api/")[1] for _, u, _ in writes) == ["queue/join"] * 2 + ["upload"] * 2, answers
    assert {s for _, _, s in writes} == {403}, writes
    assert results["cors"] == "blocked" and results["read"] == "blocked", results  # nothing readable either
    assert not [f for f in app.uploads.dir.rglob("*") if f.is_file()]  # nothing stored


def test_the_workbench_s_own_page_uploads_and_evaluates_a_set(served, browser, tmp_path):
    srv, app = served
    evalset = tmp_path / "mine.jsonl"
    evalset.write_text('{"prompt": "1?", "response": "1"}\n{"prompt": "2?", "response": "2"}\n')
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    refused: list[str] = []
    page.on("response", lambda r: refused.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(srv.url)
    page.wait_for_selector("text=Model workbench", timeout=60000)
    page.get_by_role("tab", name="Evaluate").click()
    page.get_by_label("uploaded JSONL").check()
    # The tab's components render when it is first shown: pick the file once its drop zone is on screen,
    # as a user would (a file set on an input still being mounted is never uploaded).
    page.get_by_text("Click to Upload").first.wait_for(state="visible", timeout=60000)
    page.locator('input[type="file"][accept=".jsonl"]').set_input_files(str(evalset))
    try:
        page.wait_for_selector("text=mine.jsonl", timeout=60000)  # the upload finished
    except PlaywrightTimeout:  # say what the server answered (a refusal is otherwise only seen after)
        raise AssertionError(f"the upload never showed; responses >= 400: {refused}; "
                             f"stored: {sorted(str(f) for f in app.uploads.dir.rglob('*'))}") from None
    page.get_by_role("button", name="Evaluate", exact=True).click()
    page.wait_for_function("[...document.querySelectorAll('textarea')].some("
                           "t => t.value.includes('mine.jsonl: 2 examples'))", timeout=120000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "workbench-evaluate-upload.png"), full_page=True)
    assert not refused, refused

    def stored() -> list[str]:
        # Beside the upload only the empty temporary file Gradio's File component leaves on each use.
        return [f.name for f in app.uploads.dir.rglob("*") if f.is_file() and f.stat().st_size]

    # While the tab is open the upload is stored in this process's folder under .work/ ...
    assert stored() == ["mine.jsonl"]
    page.close()
    # ... and once it closes (its heartbeat ends, Gradio calls the unload handler) it is deleted.
    deadline = time.monotonic() + 60
    while stored() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stored() == []
