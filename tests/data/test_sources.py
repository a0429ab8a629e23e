"""Each tool's own formats, read as that tool trains them (tests/fixtures/sources/, written from each tool's docs).

LLaMA-Factory (data/README.md and dataset_info.json conventions: KTO tags, ranking data in ShareGPT and
Alpaca columns, the v1 format with typed content parts and loss_weight), TRL (dataset formats page:
preference with explicit and implicit prompts, unpaired preference), OpenAI (chat and preference
fine-tuning), Axolotl (DPO types, per-part train flags, template-free segments) and reasoning traces as exporters write them.

For every record the test states the whole tokenized text split into what is trained (``T(...)``)
and what is untrained context, decoded from the token store's labels, or the reason it is skipped;
and that the skipped records are exactly those, with those reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, make_cfg, smol_tokenizer
from reasoning_template import reasoning_tokenizer
from tool_template import tool_tokenizer
from ultimate_trainer.data import prepare as data
from ultimate_trainer.data.formats import parse_record

CORPUS = REPO / "tests" / "fixtures" / "sources"
END = "<|im_end|>"


class T(str):
    """A trained piece of the rendering."""


def sys_(c: str = "S.") -> str:
    return f"<|im_start|>system\n{c}{END}\n"


def user(c: str) -> str:
    return f"<|im_start|>user\n{c}{END}\n"


def said(c: str) -> str:
    """An assistant turn that is context (not trained)."""
    return f"<|im_start|>assistant\n{c}{END}\n"


def answer(c: str) -> list[str]:
    """A trained assistant turn: the answer and its end of turn, not the header nor the newline after it."""
    return ["<|im_start|>assistant\n", T(c + END), "\n"]


def flat(*pieces) -> list[str]:
    out: list[str] = []
    for p in pieces:
        out.extend(p if isinstance(p, list) else [p])
    return out


def one(question: str, reply: str, system: str = "S.") -> list[str]:
    return flat(sys_(system), user(question), answer(reply))


# The built-in model's template renders no reasoning: the project's convention, a <think> block before the answer.
CONVENTION = "<think>\n{}\n</think>\n\n"
# tests/data/reasoning_template.py renders reasoning_content itself, with one newline after </think>.
TEMPLATE = "<think>\n{}\n</think>\n"


def reasoning_expected(think: str) -> dict[int, list[str] | str]:
    def r(text: str, reply: str) -> str:
        return think.format(text) + reply

    return {
        1: one("Is 91 prime?", r("Try small divisors: 7 x 13 = 91.", "No, 91 = 7 x 13.")),  # reasoning_content
        2: one("Half of 10?", r("10 / 2 = 5.", "5.")),  # thinking
        3: one("Opposite of up?", r("Antonym of up.", "Down.")),  # reasoning
        4: one("3 cubed?", r("3 x 3 x 3 = 27.", "27.")),  # a <think> block at the start of the answer
        5: one("First letter of apple?", r("apple starts with a.", "A.")),  # a thinking content part
        # a reasoning part marked "train": false: the reasoning is context, the answer is trained
        6: flat(sys_(), user("Capital of Italy?"), "<|im_start|>assistant\n" + think.format("Recall the capital."),
                T("Rome." + END), "\n"),
        7: flat(sys_(), user("1+1?"), answer(r("One and one.", "2.")), user("2+2?"), answer(r("Two and two.", "4."))),
        8: one("Warm colour?", r("Warm colours: red, orange.", "Red.")),  # TRL preference: chosen with reasoning
        9: "message 2 reasoning_content is a number (7), not a string",
        10: one("Hi.", "<think>\n\n</think>\n\nHello."),  # an empty think block is no reasoning: kept verbatim
        11: one("Square root of 16?", r("4 x 4 = 16.", "4.")),  # ShareGPT turn with reasoning_content
    }


# file -> (tokenizer kind, {record number: expected pieces, or the skip reason (its start)})
EXPECTED: dict[str, tuple[str, dict[int, list[str] | str]]] = {
    "llamafactory_kto.json": ("smol", {
        1: one("Name a prime number.", "Seven."),
        2: "KTO line with label false (the answer is marked as bad): not trained on",
        3: "KTO line with label false",  # a multi-turn conversation: none of its answers is trained
        # label true: the label judges the last answer; the earlier answer is context
        4: flat(sys_(), user("Spell dog."), said("D-O-G."), user("Backwards?"), answer("G-O-D.")),
        5: one("Is ice cold?", "Yes."),  # ShareGPT + kto_tag true
        6: "KTO line with kto_tag false (the answer is marked as bad): not trained on",  # ShareGPT
        7: "KTO line with kto_tag false",  # Alpaca columns
        8: one("Add 3 and 3.", "6"),
        9: 'label is a string ("good"), not true or false',
    }),
    "llamafactory_dpo.json": ("smol", {
        1: one("Best season?", "Spring, for its flowers."),
        # the earlier gpt turn is the prompt's, not a target: only chosen is trained
        2: flat(sys_(), user("Recommend a book."), said("Dune."), user("Why that one?"),
                answer("Its world-building is rich.")),
        3: one("Translate 'bonjour'.", "Hello.", system="You translate French."),
        4: one("Summarise: the cat sat.", "A cat sat."),  # Alpaca columns: instruction, chosen, rejected
        5: flat(sys_(), user("Describe rain."), said("Water falling from clouds."), user("Now shorter."),
                answer("Falling water.")),  # with history: context
        6: "chosen value is null (an answer without text needs tool calls)",
    }),
    "trl_preference.jsonl": ("smol", {
        1: flat(sys_(), user("Capital of Peru?"), said("Lima."), user("And Chile?"), answer("Santiago.")),
        # implicit prompt: the turns chosen and rejected share are the prompt
        2: flat(sys_(), user("Pick a colour."), said("Green."), user("Another?"), answer("Blue.")),
        3: one("The sky is", " blue."),
        4: 'chosen is a string ("Just an answer.") but there is no prompt',
        5: flat(sys_(), user("Hi!"), said("Hello."), user("Joke?"), answer("Why did the chicken cross the road?")),
        6: one("Is water wet?", "It makes things wet."),  # chosen repeats the prompt (UltraFeedback style)
    }),
    "openai_preference.jsonl": ("smol", {
        1: one("Hello, how are you?", "Well, thank you. And you?"),
        2: flat(sys_("Reply in one word."), user("Sun colour?"), said("Yellow."), user("Grass colour?"),
                answer("Green.")),
        3: 'input is null: OpenAI preference lines need "input": {"messages": [...]}',
    }),
    "axolotl.jsonl": ("smol", {
        1: flat(sys_(), user("Two plus two?"), said("Four."), user("Times three?"), answer("Twelve.")),
        2: one("Largest ocean?", "The Pacific.", system="You are terse."),  # chatml.intel
        3: one("Name a fruit.", "An apple."),  # chatml.argilla
        4: one("Name a metal.", "Iron."),  # chatml.ultra: chosen holds the prompt too
        # a content part with "train": false is context; the rest of the answer is trained (with the space
        # before "It", which the tokenizer folds into its token)
        5: flat(sys_(), user("What is 6 x 7?"), "<|im_start|>assistant\nLet me work it out.", T(" It is 42." + END),
                "\n"),
        # a user part with "train": true is trained, the rest of that turn is not
        6: flat(sys_(), "<|im_start|>user\nRepeat after me:", T(" blue sky" + END), "\n", answer("blue sky")),
        7: 'message 2 content part 1 train is a string ("no"), not true or false',
        8: "message 2 has both train_detail and content parts with a train flag",
    }),
    # Axolotl input_output: no template and no EOS added; the space between two segments goes with the word
    # its token starts
    "axolotl_input_output.jsonl": ("smol", {
        1: ["Q: capital of France?\nA:", T(" Paris." + END)],
        2: [T("hello there!"), " goodbye now", T(" farewell")],
        3: 'segment 1 label is a string ("yes"), not true or false',
        4: "no trained segment (every segment has label false or no text)",
    }),
    "reasoning.jsonl": ("smol", reasoning_expected(CONVENTION)),
    "llamafactory_v1.jsonl": ("tools", {
        1: one("Capital of Kenya?", "Nairobi."),
        2: flat(sys_("Be exact."), user("9 x 9?"), said("80."), user("Check again."), answer("81.")),  # loss_weight 0
        3: one("Is 2 even?", CONVENTION.format("2 / 2 = 1, no remainder.") + "Yes."),  # a reasoning part
        4: flat("<|im_start|>system\nS.\n\nTools:\n" + json.dumps(
                    {"name": "get_weather", "description": "Weather in a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}) + f"\n{END}\n",
                user("Weather in Rome?"),
                answer('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'),
                f"<|im_start|>tool\nsunny, 25 C{END}\n", answer("Sunny and 25 C.")),
        # chosen_messages / rejected_messages: the shared turns are the prompt, whatever their loss_weight
        5: flat(sys_(), user("Name a planet."), said("Mars."), user("Another one."), answer("Venus.")),
        6: "multimodal: message 1 content part 1 is image_url",
        7: "message 2 loss_weight must be 0 or 1 (got 0.5)",
        8: flat(sys_(), "<|im_start|>user\n", T("Echo: ping" + END), "\n", answer("ping")),  # user loss_weight 1
    }),
    "refusals.jsonl": ("smol", {
        1: 'unknown shape (keys: instruction, response): nearest is alpaca (instruction + output), which needs "output"',
        2: "unknown shape (keys: answer, question): none of the accepted shapes' keys is there (messages, "
           "conversations, prompt + completion, prompt + chosen, instruction + output, text)",
        3: 'unknown shape (keys: prompt): nearest is prompt_response (prompt + completion), which needs "completion" '
           '(or "response"): a prompt alone has no answer to learn',
        4: 'unknown shape (keys: rejected): a preference pair with "rejected" needs "chosen"',
        5: 'unknown shape (keys: input, output): nearest is alpaca (instruction + output), which needs "instruction"',
        6: 'message 1 content part 1 (type "text") has no "text" or "value"',
        7: 'message 1 has no "content"',
        8: 'conversations is a string ("human: hi"), not a list of turns',
        9: "label is a number (1), not true or false",
        10: "message 1 content is null, not a string or a list of content parts",
        11: "unknown shape (keys: completions, labels, prompt): TRL stepwise supervision (prompt, completions, labels)",
    }),
}
TOKENIZERS = {"smol": smol_tokenizer, "tools": lambda: tool_tokenizer(smol_tokenizer()),
              "reasoning": lambda: reasoning_tokenizer(smol_tokenizer())}


def _records(path: Path) -> list:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pieces(tok, item: dict) -> list[str]:
    """The example's tokens decoded as alternating runs: untrained text, then ``T(trained text)``, ..."""
    runs: list[str] = []
    cur: list[int] = []
    on = None
    for t, lab in zip(item["input_ids"], item["labels"]):
        trained = lab != -100
        assert not trained or lab == t
        if cur and trained != on:
            runs.append(T(tok.decode(cur)) if on else tok.decode(cur))
            cur = []
        cur.append(t)
        on = trained
    runs.append(T(tok.decode(cur)) if on else tok.decode(cur))
    return runs


def _merged(pieces: list[str]) -> list[str]:
    """Adjacent pieces of the same kind joined, so expectations may be written in any grouping."""
    out: list[str] = []
    for p in pieces:
        if not p:
            continue
        if out and isinstance(out[-1], T) == isinstance(p, T):
            out[-1] = (T if isinstance(p, T) else str)(out[-1] + p)
        else:
            out.append(p)
    return out


def _check(tmp_path: Path, name: str, kind: str, expected: dict[int, list[str] | str]) -> dict:
    tok = TOKENIZERS[kind]()
    path = CORPUS / name
    assert len(_records(path)) == len(expected), "every record of the file has its expectation"
    cfg = make_cfg(tmp_path, heldout_fraction=0.0, system_prompt="S.")
    p = data.prepare([path], tok, cfg, tmp_path / "store", tmp_path / "status")
    rep = p.reports[str(path)]
    unit = rep.unit
    bad = {b[unit]: b["reason"] for b in rep.bad}
    want_bad = {n: r for n, r in expected.items() if isinstance(r, str)}
    assert rep.bad_lines == len(want_bad)
    assert sorted(bad) == sorted(want_bad)
    for n, reason in want_bad.items():
        assert bad[n].startswith(reason), (n, bad[n])
    good = [n for n, w in sorted(expected.items()) if not isinstance(w, str)]
    assert rep.examples == len(p.train) == len(good)
    for i, n in enumerate(good):
        got = _merged(_pieces(tok, p.train[i]))
        want = _merged(expected[n])
        assert [isinstance(x, T) for x in got] == [isinstance(x, T) for x in want], (name, n, got)
        assert got == want, (name, n)
    return rep


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_record_trains_what_its_source_says(tmp_path, name):
    kind, expected = EXPECTED[name]
    _check(tmp_path, name, kind, expected)


def test_reasoning_through_a_template_that_renders_it(tmp_path):
    rep = _check(tmp_path, "reasoning.jsonl", "reasoning", reasoning_expected(TEMPLATE))
    assert rep.reasoning == {"examples": 9, "rendered_as": "by the model's chat template (its reasoning_content "
                                                              "field)"}


def test_the_reasoning_convention_is_recorded_per_file_and_in_the_dry_run_summary(tmp_path):
    rep = _check(tmp_path / "a", "reasoning.jsonl", "smol", reasoning_expected(CONVENTION))
    assert rep.reasoning["examples"] == 9
    assert rep.reasoning["rendered_as"].startswith("as a <think> block before the answer")
    written = json.loads((tmp_path / "a" / "status" / "reports" / "reasoning.jsonl.report.json").read_text())
    assert written["reasoning"] == rep.reasoning
    cfg = make_cfg(tmp_path, heldout_fraction=0.0)
    p = data.prepare([CORPUS / "reasoning.jsonl", CORPUS / "trl_preference.jsonl"], smol_tokenizer(), cfg,
                     tmp_path / "store")
    assert data.summarize(p, 256)["reasoning"] == [
        f"reasoning.jsonl: 9 examples with reasoning, rendered {rep.reasoning['rendered_as']}"]
    assert p.reports[str(CORPUS / "trl_preference.jsonl")].reasoning is None


def test_reasoning_examples_are_not_evaluation_prompts():
    rec = _records(CORPUS / "reasoning.jsonl")[0]
    assert not parse_record(rec, "S.").evaluable  # validation loss only: a generated answer has its own reasoning
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert parse_record(plain, "S.").evaluable


def test_a_template_that_leaves_out_a_trained_turns_reasoning_makes_the_line_bad(tmp_path):
    tok = reasoning_tokenizer(smol_tokenizer())
    # Renders reasoning, but leaves it out of one answer (as templates that branch on a turn's content can).
    tok.chat_template = tok.chat_template.replace("m.reasoning_content %}", "m.reasoning_content and "
                                                  "m.content != 'Fine.' %}")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "How are you?"},
                                          {"role": "assistant", "content": "Fine.", "reasoning_content": "Be polite."}]})
                 + "\n" + json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                                   {"role": "assistant", "content": "Hi.", "reasoning_content": "Greet."}]})
                 + "\n")
    p = data.prepare([f], tok, make_cfg(tmp_path, heldout_fraction=0.0), tmp_path / "store")
    rep = p.reports[str(f)]
    assert rep.bad == [{"line": 1, "reason": "message 3's reasoning is not in the model's chat template's "
                                                "rendering of it (the template leaves it out), so the answer "
                                                "would be trained without it"}]
    assert rep.examples == 1


def test_a_template_that_strips_think_blocks_from_answers_makes_reasoning_lines_bad(tmp_path):
    tok = reasoning_tokenizer(smol_tokenizer())
    # Renders no reasoning field, and keeps only what follows </think> in an answer (DeepSeek-R1's templates
    # do this to earlier turns): the <think> convention would be rendered away.
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
                         "{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1].lstrip() }}"
                         "{% else %}{{ m.content }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    p = data.prepare([CORPUS / "reasoning.jsonl"], tok, make_cfg(tmp_path, heldout_fraction=0.0), tmp_path / "store")
    rep = p.reports[str(CORPUS / "reasoning.jsonl")]
    bad = {b["line"]: b["reason"] for b in rep.bad}
    # Every line with reasoning is refused with the reason; the two without reasoning (the number, which is
    # refused for itself, and the empty think block) are not refused for it.
    assert sorted(bad) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert bad[1] == ("message 3's reasoning is not in the model's chat template's rendering of it (the template "
                      "leaves it out), so the answer would be trained without it")
    assert bad[9].startswith("message 2 reasoning_content is a number")
    assert rep.examples == 1 and rep.reasoning is None


def test_reasoning_a_template_trims_is_still_found_and_trained():
    from ultimate_trainer.data.encoding import encode

    tok = reasoning_tokenizer(smol_tokenizer())  # its template strips the reasoning it renders
    ex = parse_record({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a", "reasoning_content": "  padded  "}]}, "S.")
    ids, labels = encode(tok, ex, 256, "skip")
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]) == "<think>\npadded\n</think>\na" + END
