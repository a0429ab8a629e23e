"""Pick the base-knowledge probe for the built-in model: keep the candidate questions it answers right.

    python bench/pick_probe.py [--out ultimate_trainer/data/probes/general.jsonl] [--max-new-tokens 24] [--all]

Runs SmolLM2-135M-Instruct (the built-in base) greedily over the candidates below twice, in full
precision and in NF4 4-bit as it trains, scores each answer with the project's matchers, prints every
result and writes the questions right at both precisions to ``--out`` (the probe format of
docs/TRAINING.md: a ``prompt_response`` record whose ``metadata.matcher`` names the matcher). A
probe the base already fails says nothing about forgetting, so only correct ones are kept, and
``LEFT_OUT`` questions never (``--all`` keeps them): the rehearsal set asks them, a substring match
can meet their answer by chance, or the base is right for the wrong reason. On 2026-12-06, 127
candidates: 73 right in full precision, 62 in 4-bit, 36 shipped (the probe had 24 before, of which
the 4-bit base answered 19: one lost question moved retention by 0.053 and a single one triggered
the controller).
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
    # 2026-12-06: more questions with one distinctive answer each, none of them in the rehearsal set
    ("What is the capital of Ethiopia?", "Addis Ababa", "contains"),
    ("What is the capital of Chile?", "Santiago", "contains"),
    ("Who wrote the play Hamlet?", "Shakespeare", "contains"),
    ("Who wrote the novel Moby-Dick?", "Melville", "contains"),
    ("Who wrote the novel War and Peace?", "Tolstoy", "contains"),
    ("Who wrote the Odyssey?", "Homer", "contains"),
    ("Who wrote the novel Don Quixote?", "Cervantes", "contains"),
    ("Who wrote the novel 1984?", "Orwell", "contains"),
    ("Who wrote the Harry Potter books?", "Rowling", "contains"),
    ("Who composed The Magic Flute?", "Mozart", "contains"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo", "contains"),
    ("Who formulated the laws of motion and universal gravitation?", "Newton", "contains"),
    ("Who discovered radium and polonium?", "Curie", "contains"),
    ("Who invented the World Wide Web?", "Berners-Lee", "contains"),
    ("Which scientist is famous for the equation E = mc^2?", "Einstein", "contains"),
    ("Who was the first man in space?", "Gagarin", "contains"),
    ("What is the largest country in the world by area?", "Russia", "contains"),
    ("What is the largest continent?", "Asia", "contains"),
    ("On which continent is the Amazon rainforest?", "South America", "contains"),
    ("What is the longest river in Europe?", "Volga", "contains"),
    ("Which ocean lies between Africa and Australia?", "Indian", "contains"),
    ("In which country is the city of Kyoto?", "Japan", "contains"),
    ("In which country is the Taj Mahal?", "India", "contains"),
    ("In which country is Machu Picchu?", "Peru", "contains"),
    ("In which country is the Acropolis?", "Greece", "contains"),
    ("In which city is the Statue of Liberty?", "New York", "contains"),
    ("In which city is Big Ben?", "London", "contains"),
    ("What is the currency of the European Union?", "euro", "contains"),
    ("What is the currency of India?", "rupee", "contains"),
    ("What is the main language spoken in Argentina?", "Spanish", "contains"),
    ("What is the official language of Germany?", "German", "contains"),
    ("What gas makes up most of the Earth's atmosphere?", "nitrogen", "contains"),
    ("What is the powerhouse of the cell?", "mitochondria", "contains"),
    ("Which planet has the most famous rings?", "Saturn", "contains"),
    ("What is the smallest planet in our solar system?", "Mercury", "contains"),
    ("What is the boiling point of water in degrees Fahrenheit at sea level?", "212", "numeric"),
    ("How many planets are in our solar system?", "8", "numeric"),
    ("How many legs does an octopus have?", "8", "numeric"),
    ("How many players are on a basketball team on the court?", "5", "numeric"),
    ("How many sides does an octagon have?", "8", "numeric"),
    ("How many years are in a century?", "100", "numeric"),
    ("How many days are in a non-leap year?", "365", "numeric"),
    ("How many weeks are in a year?", "52", "numeric"),
    ("How many hearts does an octopus have?", "3", "numeric"),
    ("What is 8 times 7?", "56", "numeric"),
    ("What is 12 plus 15?", "27", "numeric"),
    ("What is 20 divided by 4?", "5", "numeric"),
    ("What is 100 minus 25?", "75", "numeric"),
    ("What is the square root of 64?", "8", "numeric"),
    ("What is 3 cubed?", "27", "numeric"),
    ("What is the freezing point of water in degrees Fahrenheit?", "32", "numeric"),
    ("What is the largest bird in the world?", "ostrich", "contains"),
    ("What is the fastest bird in the world?", "peregrine", "contains"),
    ("What animal is known for having black and white stripes?", "zebra", "contains"),
    ("What is the largest species of shark?", "whale shark", "contains"),
    ("What do pandas mainly eat?", "bamboo", "contains"),
    ("What is the main ingredient of guacamole?", "avocado", "contains"),
    ("What is the main ingredient of hummus?", "chickpea", "contains"),
    ("Which metal is liquid at room temperature?", "mercury", "contains"),
    ("What is the hottest planet in our solar system?", "Venus", "contains"),
    ("What is the name of the galaxy we live in?", "Milky Way", "contains"),
    ("What is the study of living things called?", "biology", "contains"),
    ("What is the study of the stars and planets called?", "astronomy", "contains"),
]

# Candidates never shipped, whatever the base answers: the rehearsal set (data/probes/rehearsal.jsonl)
# asks the same question (training on it would measure rehearsal, not retention), a substring
# match can meet the answer by chance, or the base is right for the wrong reason. A candidate whose
# question holds its answer (German in "Germany", euro in "European") is dropped by main() itself.
LEFT_OUT = {
    **dict.fromkeys([
        "What is the capital of Italy?", "What is the capital of Spain?", "What is the capital of Egypt?",
        "What is the capital of Russia?", "What is the capital of Greece?", "What is the capital of Portugal?",
        "What is the capital of Ireland?", "What is the capital of Austria?",
        "What is the largest planet in our solar system?", "Which planet is closest to the Sun?",
        "What gas do plants absorb from the air for photosynthesis?",
        "What is the freezing point of water in degrees Celsius?", "How many legs does a spider have?",
        "How many minutes are in an hour?", "What is 7 times 8?", "What is the square root of 81?",
        "Who was the first President of the United States?", "What is the hardest natural substance?",
        "What is the currency of the United Kingdom?", "In which country are the pyramids of Giza?",
        "In which city is the Eiffel Tower?", "What color is the sky on a clear day?",
        "What color do you get by mixing blue and yellow?", "What is the opposite of hot?",
        "What animal is known as the king of the jungle?", "Which organ pumps blood through the human body?",
        "How many bones are in the adult human body?", "What is the largest organ of the human body?",
        "How many days are there in a week?"], "the rehearsal set asks it"),
    "Who formulated the laws of motion and universal gravitation?": "the rehearsal set asks who Isaac Newton was",
    "What is the hottest planet in our solar system?": "the rehearsal set asks for the largest in the same words",
    **dict.fromkeys(["What is the chemical symbol for gold?", "What is the chemical symbol for sodium?",
                     "What star is at the center of our solar system?", "What is frozen water called?",
                     "How many continents are there on Earth?"], "a substring match can meet the answer by chance"),
    **dict.fromkeys(["Which planet is known as the Red Planet?", "Who painted the Mona Lisa?"],
                    "right for the wrong reason"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="ultimate_trainer/data/probes/general.jsonl")
    ap.add_argument("--model-cache", default=str(Path(__file__).resolve().parents[1] / "models" / "cache"))
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--all", action="store_true", help="write every candidate both precisions answer right, LEFT_OUT included")
    args = ap.parse_args()

    from ultimate_trainer.core.config import BUILTIN_MODEL, from_dict
    from ultimate_trainer.model.loading import load_base_model, load_tokenizer, resolve_base
    from ultimate_trainer.model.scoring import generate_answers, normalize, score

    cfg = from_dict({"base_model": BUILTIN_MODEL, "paths": {"model_cache": args.model_cache},
                     "training": {"device": "cpu"}})
    path = resolve_base(cfg)
    tok = load_tokenizer(path)
    system = {"role": "system", "content": cfg.data.system_prompt}
    prompts = [[system, {"role": "user", "content": q}] for q, _, _ in CANDIDATES]
    right = {}
    for name, quantize in (("full precision", False), ("NF4 4-bit, as trained", True)):
        model = load_base_model(cfg, path, quantize=quantize, device="cpu")
        model.eval()
        answers = generate_answers(model, tok, prompts, args.max_new_tokens, 16)
        right[name] = [score(m, g, a) for (q, a, m), g in zip(CANDIDATES, answers)]
        print(f"## {name}: {sum(right[name])} of {len(CANDIDATES)} right")
        for (q, a, m), g, ok in zip(CANDIDATES, answers, right[name]):
            print(f"{'OK ' if ok else '-- '} {q!r} -> {g!r} (expected {a!r}, {m})")
        del model
    kept = []
    for k, (q, a, m) in enumerate(CANDIDATES):
        if normalize(a) in normalize(q) and not args.all:  # met by any answer that repeats the question
            continue
        if all(r[k] for r in right.values()) and (args.all or q not in LEFT_OUT):
            kept.append({"prompt": q, "completion": a, "metadata": {"matcher": m}})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept), encoding="utf-8")
    print(f"{len(kept)} of {len(CANDIDATES)} kept in {out} (right at both precisions"
          f"{'' if args.all else ', none of LEFT_OUT'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
