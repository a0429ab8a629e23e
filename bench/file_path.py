#!/usr/bin/env python3
"""One file's path from inbox to checkpoint, measured: modules crossed, turns back, reads and hashes of the file.

Drops one JSONL file into a fresh project's inbox, lets the daemon's intake take it, queue it and
open a batch (its manifest too, where the code has one), then trains the run in the same process
(``recipe.run``, a tiny random Llama with the built-in tokenizer, on the CPU), and records:

- every module of ``ultimate_trainer`` whose functions run (imports alone do not count), in the
  order first entered (``sys.setprofile``, threads included), for the daemon's side, the prefetch
  child's (the worker tokenizing the file ahead, as ``trainer/prefetch.py`` would, from the daemon's
  hint) and the trainer's;
- every ``open`` of the data file, by side (``sys.addaudithook``): a read for hashing or tokenizing;
- every hash of the file, by side: a call of a function that hashes a whole file (``HASHERS``), or a
  read by ``prepare``'s ``_FileReader`` without the manifest's hash (it hashes as it reads);
- every turn back: a call up the import graph, from a module of the package into a function of a
  module that imports it (directly or not, read from the sources with ``ast``), so a function, a
  lambda or an object of the caller's caller handed down and called from below (a method of a data
  object from a lower module is not one; nor is the Trainer calling our callbacks: it is not ours);
- every listing of a ``queue/`` folder by the trainer's side (``os.listdir``/``os.scandir``).

The trainer's run does not use the prefetch cache, so its figures are those of ``train.py``. The
figures go into docs/ARCHITECTURE.md ("One file's path"), this version beside an older one.

    .venv/bin/python bench/file_path.py [--repo DIR]

``--repo`` runs the code of another checkout (an older version, for the side by side); the built-in
model must be in this checkout's models/cache (any test run or ``make demo`` puts it there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SIDES = ("daemon", "prefetch", "trainer")
# The functions that hash a whole file, in this version and the earlier ones the bench is run on.
HASHERS = {("core/manifest.py", "digest"), ("data/tokcache.py", "file_sha256"), ("daemon/inbox.py", "sha256_file"),
           ("data/replay.py", "digest")}


def imports_of(package: Path) -> dict[str, set[str]]:
    """For each module of the package (``core/manifest.py``), the package's modules it imports anywhere in it."""
    import ast

    def module_file(dotted: str) -> str | None:
        rel = dotted.split(".")[1:]
        for cand in (package.joinpath(*rel).with_suffix(".py"), package.joinpath(*rel, "__init__.py")):
            if rel and cand.is_file():
                return str(cand.relative_to(package))
        return None

    out: dict[str, set[str]] = {}
    for f in package.rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n.startswith("ultimate_trainer."):
                    m = module_file(n)
                    if m:
                        found.add(m)
        out[str(f.relative_to(package))] = found
    return out


def reachable(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """For each module, every module it imports directly or through others."""
    out: dict[str, set[str]] = {}
    for start in imports:
        seen, todo = set(), [start]
        while todo:
            for m in imports.get(todo.pop(), set()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        out[start] = seen
    return out


def measure(root: Path, cache: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ultimate_trainer.core import config as config_mod
    from ultimate_trainer.daemon.intake import Intake

    tok = AutoTokenizer.from_pretrained(cache / "smollm2-135m-instruct")
    model_dir = root / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = config_mod.from_dict({
        "base_model": str(model_dir), "load_in_4bit": False, "eval_steps": 0, "save_steps": 100,
        "paths": {"root": str(root), "model_cache": str(cache)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"batch_size": 2, "max_seq_length": 128, "device": "cpu", "rehearsal_fraction": 0.0,
                     "replay_fraction": 0.2},
        "eval": {"probe_file": ""}, "daemon": {"file_stable_seconds": 0}})
    inbox = cfg.path("inbox")
    inbox.mkdir(parents=True)
    name = name_of_file = "one.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"a{i}"}]}) for i in range(40)]
    (inbox / name).write_text("\n".join(lines) + "\n")

    import ultimate_trainer

    package = Path(ultimate_trainer.__file__).parent
    imports = imports_of(package)
    above = reachable(imports)  # above[m]: the modules m depends on; a call from one of them into m turns back
    side, listings = "daemon", []
    seen: dict[str, list[str]] = {s: [] for s in SIDES}
    opens = {s: 0 for s in SIDES}
    hashes = {s: 0 for s in SIDES}
    turns: dict[str, list[str]] = {s: [] for s in SIDES}
    queue = str(cfg.path("queue"))

    def module(frame) -> str | None:
        f = frame.f_code.co_filename
        i = f.find("ultimate_trainer" + os.sep)
        return f[i + len("ultimate_trainer") + 1:] if i >= 0 else None

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and str(args[0]).endswith(name):
            opens[side] += 1
        elif event in ("os.listdir", "os.scandir") and side == "trainer" and args and \
                str(args[0]).startswith(queue):
            listings.append(str(args[0]))

    def profile(frame, event, arg) -> None:
        if event != "call" or frame.f_code.co_name == "<module>":  # code that runs, not imports
            return
        mod = module(frame)
        if mod is None:
            return
        if mod not in seen[side]:
            seen[side].append(mod)
        name = frame.f_code.co_name
        if (mod, name) in HASHERS or (mod == "data/prepare.py" and name == "run" and "self" in frame.f_locals
                                      and getattr(frame.f_locals["self"], "sha256", None) is None
                                      and str(getattr(frame.f_locals["self"], "path", "")).endswith(name_of_file)):
            hashes[side] += 1
        caller = module(frame.f_back) if frame.f_back is not None else None
        if caller is not None and caller != mod and caller in above.get(mod, set()) \
                and mod not in imports.get(caller, set()):
            turn = f"{caller.removesuffix('.py')} -> {mod.removesuffix('.py')}.{name}"
            if turn not in turns[side]:
                turns[side].append(turn)

    sys.addaudithook(audit)
    threading.setprofile(profile)  # the tokenizing thread of prepare too
    sys.setprofile(profile)
    try:
        intake = Intake(inbox, cfg.path("queue"), cfg.daemon)
        intake.scan()
        hint = intake.peek_entries() if hasattr(intake, "peek_entries") else \
            [intake.spool.folder("waiting") / n for n in intake.peek()]
        side = "prefetch"  # what the worker's prefetch child does with the daemon's hint (trainer/prefetch.py)
        from ultimate_trainer.data.prepare import fill_cache

        fill_cache(hint, tok, cfg, root / "prefetch-cache")
        side = "daemon"
        batch = intake.batch()
        files = [intake.spool.folder("processing") / n for n in batch.files]
        run_input = intake.manifest(batch.files, cfg.path("status")) if hasattr(intake, "manifest") else files
        side = "trainer"
        from ultimate_trainer.trainer.recipe import run

        code = run(cfg, run_input)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return {"exit_code": int(code), "modules": seen, "opens_of_the_file": opens, "hashes_of_the_file": hashes,
            "turns_back": turns, "trainer_lists_queue": listings}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=HERE, help="the checkout whose code runs (default: this one)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(measure(Path(d), HERE / "models" / "cache")))
        return 0
    env = {**os.environ, "PYTHONPATH": str(args.repo.resolve()), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--inner"], env=env, capture_output=True,
                       text=True, cwd=args.repo)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for side in SIDES:
        mods = out["modules"][side]
        print(f"{side}: {len(mods)} modules: {' -> '.join(m.removesuffix('.py') for m in mods)}")
        turns = out["turns_back"][side]
        print(f"{side}: {len(turns)} turns back" + "".join(f"\n    {t}" for t in turns))
    total = len(set().union(*(out["modules"][s] for s in ("daemon", "trainer"))))
    print(f"modules in all (daemon + trainer): {total}; opens of the file: {out['opens_of_the_file']}; "
          f"hashes of the file: {out['hashes_of_the_file']}; "
          f"queue/ folders listed by the trainer: {len(out['trainer_lists_queue'])} {out['trainer_lists_queue']}; "
          f"run exit code {out['exit_code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
