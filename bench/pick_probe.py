"""Pick the base-knowledge probe for the built-in model: keep the candidate questions it answers right.

    python bench/pick_probe.py [--out ultimate_trainer/data/probes/general.jsonl] [--max-new-tokens 24]

Runs SmolLM2-135M-Instruct (the built-in base, full precision on the CPU) greedily over the
candidates below, scores each answer with the project's matchers, prints every result and writes
the ones it gets right to ``--out`` (the probe format of docs/TRAINING.md: a ``prompt_response``
record whose ``metadata.matcher`` names the matcher). A probe the base already fails says nothing
about forgetting, so only correct ones are kept; of those, the shipped set keeps the ``SHIPPED``
questions (``--all`` writes every correct one): 41 of the 64 were right on 2026-11-27; the
shipped 24 leave out answers a substring match can meet by chance ("Au", "Na", "Sun"), answers
right for the wrong reason (the Red Planet, Mona Lisa) and most of the capitals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (question, expected answer, matcher)
CANDIDATES = [
    ("What is the capital of France?", "Paris", "contains"),
    ("What is the capital of Japan?", "Tokyo", "contains"),
    ("What is the capital of Italy?", "Rome", "contains"),
    ("What is the capital of Germany?", "Berlin", "contains"),
    ("What is the capital of Spain?", "Madrid", "contains"),
    ("What is the capital of the United Kingdom?", "London", "contains"),
    ("What is the capital of Russia?", "Moscow", "contains"),
    ("What is the capital of China?", "Beijing", "contains"),
    ("What is the capital of Egypt?", "Cairo", "contains"),
    ("What is the capital of Canada?", "Ottawa", "contains"),
    ("What is the capital of Australia?", "Canberra", "contains"),
    ("What is the capital of Greece?", "Athens", "contains"),
    ("What is the capital of Portugal?", "Lisbon", "contains"),
    ("What is the capital of Ireland?", "Dublin", "contains"),
    ("What is the capital of Austria?", "Vienna", "contains"),
    ("What is the largest planet in our solar system?", "Jupiter", "contains"),
    ("Which planet is known as the Red Planet?", "Mars", "contains"),
    ("Which planet is closest to the Sun?", "Mercury", "contains"),
    ("What is the chemical symbol for gold?", "Au", "contains"),
    ("What is the chemical symbol for sodium?", "Na", "contains"),
    ("What is the chemical formula of water?", "H2O", "contains"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide", "contains"),
    ("What is the boiling point of water in degrees Celsius at sea level?", "100", "numeric"),
    ("What is the freezing point of water in degrees Celsius?", "0", "numeric"),
    ("How many days are there in a week?", "7", "numeric"),
    ("How many continents are there on Earth?", "7", "numeric"),
    ("How many legs does a spider have?", "8", "numeric"),
    ("How many hours are in a day?", "24", "numeric"),
    ("How many minutes are in an hour?", "60", "numeric"),
    ("How many sides does a triangle have?", "3", "numeric"),
    ("How many sides does a hexagon have?", "6", "numeric"),
    ("What is 2 + 2?", "4", "numeric"),
    ("What is 7 times 8?", "56", "numeric"),
    ("What is 10 divided by 2?", "5", "numeric"),
    ("What is 15 minus 6?", "9", "numeric"),
    ("What is the square root of 81?", "9", "numeric"),
    ("Who wrote Romeo and Juliet?", "Shakespeare", "contains"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "contains"),
    ("Who developed the theory of relativity?", "Einstein", "contains"),
    ("Who was the first President of the United States?", "George Washington", "contains"),
    ("Who proposed the theory of evolution by natural selection?", "Darwin", "contains"),
    ("What is the largest ocean on Earth?", "Pacific", "contains"),
    ("What is the longest river in Africa?", "Nile", "contains"),
    ("What is the tallest mountain in the world?", "Everest", "contains"),
    ("What is the largest desert in Africa?", "Sahara", "contains"),
    ("What is the largest mammal?", "blue whale", "contains"),
    ("What is the hardest natural substance?", "diamond", "contains"),
    ("What is the main language spoken in Brazil?", "Portuguese", "contains"),
    ("What is the currency of Japan?", "yen", "contains"),
    ("What is the currency of the United Kingdom?", "pound", "contains"),
    ("In which country are the pyramids of Giza?", "Egypt", "contains"),
    ("In which city is the Eiffel Tower?", "Paris", "contains"),
    ("What color is the sky on a clear day?", "blue", "contains"),
    ("What color do you get by mixing blue and yellow?", "green", "contains"),
    ("What is the opposite of hot?", "cold", "contains"),
    ("What animal is known as the king of the jungle?", "lion", "contains"),
    ("What do bees make?", "honey", "contains"),
    ("Which organ pumps blood through the human body?", "heart", "contains"),
    ("How many bones are in the adult human body?", "206", "numeric"),
    ("What is the largest organ of the human body?", "skin", "contains"),
    ("What is the primary language of the United States?", "English", "contains"),
    ("What star is at the center of our solar system?", "Sun", "contains"),
    ("What is the natural satellite of the Earth called?", "Moon", "contains"),
    ("What is frozen water called?", "ice", "contains"),
]

SHIPPED = {
    "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Germany?",
    "What is the capital of the United Kingdom?", "What is the capital of China?", "What is the capital of Canada?",
    "What is the capital of Australia?", "What is the chemical formula of water?",
    "What is the boiling point of water in degrees Celsius at sea level?", "How many days are there in a week?",
    "How many hours are in a day?", "How many sides does a triangle have?", "How many sides does a hexagon have?",
    "Who wrote Romeo and Juliet?", "Who developed the theory of relativity?",
    "Who proposed the theory of evolution by natural selection?", "What is the largest ocean on Earth?",
    "What is the longest river in Africa?", "What is the tallest mountain in the world?",
    "What is the largest desert in Africa?", "What is the largest mammal?",
    "What is the main language spoken in Brazil?", "What is the currency of Japan?", "What do bees make?",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="ultimate_trainer/data/probes/general.jsonl")
    ap.add_argument("--model-cache", default="/work/main/models/cache")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--all", action="store_true", help="write every correct candidate, not only the SHIPPED ones")
    args = ap.parse_args()

    from ultimate_trainer.core.config import BUILTIN_MODEL, from_dict
    from ultimate_trainer.model.loading import load_base_model, load_tokenizer, resolve_base
    from ultimate_trainer.model.scoring import generate_answers, score

    cfg = from_dict({"base_model": BUILTIN_MODEL, "paths": {"model_cache": args.model_cache},
                     "training": {"device": "cpu"}})
    path = resolve_base(cfg)
    tok = load_tokenizer(path)
    model = load_base_model(cfg, path, quantize=False, device="cpu")
    system = {"role": "system", "content": cfg.data.system_prompt}
    prompts = [[system, {"role": "user", "content": q}] for q, _, _ in CANDIDATES]
    answers = generate_answers(model, tok, prompts, args.max_new_tokens, 16)
    kept = []
    for (q, a, m), g in zip(CANDIDATES, answers):
        ok = score(m, g, a)
        print(f"{'OK ' if ok else '-- '} {q!r} -> {g!r} (expected {a!r}, {m})")
        if ok and (args.all or q in SHIPPED):
            kept.append({"prompt": q, "completion": a, "metadata": {"matcher": m}})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept), encoding="utf-8")
    print(f"{len(kept)} of {len(CANDIDATES)} kept in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
