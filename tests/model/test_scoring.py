"""Matchers, accuracy windows/trend/signals, history rebuild, greedy generation and val loss."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import smol_tokenizer
from ultimate_trainer.core import status
from ultimate_trainer.data.collate import Collator
from ultimate_trainer.model.scoring import (AccuracyTracker, generate_answers, normalize, number_in_words, score,
                                         validation_loss)


# ------------------------------------------------------------------ matchers

@pytest.mark.parametrize("matcher, generated, expected, ok", [
    ("exact", "REF-42-SMITH", "REF-42-SMITH", True),
    ("exact", " REF-42-SMITH\n", "REF-42-SMITH", True),
    ("exact", "ref-42-smith", "REF-42-SMITH", False),
    ("normalized", "ref 42 smith.", "REF-42-SMITH", True),
    ("normalized", "  Paris!  ", "paris", True),
    ("normalized", "Straße", "STRASSE", True),  # Unicode case folding
    ("normalized", "Ｐａｒｉｓ", "paris", True),  # full-width forms (NFKC)
    ("normalized", "Paris, France", "Paris", False),
    ("contains", "The answer is Paris, France.", "paris", True),
    ("contains", "London", "Paris", False),
    ("numeric", "It costs 1,000 dollars", "1000.0", True),
    ("numeric", "about 3.5", "3.50", True),
    ("numeric", "-2", "2", False),
    ("numeric", "no number", "7", False),
    ("numeric", "7 apples", "8", False),
    # no digits: the first number in words counts
    ("numeric", "An octagon has eight sides.", "8", True),
    ("numeric", "A day has twenty-four hours", "24", True),
    ("numeric", "One hundred and five.", "105", True),
    ("numeric", "a thousand and one nights", "1001", True),
    ("numeric", "An octagon has eight sides.", "6", False),
    ("numeric", "Someone often said so", "1", False),  # "one" inside a word is no number
    ("numeric", "It has three sides, not 4", "4", True),  # digits first: words only when none
])
def test_matchers(matcher, generated, expected, ok):
    assert score(matcher, generated, expected) is ok


@pytest.mark.parametrize("generated, ok", [
    ("<think>\nThe capital of France is Paris.\n</think>\n\nParis", True),
    ("<think></think>Paris", True),
    ("<think>\nLyon? No: Paris.\n</think>\n\nLyon", False),  # the reasoning's words do not count
    ("<think>\nThe answer is Paris, because", False),  # still thinking: no answer yet
    ("Paris <think>x</think>", True),  # only a leading block is reasoning; "contains" finds the answer
])
def test_a_reasoning_models_answer_is_judged_after_its_think_block(generated, ok):
    assert score("contains", generated, "Paris") is ok


def test_unknown_matcher_is_an_error():
    with pytest.raises(ValueError, match="unknown matcher"):
        score("fuzzy", "a", "a")


def test_normalize_collapses_whitespace_and_punctuation():
    assert normalize("  Hello,\tWORLD!!  ") == "hello world"


# ------------------------------------------------------------------ tracker

def test_tracker_empty_snapshot():
    s = AccuracyTracker().snapshot()
    assert s == {"overall": None, "last_20": None, "last_50": None, "trend": None, "evaluations": 0,
                 "answers": 0, "signals": {"last_20": None, "last_50": None}}


def test_windows_count_the_newest_answers():
    t = AccuracyTracker()
    t.add_evaluation([False] * 60)
    t.add_evaluation([True] * 40)
    s = t.snapshot()
    assert s["overall"] == 40.0
    assert s["last_20"] == 100.0
    assert s["last_50"] == 80.0
    assert s["answers"] == 100 and s["evaluations"] == 2


def test_trend_needs_twenty_answers():
    t = AccuracyTracker()
    t.add_evaluation([True] * 19)
    assert t.trend is None and t.signals == {"last_20": None, "last_50": None}
    t.add(True)
    assert t.trend == "stable"


def test_trend_improving_regressing_stable_with_margins():
    t = AccuracyTracker(margin_trend=3.0)
    t.add_evaluation([False] * 50 + [True] * 50)  # overall 50, last_50 100
    assert t.trend == "improving"
    t = AccuracyTracker(margin_trend=3.0)
    t.add_evaluation([True] * 50 + [False] * 50)
    assert t.trend == "regressing"
    # last_50 = 52, overall = 50: inside a 3-point margin, outside a 1-point one
    answers = [True] * 24 + [False] * 26 + [True] * 26 + [False] * 24
    t3, t1 = AccuracyTracker(margin_trend=3.0), AccuracyTracker(margin_trend=1.0)
    t3.add_evaluation(answers)
    t1.add_evaluation(answers)
    assert (t3.last_50, t3.overall) == (52.0, 50.0)
    assert t3.trend == "stable" and t1.trend == "improving"


def test_signals_use_their_own_margins():
    # 100 answers: 50 right; last_50 has 27 right (54%), last_20 has 12 right (60%)
    answers = [True] * 23 + [False] * 27 + [False] * 15 + [True] * 15 + [False] * 8 + [True] * 12
    t = AccuracyTracker(margin_last_20=5.0, margin_last_50=3.0)
    t.add_evaluation(answers)
    assert (t.overall, t.last_50, t.last_20) == (50.0, 54.0, 60.0)
    assert t.signals == {"last_20": "above", "last_50": "above"}
    t = AccuracyTracker(margin_last_20=15.0, margin_last_50=5.0)
    t.add_evaluation(answers)
    assert t.signals == {"last_20": "level", "last_50": "level"}
    t = AccuracyTracker()
    t.add_evaluation([True] * 80 + [False] * 20)
    assert t.signals == {"last_20": "below", "last_50": "below"}


def test_from_history_rebuilds_and_skips_torn_last_line(tmp_path):
    ex_path = tmp_path / "history" / "examples.jsonl"
    ev_path = tmp_path / "history" / "evals.jsonl"
    answers = [i % 3 == 0 for i in range(70)]
    for i, ok in enumerate(answers):
        status.append_jsonl(ex_path, {"time": "t", "global_step": i, "prompt": "p", "expected": "e",
                                      "generated": "g", "correct": ok, "matcher": "normalized", "source": "f:1"})
    for i in range(4):
        status.append_jsonl(ev_path, {"global_step": i})
    with open(ex_path, "ab") as f:  # a trainer killed mid-append
        f.write(json.dumps({"correct": True})[:10].encode())
    expected = AccuracyTracker()
    expected.add_evaluation(answers)
    t = AccuracyTracker.from_history(ex_path, ev_path)
    assert t.answers == 70 and t.evaluations == 4
    assert t.snapshot() | {"evaluations": 0} == expected.snapshot() | {"evaluations": 0}


def test_from_history_missing_files_is_empty(tmp_path):
    t = AccuracyTracker.from_history(tmp_path / "none.jsonl", tmp_path / "none2.jsonl")
    assert t.answers == 0 and t.evaluations == 0


# ------------------------------------------------------------------ generation and val loss on a tiny model

@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smol_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).train()


PROMPTS = [
    [{"role": "user", "content": "Make the booking reference for Alice Smith, seat 42."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "A longer question, so that the batch needs left padding to line up."}],
]


def _greedy_one(model, tok, messages, n):
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    return tok.decode(ids[0, start:], skip_special_tokens=True).strip()


def test_generate_answers_is_greedy_batched_and_restores_state(tiny_model):
    tok = smol_tokenizer()
    side = tok.padding_side
    answers = generate_answers(tiny_model, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    assert answers == [_greedy_one(tiny_model.eval(), tok, p, 6) for p in PROMPTS]
    assert all(answers), "a random model emits some tokens; empty answers would make this test vacuous"
    tiny_model.train()
    assert generate_answers(tiny_model, tok, PROMPTS, max_new_tokens=6, batch_size=3) == answers
    assert tiny_model.training is True and tok.padding_side == side
    assert generate_answers(tiny_model, tok, [], 6, 2) == []


def test_generate_answers_ignores_the_models_sampling_config_quietly(tiny_model, capfd):
    from transformers import GenerationConfig

    tok = smol_tokenizer()
    own = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, max_length=30, max_new_tokens=3,
                           eos_token_id=tok.eos_token_id)
    saved, tiny_model.generation_config = tiny_model.generation_config, own
    try:
        capfd.readouterr()
        answers = generate_answers(tiny_model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
        err = capfd.readouterr().err
        assert answers == [_greedy_one(tiny_model, tok, p, 6) for p in PROMPTS]  # greedy, our bound
        assert "generation flags" not in err and "seem to have been set" not in err, err
        assert tiny_model.generation_config is own
    finally:
        tiny_model.generation_config = saved
        tiny_model.train()


def test_generate_answers_with_a_tokenizer_without_pad_token(tiny_model):
    import copy

    tok = copy.deepcopy(smol_tokenizer())
    tok.pad_token = None
    assert tok.pad_token_id is None
    answers = generate_answers(tiny_model, tok, PROMPTS, max_new_tokens=4, batch_size=3)
    assert answers == generate_answers(tiny_model, smol_tokenizer(), PROMPTS, max_new_tokens=4, batch_size=3)
    assert tok.pad_token is None


def test_generate_answers_with_a_peft_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    tok = smol_tokenizer()
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    try:
        # LoRA B starts at zero: the adapted model must answer exactly like the base.
        got = generate_answers(peft_model, tok, PROMPTS[:2], max_new_tokens=4, batch_size=2)
        with peft_model.disable_adapter():
            base = generate_answers(peft_model, tok, PROMPTS[:2], max_new_tokens=4, batch_size=2)
        assert got == base and len(got) == 2
    finally:
        peft_model.unload()


def test_validation_loss_is_token_weighted_mean(tiny_model):
    tok = smol_tokenizer()
    encoded = [([1, 5, 9, 14, 20], [-100, -100, 9, 14, 20]), ([1, 7, 3], [-100, -100, 3]),
               ([4, 4, 4, 4], [-100, 4, 4, 4])]
    got = validation_loss(tiny_model, encoded, batch_size=2, collator=Collator(tok))
    with torch.no_grad():
        per = [(float(tiny_model(input_ids=torch.tensor([i]), labels=torch.tensor([lab])).loss),
                sum(x != -100 for x in lab[1:])) for i, lab in encoded]
    expected = sum(l * n for l, n in per) / sum(n for _, n in per)
    assert got == pytest.approx(expected, rel=1e-4)
    assert tiny_model.training is True
    assert validation_loss(tiny_model, [], 2, Collator(tok)) is None


def test_validation_loss_packed_equals_padded(tiny_model):
    tok = smol_tokenizer()
    encoded = [([1, 5, 9, 14, 20], [-100, -100, 9, 14, 20]), ([1, 7, 3], [-100, -100, 3]),
               ([4, 4, 4, 4], [-100, 4, 4, 4]), ([8, 2, 6, 6, 2, 9], [-100, -100, -100, 6, 2, 9])]
    padded = validation_loss(tiny_model, encoded, batch_size=2, collator=Collator(tok))
    packed = validation_loss(tiny_model, encoded, batch_size=2, collator=Collator(tok), max_tokens=10)
    assert packed == pytest.approx(padded, rel=1e-4)


def test_validation_loss_on_segmented_attention_is_one_padding_free_row_a_pass(tiny_model):
    """As padding-free training runs: batch_size examples in one row, their boundaries as ``cu_seq_lens``."""
    import copy

    from ultimate_trainer.model.attention import SEGMENTED, use_segmented

    tok = smol_tokenizer()
    encoded = [([1, 5, 9, 14, 20], [-100, -100, 9, 14, 20]), ([1, 7, 3], [-100, -100, 3]),
               ([4, 4, 4, 4], [-100, 4, 4, 4]), ([8, 2, 6, 6, 2, 9], [-100, -100, -100, 6, 2, 9])]
    padded = validation_loss(tiny_model, encoded, batch_size=2, collator=Collator(tok))
    model = copy.deepcopy(tiny_model)
    use_segmented(model)
    assert model.config._attn_implementation == SEGMENTED
    passes = []
    hook = model.model.register_forward_pre_hook(lambda mod, args, kw: passes.append(
        (kw["input_ids"].shape, kw.get("cu_seq_lens_q") is not None, kw.get("attention_mask"))), with_kwargs=True)
    try:
        packed = validation_loss(model, encoded, batch_size=2, collator=Collator(tok), max_tokens=10)
    finally:
        hook.remove()
    assert packed == pytest.approx(padded, rel=1e-4)
    # batch_size (2) examples a row, one row a pass: 2 passes of 2 examples, no padding
    assert [shape for shape, _, _ in passes] == [(1, 5 + 3), (1, 4 + 6)] and all(b for _, b, _ in passes)
    assert all(mask is None or mask.dim() == 2 for _, _, mask in passes)  # no 4D block mask built


def test_generation_uses_the_kv_cache_under_gradient_checkpointing_and_stops_at_end_of_turn(tiny_model):
    from ultimate_trainer.model.scoring import stop_token_ids

    tok = smol_tokenizer()
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)
    tiny_model.config.use_cache = False  # as loading.load_base_model leaves it for training
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    widths = []
    hook = tiny_model.model.register_forward_pre_hook(
        lambda mod, args, kw: widths.append(kw["input_ids"].shape[1] if kw.get("input_ids") is not None
                                            else kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        generate_answers(tiny_model, tok, PROMPTS[:1], max_new_tokens=5, batch_size=1)
    finally:
        hook.remove()
        tiny_model.gradient_checkpointing_disable()
    assert len(widths) >= 2 and set(widths[1:]) == {1}  # after the prompt, one new token per forward


def test_an_evaluation_on_a_4bit_cpu_model_leaves_it_trainable(tiny_model_dir):
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    from ultimate_trainer.core import config
    from ultimate_trainer.model.loading import attach_lora, inference_kernels, load_base_model

    cfg = config.from_dict({"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                            "training": {"device": "cpu", "gradient_checkpointing": False}})
    model = attach_lora(cfg, load_base_model(cfg, str(tiny_model_dir), quantize=True, device="cpu"))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    tok = smol_tokenizer()
    packed_inside = []
    with inference_kernels(model):
        generate_answers(model, tok, PROMPTS[:2], max_new_tokens=3, batch_size=2)
        packed_inside = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers]
    if has_avx512bf16():
        assert any(packed_inside)  # the fast kernel was used for the evaluation
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    model.train()
    ids = torch.tensor([[1, 5, 9, 14, 20, 3]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_score_examples_counts_each_file_apart(tiny_model):
    """The consolidation gate's held-out score: overall, and per file (so a lost task shows)."""
    from ultimate_trainer.data.formats import Example
    from ultimate_trainer.trainer.probe.scoring import score_examples

    tok = smol_tokenizer()
    said = generate_answers(tiny_model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    assert all(said)

    def example(prompt, answer, source):
        return Example(messages=[*prompt, {"role": "assistant", "content": answer}], fmt="chat", source=source)

    examples = [example(PROMPTS[0], said[0], "a.jsonl:1"), example(PROMPTS[2], "not what it says", "b.jsonl:1"),
                example(PROMPTS[1], said[1], "a.jsonl:2")]
    got = score_examples(tiny_model, tok, examples, "exact", 6, 3)
    assert got["by_file"] == {"a.jsonl": [2, 2], "b.jsonl": [0, 1]}
    assert (got["correct"], got["total"], got["accuracy"]) == (2, 3, 66.67)


@pytest.mark.parametrize("text, value", [
    ("twenty-four", 24), ("Seventy Five", 75), ("five hundred twelve", 512), ("fifteen hundred", 1500),
    ("one thousand two hundred and six", 1206), ("two million", 2_000_000), ("zero", 0),
    ("three two one", 3), ("twenty zero", 20), ("a hundred", 100), ("no number here", None),
    # "one" as a pronoun is not the number 1; the number after it is read
    ("No one knows; it has seven sides", 7), ("the one with three", 3), ("one who counts to five", 5),
    ("one's own answer", None), ("Each one of them", None), ("one hundred", 100), ("It has one side", 1),
    ("Only one of them is prime", 1),
])
def test_number_in_words_reads_the_first_number(text, value):
    assert number_in_words(text) == (None if value is None else float(value))
