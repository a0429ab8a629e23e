#!/usr/bin/env python3
"""One file's path from inbox to checkpoint, measured: the modules it crosses, how often it is read, who lists queue/.

Drops one JSONL file into a fresh project's inbox, lets the daemon's intake take it, queue it and
open a batch (its manifest too, where the code has one), then trains the run in the same process
(``recipe.run``, a tiny random Llama with the built-in tokenizer, on the CPU), and records:

- every module of ``ultimate_trainer`` whose functions run (imports alone do not count), in the
  order first entered (``sys.setprofile``), for the daemon's side and for the trainer's;
- every ``open`` of the data file, by side (``sys.addaudithook``): a read for hashing or tokenizing;
- every listing of a ``queue/`` folder by the trainer's side (``os.listdir``/``os.scandir``).

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
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


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
    name = "one.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"a{i}"}]}) for i in range(40)]
    (inbox / name).write_text("\n".join(lines) + "\n")

    side, seen, opens, listings = "daemon", {"daemon": [], "trainer": []}, {"daemon": 0, "trainer": 0}, []
    queue = str(cfg.path("queue"))

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and str(args[0]).endswith(name):
            opens[side] += 1
        elif event in ("os.listdir", "os.scandir") and side == "trainer" and args and \
                str(args[0]).startswith(queue):
            listings.append(str(args[0]))

    def profile(frame, event, arg) -> None:
        if event != "call" or frame.f_code.co_name == "<module>":  # code that runs, not imports
            return
        f = frame.f_code.co_filename
        i = f.find("ultimate_trainer" + os.sep)
        if i < 0:
            return
        mod = f[i + len("ultimate_trainer") + 1:]
        if mod not in seen[side]:
            seen[side].append(mod)

    sys.addaudithook(audit)
    sys.setprofile(profile)
    try:
        intake = Intake(inbox, cfg.path("queue"), cfg.daemon)
        intake.scan()
        batch = intake.batch()
        files = [intake.spool.folder("processing") / n for n in batch.files]
        run_input = intake.manifest(batch.files, cfg.path("status")) if hasattr(intake, "manifest") else files
        side = "trainer"
        from ultimate_trainer.trainer.recipe import run

        code = run(cfg, run_input)
    finally:
        sys.setprofile(None)
    return {"exit_code": int(code), "modules": seen, "opens_of_the_file": opens, "trainer_lists_queue": listings}


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
    for side in ("daemon", "trainer"):
        mods = out["modules"][side]
        print(f"{side}: {len(mods)} modules: {' -> '.join(m.removesuffix('.py') for m in mods)}")
    total = len(set(out["modules"]["daemon"]) | set(out["modules"]["trainer"]))
    print(f"modules in all: {total}; opens of the file: {out['opens_of_the_file']}; "
          f"queue/ folders listed by the trainer: {len(out['trainer_lists_queue'])} {out['trainer_lists_queue']}; "
          f"run exit code {out['exit_code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
