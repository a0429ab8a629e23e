"""The workbench's Gradio page and its server (port ``monitor.workbench_port``, 8082).

Tabs, and the API names ``gradio_client`` drives them by:

- **Chat** (``/chat``, ``/models``): a model (base, ``latest``, a checkpoint, a consolidation),
  multi-turn, streamed, with a system prompt and generation settings; compare mode answers the same
  conversation with a second model beside it.
- **Evaluate** (``/evaluate``): two or more models on one evaluation set (workbench/evaluate.py):
  accuracy per model, per file and per skill, and the answers fixed or broken between them.
- **History** (``/history``, ``/answers``): accuracy over steps per skill and per file, loss,
  validation loss and grad norm; every scored answer, filtered.
- **Lineage** (``/lineage``, ``/lineage_model``, ``/lineage_file``): the input files behind each
  checkpoint and consolidation, and the models behind each file (core/lineage.py).

Served by uvicorn from a FastAPI app with the Gradio app mounted at ``/``, behind ``guard.Guard``
(the Host and same-origin rules of core/hosts.py, the routes and bodies Gradio may see, the files it
may read and serve, short JSON errors): loopback by default, no share link, analytics off, no fonts
or scripts from the network. Uploads go to ``<paths.work>/workbench/uploads/<pid>/`` (at most
4 MiB each) and are deleted after an hour unused, when their session ends and when the server stops.
Texts from data and models are shown as text (no Markdown or HTML rendering).
"""

from __future__ import annotations

import html
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from ultimate_trainer.core.config import Config
from ultimate_trainer.core.hosts import allowed_hosts, bind_error
from ultimate_trainer.core.lineage import Lineage
from ultimate_trainer.workbench import evaluate as ev
from ultimate_trainer.workbench import exporting
from ultimate_trainer.workbench import history as hist
from ultimate_trainer.workbench.guard import MAX_UPLOAD_BYTES, Guard, Uploads
from ultimate_trainer.workbench import models as wm

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 600  # how often uploads unused for an hour are looked for

SET_HELDOUT, SET_EVAL_FILE, SET_UPLOAD = "held-out (recorded by training)", "data.eval_file", "uploaded JSONL"


def _gradio() -> Any:
    """Gradio, imported with its analytics and version check off (it must never reach the network)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gradio as gr

    return gr


def _df(rows: list[dict[str, Any]], columns: list[str] | None = None) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=columns) if columns else pd.DataFrame(rows)


def _text(content: Any) -> str:
    """A chat message's text, whether Gradio hands it over as a string or as content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def _turns(history: list[Any] | None) -> list[dict[str, str]]:
    """The conversation as the model sees it: the chat boxes hold HTML-escaped text (see ``_shown``)."""
    return [{"role": m["role"], "content": html.unescape(_text(m.get("content")))} for m in history or []
            if isinstance(m, dict) and m.get("role") in ("user", "assistant")]


def _shown(conv: list[dict[str, str]]) -> list[dict[str, str]]:
    """A conversation for a chat box. Gradio's chat box renders HTML even with Markdown off, so texts
    from users and models are escaped: ``<b>`` shows as ``<b>``, never as bold, never as markup."""
    return [{"role": m["role"], "content": html.escape(m["content"], quote=False)} for m in conv]


class Workbench:
    """The page's handlers, over one config, one status folder and one model pool."""

    def __init__(self, cfg: Config, status_dir: Path, pool: wm.ModelPool | None = None,
                 uploads: Uploads | None = None):
        self.cfg, self.status_dir = cfg, Path(status_dir)
        self.pool = pool or wm.ModelPool(cfg)
        self.uploads = uploads  # None: no uploaded set is ever read

    # ----------------------------------------------------------------- chat
    def model_choices(self) -> list[tuple[str, str]]:
        return wm.choices(self.cfg)

    def chat(self, message: str, hist_a: list[Any], hist_b: list[Any], key_a: str, key_b: str, compare: bool,
             system: str, max_new_tokens: float, temperature: float, top_p: float
             ) -> Iterator[tuple[list[dict[str, str]], list[dict[str, str]], str, str]]:
        a, b = _turns(hist_a), _turns(hist_b)
        if not (message or "").strip():
            yield _shown(a), _shown(b), "", "type a message first"
            return
        head = [{"role": "system", "content": system}] if (system or "").strip() else []
        a.append({"role": "user", "content": message})
        sides = [(key_a, a)] + ([(key_b, b)] if compare else [])
        if compare:
            b.append({"role": "user", "content": message})
        notes = []
        for key, conv in sides:
            asked = head + list(conv)
            conv.append({"role": "assistant", "content": ""})
            try:
                for loaded, text in self.pool.stream(key, asked, int(max_new_tokens), float(temperature),
                                                     float(top_p)):
                    conv[-1]["content"] = text
                    yield _shown(a), _shown(b), "", "; ".join(notes + [f"{loaded.spec.label}: answering on {loaded.where}"])
                notes.append(f"{loaded.spec.label} on {loaded.where}")
            except Exception as e:  # a load or generation that fails is reported; the app keeps running
                log.warning("chat with %s failed: %s", key, e)
                conv.pop()
                notes.append(f"{key}: cannot answer: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            yield _shown(a), _shown(b), "", "; ".join(notes)

    # ----------------------------------------------------------------- evaluate
    def evaluate(self, keys: list[str], set_kind: str, upload: str | None) -> tuple[Any, Any, Any, str]:
        empty = (_df([]), _df([]), _df([]))
        keys = [k for k in keys or [] if k]
        if len(keys) < 2:
            return (*empty, "pick two or more models to compare")
        if set_kind == SET_UPLOAD:
            if not upload:
                return (*empty, "upload a JSONL file first")
            if self.uploads is None or self.uploads.inside(upload) is None:
                # Never opened: only a file the upload route stored (the guard checked whose it is).
                return (*empty, "only a JSONL file uploaded through this page can be evaluated")
            evalset = ev.read_set(Path(upload), self.cfg, Path(upload).name)
        elif set_kind == SET_EVAL_FILE:
            evalset = ev.eval_file_set(self.cfg)
        else:
            evalset = ev.heldout_set(self.cfg, self.status_dir)
        notes = evalset.bad[: ev.MAX_BAD_SHOWN]
        if not evalset.items:
            return (*empty, "\n".join(notes + [f"{evalset.name}: no usable examples"]))
        results = []
        for key in keys:
            try:
                results.append(ev.evaluate_model(self.cfg, self.pool, key, evalset))
            except Exception as e:
                log.warning("evaluating %s failed: %s", key, e)
                notes.append(f"{key}: cannot evaluate: {type(e).__name__}: {e}")
        cmp = ev.compare(evalset, results)
        notes.insert(0, f"{evalset.name}: {len(evalset.items)} examples, matcher {self.cfg.eval.matcher}; " +
                     ", ".join(f"{r['model']} {'from the cache' if r['cached'] else 'on ' + str(r['device'])}"
                               for r in results))
        changed_cols = ["change", "from", "to", "source", "skill", "prompt", "expected", "before", "after"]
        return _df(cmp["overall"]), _df(cmp["breakdown"]), _df(cmp["changed"], changed_cols), "\n".join(notes)

    # ----------------------------------------------------------------- history
    def history(self) -> tuple[Any, Any, Any, Any, Any, Any]:
        import pandas as pd

        acc = _df(hist.accuracy_by_group(self.status_dir), ["step", "by", "group", "accuracy", "answers"])
        ser = _df(hist.series(self.status_dir), ["step", "metric", "value"])
        by_skill, by_file = acc[acc["by"] == "skill"], acc[acc["by"] == "file"]
        losses = ser[ser["metric"].isin(["loss", "val_loss"])]
        grad = ser[ser["metric"] == "grad_norm"]
        files, skills = hist.groups(self.status_dir)
        gr = _gradio()
        return (pd.DataFrame(by_skill), pd.DataFrame(by_file), pd.DataFrame(losses), pd.DataFrame(grad),
                gr.update(choices=[""] + files), gr.update(choices=[""] + skills))

    def answers(self, verdict: str, file: str, skill: str, step_min: float | None, step_max: float | None) -> Any:
        rows = hist.answers(self.status_dir, verdict or "all", file or "", skill or "",
                            None if step_min in (None, "") else int(step_min),
                            None if step_max in (None, "") or int(step_max) <= 0 else int(step_max))
        return _df(rows, ["step", "correct", "file", "skill", "prompt", "expected", "generated", "source"])

    # ----------------------------------------------------------------- lineage
    def _lineage(self) -> Lineage:
        return Lineage(self.cfg.path("checkpoints"), self.cfg.path("models"))

    def lineage(self) -> tuple[Any, Any, Any]:
        lin = self._lineage()
        rows = [{"model": r["name"], "kind": r["kind"], "global_step": r["global_step"], "created_at": r["created_at"],
                 "files": len(r["files"]), "partly": sum(bool(f["partial"]) for f in r["files"])}
                for r in reversed(lin.all())]
        gr = _gradio()
        names = [r["model"] for r in rows]
        files = sorted({f["name"] for f in lin.files()})
        return (_df(rows, ["model", "kind", "global_step", "created_at", "files", "partly"]),
                gr.update(choices=names, value=names[0] if names else None), gr.update(choices=files))

    def lineage_model(self, name: str) -> Any:
        cols = ["name", "sha256", "size", "examples", "trained_at", "run_id", "partial"]
        lin = self._lineage()
        model = lin.find(name or "")
        return _df(lin.of(model)["files"] if model else [], cols)

    def lineage_file(self, name: str) -> Any:
        rows = [{"file": r["name"], "sha256": r["sha256"], "run_id": r["run_id"], **m}
                for r in self._lineage().containing(name or "") for m in r["models"]]
        return _df(rows, ["file", "sha256", "run_id", "kind", "name", "global_step", "partial"])


def build_ui(wb: Workbench) -> Any:
    """The Gradio Blocks of the workbench page."""
    gr = _gradio()
    choices = wb.model_choices()
    ckpts = [k for _, k in choices if k not in (wm.BASE, wm.LATEST)]
    text_chat = dict(render_markdown=False, sanitize_html=True, allow_tags=False, height=420,
                     feedback_options=None, buttons=["copy"])
    with gr.Blocks(title="Ultimate Trainer: model workbench", analytics_enabled=False) as ui:
        gr.Markdown("## Model workbench: is the model any good, and better than before?")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    key_a = gr.Dropdown(choices, value=wm.LATEST, label="Model", scale=3, allow_custom_value=True)
                    compare = gr.Checkbox(label="Compare with a second model", value=False, scale=1)
                    key_b = gr.Dropdown(choices, value=wm.BASE, label="Second model", scale=3, allow_custom_value=True)
                    reload_models = gr.Button("Refresh the model list", scale=1)
                system = gr.Textbox(wb.cfg.data.system_prompt, label="System prompt", lines=1)
                with gr.Row():
                    max_new = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                with gr.Row():
                    chat_a = gr.Chatbot(label="Model", **text_chat)
                    chat_b = gr.Chatbot(label="Second model", **text_chat)
                message = gr.Textbox(label="Message", placeholder="Ask something, Enter sends")
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    clear = gr.Button("Clear the conversation")
                where = gr.Textbox(label="Where the models run", interactive=False)
                inputs = [message, chat_a, chat_b, key_a, key_b, compare, system, max_new, temperature, top_p]
                outputs = [chat_a, chat_b, message, where]
                send.click(wb.chat, inputs, outputs, api_name="chat")
                message.submit(wb.chat, inputs, outputs, api_name=False)
                clear.click(lambda: ([], [], ""), None, [chat_a, chat_b, where], api_name=False)

                def refresh_models() -> tuple[Any, Any]:
                    c = wb.model_choices()
                    return gr.update(choices=c), gr.update(choices=c)

                reload_models.click(refresh_models, None, [key_a, key_b], api_name="models")

            with gr.Tab("Evaluate", id="evaluate"):
                with gr.Row():
                    eval_keys = gr.Dropdown(choices, value=list(reversed(ckpts[:2])), multiselect=True,
                                            label="Models to compare (in this order)", scale=3,
                                            allow_custom_value=True)
                    set_kind = gr.Radio([SET_HELDOUT, SET_EVAL_FILE, SET_UPLOAD], value=SET_HELDOUT,
                                        label="Evaluation set", scale=2)
                    upload = gr.File(label="JSONL (any accepted format)", file_types=[".jsonl"], type="filepath",
                                     scale=2)
                run = gr.Button("Evaluate", variant="primary")
                eval_notes = gr.Textbox(label="Notes", interactive=False, lines=2)
                overall = gr.Dataframe(label="Accuracy per model", interactive=False)
                breakdown = gr.Dataframe(label="Accuracy per file and per skill (percent)", interactive=False)
                changed = gr.Dataframe(label="Answers that changed (fixed / broken)", interactive=False, wrap=True)
                run.click(wb.evaluate, [eval_keys, set_kind, upload], [overall, breakdown, changed, eval_notes],
                          api_name="evaluate")

            with gr.Tab("History", id="history") as history_tab:
                refresh = gr.Button("Refresh")
                with gr.Row():
                    acc_skill = gr.LinePlot(x="step", y="accuracy", color="group", label="Accuracy per skill (%)",
                                            y_lim=[0, 100])
                    acc_file = gr.LinePlot(x="step", y="accuracy", color="group", label="Accuracy per file (%)",
                                           y_lim=[0, 100])
                with gr.Row():
                    loss = gr.LinePlot(x="step", y="value", color="metric", label="Loss and validation loss")
                    grad = gr.LinePlot(x="step", y="value", label="Grad norm")
                gr.Markdown("### Every scored answer")
                with gr.Row():
                    verdict = gr.Radio(["all", "right", "wrong"], value="all", label="Answers")
                    file_f = gr.Dropdown([""], value="", label="File", allow_custom_value=True)
                    skill_f = gr.Dropdown([""], value="", label="Skill", allow_custom_value=True)
                    step_min = gr.Number(None, label="From step", precision=0)
                    step_max = gr.Number(None, label="To step (0: no limit)", precision=0)
                browse = gr.Button("Show")
                table = gr.Dataframe(label="Scored answers (newest first, at most 500)", interactive=False, wrap=True)
                refresh.click(wb.history, None, [acc_skill, acc_file, loss, grad, file_f, skill_f], api_name="history")
                history_tab.select(wb.history, None, [acc_skill, acc_file, loss, grad, file_f, skill_f],
                                   api_name=False)
                browse.click(wb.answers, [verdict, file_f, skill_f, step_min, step_max], table, api_name="answers")

            with gr.Tab("Lineage", id="lineage") as lineage_tab:
                models_table = gr.Dataframe(label="Checkpoints and consolidations (newest first)", interactive=False)
                with gr.Row():
                    pick_model = gr.Dropdown([], label="Which input files are in this model?", allow_custom_value=True)
                    pick_file = gr.Dropdown([], label="Which models contain this file?", allow_custom_value=True)
                model_files = gr.Dataframe(label="Input files (oldest run first)", interactive=False)
                file_models = gr.Dataframe(label="Models containing the file", interactive=False)
                lineage_tab.select(wb.lineage, None, [models_table, pick_model, pick_file], api_name="lineage")
                pick_model.change(wb.lineage_model, pick_model, model_files, api_name="lineage_model")
                pick_file.change(wb.lineage_file, pick_file, file_models, api_name="lineage_file")
            exporting.build_tab(gr, wb.cfg, wb.model_choices)

        def session_closed(request: Any) -> None:
            """The tab closed (its heartbeat ended): the files its session uploaded are not needed."""
            if wb.uploads is not None and request is not None and request.session_hash:
                wb.uploads.release(request.session_hash)

        session_closed.__annotations__["request"] = gr.Request  # how Gradio knows to pass the request
        ui.unload(session_closed)
    return ui


# --------------------------------------------------------------------------- serving

def create_app(cfg: Config, status_dir: str | Path, bind_host: str = "127.0.0.1",
               extra_hosts: list[str] | None = None, pool: wm.ModelPool | None = None) -> Any:
    """The ASGI app: FastAPI with the Gradio page at ``/``, behind the guard (workbench/guard.py)."""
    import contextlib

    uploads = Uploads(cfg.path("work") / "workbench" / "uploads")
    # Gradio's upload and cache folder: read when the Blocks and the app are built, so set first.
    os.environ["GRADIO_TEMP_DIR"] = str(uploads.prepare())
    gr = _gradio()
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.routing import APIRoute

    wb = Workbench(cfg, Path(status_dir), pool, uploads)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> Any:
        import asyncio

        async def sweeper() -> None:  # also swept at each upload
            while True:
                await asyncio.sleep(SWEEP_EVERY_S)
                uploads.sweep()

        task = asyncio.create_task(sweeper())
        yield
        task.cancel()
        uploads.close()  # the server stops: no upload is needed any more

    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    # A CORSMiddleware that allows no origin: Gradio then adds none of its own (its documented switch;
    # its own echoes a foreign Origin when the Host is not a localhost alias, e.g. [::1]).
    api.add_middleware(CORSMiddleware, allow_origins=[])

    @api.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "loaded": wb.pool.loaded()}

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no Google Fonts: works offline
    ui = build_ui(wb)
    own_writes = {r.path for r in api.routes if isinstance(r, APIRoute) and set(r.methods) - {"GET", "HEAD"}}
    app = gr.mount_gradio_app(api, ui, path="", server_name=bind_host, theme=theme, ssr_mode=False,
                              mcp_server=False, pwa=False, footer_links=["api"], run_history=False,
                              max_file_size=MAX_UPLOAD_BYTES, enable_monitoring=False,
                              show_error=False)  # an unexpected exception's text stays in the log
    fns = ui.fns.values()
    return Guard(app, allowed_hosts(bind_host, extra_hosts), uploads, {fn._id for fn in fns},
                 {fn.api_name for fn in fns if isinstance(fn.api_name, str)}, own_writes)


def bind(host: str, port: int) -> socket.socket | None:
    """A listening socket, or None after a one-line message (address in use names --port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        return sock
    except OSError as e:
        print(bind_error("workbench", host, port, e), file=sys.stderr)
        return None


def server(app: Any, sock: socket.socket) -> Any:
    """A uvicorn server for ``app`` on an already bound socket (``.run(sockets=[sock])``)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                         lifespan="on", ws="none"))


def main(argv: list[str] | None = None) -> int:
    from ultimate_trainer.core import config as config_mod
    from ultimate_trainer.core.config import config_or_none
    from ultimate_trainer.core.logs import setup_logging
    import argparse

    parser = argparse.ArgumentParser(description="Model workbench: chat, compare, evaluate, history, lineage.")
    config_mod.add_arguments(parser)
    parser.add_argument("--host", help="address to bind (default: monitor.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: monitor.workbench_port, 8082)")
    parser.add_argument("--status-dir", help="folder of the status files (default: paths.status)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="extra Host header to accept (e.g. a reverse proxy's name); repeatable")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    cfg = config_or_none(args)
    if cfg is None:
        return 2
    host = args.host or cfg.monitor.host
    port = args.port if args.port is not None else cfg.monitor.workbench_port
    status_dir = Path(args.status_dir) if args.status_dir else cfg.path("status")
    try:
        os.nice(10)  # beside a training run, the trainer comes first
    except OSError:
        pass
    sock = bind(host, port)
    if sock is None:
        return 1
    srv = server(create_app(cfg, status_dir, host, args.allow_host), sock)
    shown = f"[{host}]" if ":" in host else host
    log.info("workbench serving on http://%s:%d/", shown, sock.getsockname()[1])
    srv.run(sockets=[sock])  # uvicorn handles SIGTERM/SIGINT: a graceful stop, exit code 0
    return 0
