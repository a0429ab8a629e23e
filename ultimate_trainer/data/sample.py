"""Deterministic demo data: a booking-reference format the base model cannot guess but learns fast.

The task: "Make the booking reference for Alice Smith, seat 42." -> ``REF-42-SMITH``. The rule is
arbitrary (so SmolLM2-135M-Instruct gets it wrong before training) yet mechanical (seat number and
upper-cased surname), so what the model learns carries over to new names and seats: the held-out
lines, a random slice of each file, test the skill on inputs it never saw. Answers are a few tokens
long, scored with the ``normalized`` matcher.

Most lines are chat format; a few use ShareGPT, prompt/response and Alpaca; the first file also
carries deliberately bad lines so the demo shows a bad-line report.

    python -m ultimate_trainer.data.sample OUTDIR [--files 2] [--examples 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FIRST_NAMES = (
    "Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
    "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe",
)
SURNAMES = (
    "Smith", "Garcia", "Novak", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Kowalski", "Silva", "Brennan",
    "Haddad", "Fischer", "Rossi", "Petrov", "Dubois", "Nguyen", "Larsen", "Mendes", "Quigley", "Varga",
    "Walsh", "Yilmaz", "Zhang", "Abara", "Castell", "Drummond", "Eriksen", "Fontaine", "Gallo", "Holm",
)
PHRASINGS = (
    "Make the booking reference for {first} {last}, seat {seat}.",
    "What is the booking reference for {first} {last} in seat {seat}?",
    "Booking reference please: passenger {first} {last}, seat {seat}.",
    "{first} {last} is sitting in seat {seat}. Give the booking reference.",
    "Seat {seat} is booked by {first} {last}. What is the reference?",
)
BAD_LINES = (
    b'{"messages": [{"role": "user", "content": "Make the booking reference for Ann Lee, seat 3."}',
    json.dumps({"messages": [{"role": "user", "content": "Make the booking reference for Ann Lee, seat 3."}]}).encode(),
    json.dumps({"question": "Make the booking reference for Ann Lee, seat 3.", "answer": "REF-3-LEE"}).encode(),
)


def reference(last: str, seat: int) -> str:
    """The rule the model has to learn."""
    return f"REF-{seat}-{last.upper()}"


def _record(prompt: str, answer: str, fmt: str) -> dict[str, Any]:
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
    if fmt == "prompt_response":
        return {"prompt": prompt, "response": answer}
    if fmt == "alpaca":
        return {"instruction": "Give the booking reference.", "input": prompt, "output": answer}
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "metadata": {"task": "booking_reference"}}


def examples(rng: random.Random, n: int, taken: set[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """``n`` records with (first, last, seat) combinations not in ``taken`` (which is updated)."""
    out = []
    while len(out) < n:
        first, last, seat = rng.choice(FIRST_NAMES), rng.choice(SURNAMES), rng.randint(1, 99)
        if (first, last, seat) in taken:
            continue
        taken.add((first, last, seat))
        prompt = rng.choice(PHRASINGS).format(first=first, last=last, seat=seat)
        # Mostly chat; one in ten in each other format, so every reader path is exercised.
        fmt = rng.choices(("chat", "sharegpt", "prompt_response", "alpaca"), weights=(7, 1, 1, 1))[0]
        out.append(_record(prompt, reference(last, seat), fmt))
    return out


def write_demo_data(directory: Path, n_files: int = 2, examples_per_file: int = 300, seed: int = 0) -> list[Path]:
    """Write ``n_files`` JSONL files of the booking task into ``directory``; same seed, same bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    taken: set[tuple[str, str, int]] = set()  # unique across files: no line is in two files
    paths = []
    for i in range(n_files):
        lines = [json.dumps(r, ensure_ascii=False).encode() for r in examples(rng, examples_per_file, taken)]
        if i == 0:
            for k, bad in enumerate(BAD_LINES):
                lines.insert(min(len(lines), 7 + 11 * k), bad)
        path = directory / f"bookings-{i + 1}.jsonl"
        tmp = directory / f".{path.name}.tmp"  # hidden, not *.jsonl: the inbox ignores it
        tmp.write_bytes(b"".join(line + b"\n" for line in lines))
        tmp.replace(path)  # the daemon may be watching this folder: never expose half a file
        paths.append(path)
        log.info("wrote %s (%d lines)", path, len(lines))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the demo's booking-reference JSONL files.")
    p.add_argument("outdir", type=Path)
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--examples", type=int, default=300, help="examples per file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.files < 1 or args.examples < 1:
        p.error("--files and --examples must be at least 1")
    for path in write_demo_data(args.outdir, args.files, args.examples, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
