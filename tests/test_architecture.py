"""The package's shape: every module imports, imports run downward only, no cycles, no torch where none belongs.

The rules live in pyproject.toml ([tool.importlinter]) and docs/ARCHITECTURE.md explains them.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, chat, write_jsonl

import ultimate_trainer

PROCESS_PACKAGES = ("trainer", "daemon", "web", "workbench", "export", "serve")


def all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(ultimate_trainer.__path__, "ultimate_trainer."))


@pytest.mark.parametrize("name", all_modules())
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path: Path) -> None:
    """The check can fail: a copy of the package where the ground floor imports the trainer is rejected."""
    import shutil

    shutil.copytree(REPO / "ultimate_trainer", tmp_path / "ultimate_trainer",
                    ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    times = tmp_path / "ultimate_trainer" / "core" / "times.py"
    times.write_text(times.read_text() + "\nfrom ultimate_trainer.trainer import recipe  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "ultimate_trainer.core.times -> ultimate_trainer.trainer.recipe" in r.stdout


def test_process_folders_are_what_ls_shows() -> None:
    pkg = REPO / "ultimate_trainer"
    folders = {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    assert {"core", "data", "model", *PROCESS_PACKAGES} <= folders
    assert not [p.name for p in pkg.glob("*.py") if p.name not in ("__init__.py", "demo.py")]


def test_dry_run_and_the_web_servers_start_without_torch(tiny_model_dir: Path, make_project, tmp_path: Path) -> None:
    cfg = make_project(tiny_model_dir)
    data = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", f"a{i}") for i in range(6)])
    code = ("import runpy, sys; sys.argv = ['train.py', %r, '--config', %r, '--dry-run'];\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "assert code == 0, code\n"
            "import ultimate_trainer.web.monitor, ultimate_trainer.web.stats_api, ultimate_trainer.daemon.cli\n"
            "heavy = sorted(m for m in ('torch', 'peft', 'bitsandbytes') if m in sys.modules)\n"
            "assert not heavy, heavy\n") % (str(data), str(cfg))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"examples"' in r.stdout


def documented_modules() -> set[str]:
    """The module files named in docs/ARCHITECTURE.md's package tree, as paths under ``ultimate_trainer/``."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    tree = text.split("## The package", 1)[1].split("```", 2)[1]
    found, folders = set(), []
    for line in tree.splitlines()[2:]:  # after the ``` line and "ultimate_trainer/"
        m = __import__("re").match(r"^((?:[│ ]   )*)[├└]── (\S+)", line)
        if not m:
            continue
        depth, name = len(m.group(1)) // 4, m.group(2)
        del folders[depth:]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py"):
            found.add("/".join([*folders, name]))
    return found


def test_architecture_md_lists_every_module() -> None:
    pkg = REPO / "ultimate_trainer"
    modules = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}
    listed = documented_modules()
    assert modules - listed == set(), "add a line for each to docs/ARCHITECTURE.md's package tree"
    assert listed - modules == set(), "docs/ARCHITECTURE.md names modules that do not exist"
