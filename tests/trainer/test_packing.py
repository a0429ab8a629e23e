"""Packing and length grouping (ultimate_trainer.data.packing), and the chunked loss (model.loss).

Isolation is checked against the model itself: each example's logits and loss inside a packed row
must equal those of the example run alone (fp32, within 1e-4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import chat
from ultimate_trainer.data.encoding import IGNORE_INDEX
from ultimate_trainer.data.collate import (Collator, PackedCollator, PackedRows, block_causal_mask, marked_only,
                                          packed_inputs)
from ultimate_trainer.data.packing import flat_rows, group_by_length, layout, pack_rows

TOL = 1e-4


def _encode(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """``n`` chat examples of varied lengths through the project's own encoding (assistant-only labels)."""
    from ultimate_trainer.data.encoding import encode_batch
    from ultimate_trainer.data.formats import parse_line
    import json

    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta river stone cloud paper light orbit maple copper".split()
    examples = []
    for i in range(n):
        q = " ".join(rng.choice(words, rng.integers(3, 30)))
        a = " ".join(rng.choice(words, rng.integers(2, 40)))
        ex = parse_line(json.dumps(chat(q, a)).encode(), "You are a helpful assistant.", 10**6)
        examples.append(ex)
    out = []
    for ids, labels in encode_batch(tokenizer, examples, 1024, "skip"):
        out.append({"input_ids": ids, "labels": labels})
    return out


class _ListStore:
    def __init__(self, items: list[dict]):
        self.items = items

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at each position predicting the next token (0 where the next label is -100)."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX,
                                             reduction="none")


def _check_isolation(model, tokenizer, examples: list[dict]) -> None:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = pack_rows(list(range(len(examples))), np.array([len(e["input_ids"]) for e in examples]), 256, seed=0)
    assert any(len(r) > 1 for r in rows), "the test data must actually pack"
    assert sorted(i for r in rows for i in r) == list(range(len(examples)))
    batch = PackedCollator(pad)([PackedRows(_ListStore(examples), rows)[r] for r in range(len(rows))])
    impl = model.config._attn_implementation
    with torch.no_grad():
        packed = model(**packed_inputs(batch, impl)).logits
        for b, row in enumerate(rows):
            start = 0
            for i in row:
                ex = examples[i]
                k = len(ex["input_ids"])
                alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
                inside = packed[b, start:start + k]
                assert torch.allclose(inside, alone, atol=TOL, rtol=0), \
                    f"example {i}: logits differ by {(inside - alone).abs().max():.2e}"
                labels = torch.tensor(ex["labels"])
                packed_labels = batch["labels"][b, start:start + k]
                # the loss mask is the example's own (assistant tokens only) apart from its first token
                assert torch.equal(packed_labels[1:], labels[1:]) and packed_labels[0] == IGNORE_INDEX
                lone_loss = _per_token_losses(alone, labels)
                packed_loss = _per_token_losses(inside, packed_labels)
                assert torch.allclose(lone_loss, packed_loss, atol=TOL, rtol=0)
                start += k


# ----------------------------------------------------------------------------------- pure functions

def test_pack_rows_fills_rows_within_capacity_and_is_deterministic():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 200, size=500)
    order = rng.permutation(500).tolist() + rng.permutation(500).tolist()  # two epochs
    rows = pack_rows(order, lengths, 256, seed=7)
    assert rows == pack_rows(order, lengths, 256, seed=7)
    assert sorted(i for r in rows for i in r) == sorted(order)  # every planned position exactly once
    assert all(sum(int(lengths[i]) for i in r) <= 256 for r in rows)
    used = sum(int(lengths[i]) for i in order)
    assert used / (len(rows) * 256) > 0.9  # best fit leaves little room


def test_pack_rows_gives_an_overlong_example_its_own_row():
    rows = pack_rows([0, 1, 2], np.array([300, 10, 10]), 256, seed=0)
    assert [0] in rows and sorted(i for r in rows for i in r) == [0, 1, 2]


def test_group_by_length_batches_similar_lengths_and_keeps_the_examples():
    rng = np.random.default_rng(2)
    lengths = rng.integers(5, 1000, size=4096)
    order = rng.permutation(4096).tolist()
    grouped = group_by_length(order, lengths, 8, seed=0)
    assert sorted(grouped) == sorted(order)
    assert grouped == group_by_length(order, lengths, 8, seed=0)

    def padding(o: list[int]) -> int:
        return sum(8 * max(lengths[o[k:k + 8]]) - sum(lengths[o[k:k + 8]]) for k in range(0, len(o), 8))

    assert padding(grouped) < padding(order) / 5
    # windows keep the plan's coarse order: the first window holds only the plan's first examples
    window = 8 * 64
    assert set(grouped[:window]) == set(order[:window])


def test_layout_is_padding_free_unless_told_otherwise():
    assert layout("auto") == layout("on") == "flat"
    assert layout("off") == "grouped" and layout("rows") == "rows"


def test_flat_rows_are_the_plans_micro_batches_in_order():
    order = [7, 3, 9, 1, 0, 4, 2]
    assert flat_rows(order, 3) == [[7, 3, 9], [1, 0, 4], [2]]


def test_boundaries_of_a_padding_free_row():
    from ultimate_trainer.data.collate import boundaries

    edges, longest = boundaries(torch.tensor([[1, 1, 2, 2, 2, 3]]))
    assert edges.tolist() == [0, 2, 5, 6] and edges.dtype == torch.int32 and longest == 3


def test_block_causal_mask_is_causal_within_segments_only():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = block_causal_mask(seg)[0, 0]
    assert m[1, 0] and not m[0, 1]  # causal inside example 1
    assert not m[2, 1] and m[4, 2]  # example 2 never sees example 1
    assert not m[5, 4] and m[5, 5]  # padding sees only padding (never an empty row)


def test_packed_collator_restarts_positions_and_counts_real_tokens():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, -100, 9], "seq_lens": [2, 3]},
            {"input_ids": [1, 2], "labels": [-100, 2], "seq_lens": [2]}]
    b = PackedCollator(0)(rows)
    assert b["position_ids"][0].tolist() == [0, 1, 0, 1, 2]
    assert b["segment_ids"].tolist() == [[1, 1, 2, 2, 2], [1, 1, 0, 0, 0]]
    assert int(b["attention_mask"].sum()) == 7 and b["labels"][1, 2:].eq(-100).all()


# ----------------------------------------------------------------------------------- on a model

@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval(), tok


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_examples_are_isolated_on_a_tiny_model(tiny, impl: str):
    model, tok = tiny
    model.set_attn_implementation(impl)
    try:
        _check_isolation(model, tok, _encode(tok, 12))
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.e2e
def test_packed_examples_are_isolated_on_the_builtin_model(builtin_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_model_dir)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32).eval()
    _check_isolation(model, tok, _encode(tok, 8, seed=3))
    from ultimate_trainer.model import attention

    attention.register()
    model.set_attn_implementation(attention.SEGMENTED)
    model.train()  # the padding-free path is a training path: gradients too
    _padded_vs_flat(model, tok, _encode(tok, 4, seed=9), attention.SEGMENTED)


def _padded_vs_flat(model, tok, examples: list[dict], impl: str) -> None:
    """One micro-batch padded (the Trainer's usual batch) and as one padding-free row: same loss, same grads."""
    from ultimate_trainer.model import attention
    from ultimate_trainer.model.loss import chunked_causal_lm_loss

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    padded = Collator(pad_token_id=pad)(examples)
    flat = PackedCollator(pad)([PackedRows(_ListStore(examples), [list(range(len(examples)))])[0]])
    assert flat["input_ids"].shape[0] == 1 and flat["attention_mask"].all()  # one row, no padding at all
    n_items = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    # A row's examples each start with an untrained label, like the padded batch's rows: the same targets.
    assert int((flat["labels"][:, 1:] != IGNORE_INDEX).sum()) == n_items
    model.zero_grad()
    want = model(**padded, num_items_in_batch=n_items).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    inputs = packed_inputs(flat, impl, takes_boundaries=attention.takes_boundaries(impl))
    assert ("cu_seq_lens_q" in inputs) == (impl == attention.SEGMENTED)
    assert inputs["attention_mask"].dim() == (2 if impl == attention.SEGMENTED else 4)  # no L x L mask built
    got = chunked_causal_lm_loss(model, inputs, num_items_in_batch=n_items)
    got.backward()
    assert torch.allclose(got, want, atol=1e-5), (float(got), float(want))
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("impl", ["segmented_sdpa", "sdpa", "eager"])
def test_a_padding_free_row_trains_exactly_like_the_padded_batch(tiny_model_dir: Path, impl: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model import attention

    attention.register()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.set_attn_implementation(impl)
    _padded_vs_flat(model, tok, _encode(tok, 6, seed=8), impl)


def test_qwen2_padding_free_row_isolates_each_example_and_trains_like_the_padded_batch(qwen2_model_dir: Path):
    """Qwen2.5's architecture (q/k/v biases, 7:1 grouped-query heads, rope theta 1e6, untied 152k output
    layer): each example's logits inside a padding-free row equal the example alone, and the row's loss
    and gradients equal the padded batch's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model import attention

    tok = AutoTokenizer.from_pretrained(qwen2_model_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen2_model_dir, dtype=torch.float32).eval()
    assert model.config.model_type == "qwen2" and model.lm_head.weight.shape[0] == 152064
    attention.use_segmented(model)  # what load_base_model does
    assert model.config._attn_implementation == attention.SEGMENTED
    examples = _encode(tok, 5, seed=11)
    row = PackedCollator(tok.pad_token_id)([PackedRows(_ListStore(examples), [list(range(len(examples)))])[0]])
    with torch.no_grad():
        inside = model(**packed_inputs(row, attention.SEGMENTED, takes_boundaries=True)).logits[0]
        start = 0
        for ex in examples:
            k = len(ex["input_ids"])
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            assert torch.allclose(inside[start:start + k], alone, atol=TOL, rtol=0), \
                (inside[start:start + k] - alone).abs().max()
            start += k
    model.train()
    _padded_vs_flat(model, tok, examples[:4], attention.SEGMENTED)


def test_segmented_attention_isolates_examples_and_keeps_a_sliding_window():
    """Each example's logits inside a padding-free row equal the example alone, window included."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from ultimate_trainer.model import attention

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                      max_window_layers=0, layer_types=["sliding_attention"] * 2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    attention.use_segmented(model)
    assert model.config._attn_implementation == attention.SEGMENTED
    seqs = [torch.randint(0, 64, (n,)) for n in (3, 11, 6)]
    row = {"input_ids": torch.cat(seqs)[None], "labels": torch.cat(seqs)[None],
           "attention_mask": torch.ones(1, 20, dtype=torch.long),
           "position_ids": torch.cat([torch.arange(len(x)) for x in seqs])[None],
           "segment_ids": torch.cat([torch.full((len(x),), k + 1) for k, x in enumerate(seqs)])[None]}
    with torch.no_grad():
        inside = model(**packed_inputs(row, attention.SEGMENTED, takes_boundaries=True)).logits[0]
        start = 0
        for x in seqs:
            alone = model(input_ids=x[None]).logits[0]
            assert torch.allclose(inside[start:start + len(x)], alone, atol=TOL), (inside[start:] - alone).abs().max()
            start += len(x)
        # and without boundaries it is plain SDPA: generation with a left-padded batch still works
        out = model.generate(input_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]), attention_mask=torch.tensor(
            [[0, 1, 1], [1, 1, 1]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 5)


def test_chunked_loss_and_gradients_equal_the_models_own(arch_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model.loss import chunked_causal_lm_loss, supports_chunked_loss

    tok = AutoTokenizer.from_pretrained(arch_model_dir)
    model = AutoModelForCausalLM.from_pretrained(arch_model_dir, dtype=torch.float32)
    assert supports_chunked_loss(model)
    batch = Collator(tok)(_encode(tok, 6, seed=4))
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    for n_items in (None, targets + 5):  # the Trainer's num_items_in_batch (accumulation) and the plain mean
        model.zero_grad()
        plain = model(**batch, num_items_in_batch=n_items).loss
        plain.backward()
        plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        chunked = chunked_causal_lm_loss(model, batch, num_items_in_batch=n_items, chunk_tokens=7)
        chunked.backward()
        assert torch.allclose(chunked, plain, atol=1e-5), (float(chunked), float(plain))
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, plain_grads[n], atol=1e-5, rtol=1e-4), n


def test_weighted_loss_weighs_each_target_token_on_both_paths(tiny_model_dir: Path):
    """The retention-aware controller's rehearsal weight (trainer/control_rule.py): each target token's
    cross-entropy times its example's weight, on the chunked path and on the model's own forward (the path
    DDP takes), for padded batches and a padding-free row; weights of 1 give the unweighted loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model.loss import chunked_causal_lm_loss, weighted_causal_lm_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = _encode(tok, 5, seed=11)
    marked = [{**ex, "rehearsal": [int(i >= 3)] * len(ex["input_ids"])} for i, ex in enumerate(examples)]
    batch = Collator(tok)(marked)
    mask = batch.pop("rehearsal_mask")
    assert mask[3:].any(dim=1).all() and not mask[:3].any()  # examples 3 and 4 marked, on their tokens only
    assert (mask.bool() <= batch["attention_mask"].bool()).all()
    n_items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        logits = model(**batch).logits
        plain = float(model(**batch, num_items_in_batch=n_items).loss)
    ce = torch.stack([_per_token_losses(logits[i], batch["labels"][i]) for i in range(len(examples))])
    rehearsal_w, other_w = 2.5, 0.6
    weights = torch.where(mask.bool(), rehearsal_w, other_w)
    want = float((ce * weights[:, 1:]).sum() / n_items)
    grads = {}
    for chunked in (True, False):
        model.zero_grad()
        got, unweighted = weighted_causal_lm_loss(model, batch, weights, n_items, chunked, chunk_tokens=5)
        got.backward()
        assert float(got.detach()) == pytest.approx(want, rel=1e-5), chunked
        assert float(unweighted) == pytest.approx(plain, rel=1e-5) and not unweighted.requires_grad  # what the guard sees
        grads[chunked] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[True]:
        assert torch.allclose(grads[True][n], grads[False][n], atol=1e-5, rtol=1e-4), n
    ones = torch.ones_like(weights)
    with torch.no_grad():
        assert float(weighted_causal_lm_loss(model, batch, ones, n_items)[0]) == pytest.approx(plain, rel=1e-6)
        assert float(chunked_causal_lm_loss(model, batch, n_items, token_weights=ones)) == pytest.approx(plain, rel=1e-5)
    # A padding-free row marks the same tokens: the same weighted loss.
    flat = PackedCollator(tok.pad_token_id)([PackedRows(_ListStore(examples), [list(range(5))], rehearsal_from=3)[0]])
    fmask = flat.pop("rehearsal_mask")
    assert int(fmask.sum()) == int(mask.sum())
    with torch.no_grad():
        got = chunked_causal_lm_loss(model, packed_inputs(flat, "sdpa"), n_items,
                                     token_weights=torch.where(fmask.bool(), rehearsal_w, other_w))
    assert float(got) == pytest.approx(want, rel=1e-4)


def test_rehearsal_marks_follow_the_store_index():
    from ultimate_trainer.data.collate import Ordered

    store = _ListStore([{"input_ids": [i] * (i + 1), "labels": [i] * (i + 1)} for i in range(6)])
    items = Ordered(store, [5, 0, 4, 1], rehearsal_from=4)
    assert len(items) == 4 and [items[k]["rehearsal"] for k in range(4)] == [[1] * 6, [0], [1] * 5, [0] * 2]
    row = PackedRows(store, [[3, 4]], rehearsal_from=4)[0]
    assert row["rehearsal"] == [0] * 4 + [1] * 5 and len(row["rehearsal"]) == len(row["input_ids"])
    assert "rehearsal" not in PackedRows(store, [[3, 4]])[0]  # no controller share to apply: no marks
    assert "rehearsal_mask" not in Collator(pad_token_id=0)([store[1], store[2]])


# ----------------------------------------------------------------------------------- through train.py

def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


@pytest.mark.parametrize("packing", ["on", "off", "rows"])
def test_interrupted_run_resumes_exactly_like_an_uninterrupted_one(tiny_model_dir, make_project, tmp_path, packing):
    """Two steps, a stop, the rest == the whole run at once: same rows, same order, same weights."""
    from tests.conftest import run_train, write_jsonl
    from ultimate_trainer.core import checkpoints as ck

    rng = np.random.default_rng(5)
    words = "alpha beta gamma delta river stone cloud paper".split()
    recs = [chat(" ".join(rng.choice(words, rng.integers(2, 40))), " ".join(rng.choice(words, rng.integers(1, 30))))
            for _ in range(60)]
    data = write_jsonl(tmp_path / "mixed.jsonl", recs)
    finals = []
    for name, stops in (("whole", []), ("resumed", [["--max-steps", "2"]])):
        cfg = make_project(tiny_model_dir, root=tmp_path / name, eval_steps=0, training__packing=packing,
                           data__heldout_fraction=0.0)
        for extra in stops:
            r = run_train(cfg, data, extra=extra)
            assert r.returncode == 0, r.stderr
            assert not ck.newest_complete(cfg.parent / "checkpoints").meta["run_complete"]
        r = run_train(cfg, data)
        assert r.returncode == 0, r.stderr
        assert ("padding-free micro-batches" in r.stderr) == (packing == "on")
        assert ("packed rows" in r.stderr) == (packing == "rows")
        finals.append(ck.newest_complete(cfg.parent / "checkpoints"))
    whole, resumed = finals
    assert resumed.global_step == whole.global_step == whole.meta["run_total_steps"]
    per_step = whole.meta["examples_per_step"]
    if packing == "rows":
        assert whole.meta["run_total_steps"] < 60 / per_step  # rows, several examples a row
    else:  # padding-free trains the same steps of the same number of examples as padded batches
        assert whole.meta["run_total_steps"] == -(-60 // per_step)
    a, b = _adapter(whole.path), _adapter(resumed.path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_distilled_rehearsal_loss_is_the_kl_from_the_base_on_both_paths(tiny_model_dir: Path):
    """``training.rehearsal_loss`` distill: a rehearsal target's loss is KL(base || model) over the whole
    vocabulary, the base being the model with its adapter off; the others keep their cross-entropy. A fresh
    adapter (LoRA B = 0) is the base itself, so its rehearsal targets cost nothing and give no gradient;
    a trained one gives the KL computed by hand, the same on the chunked path, the model's own forward
    (DDP's) and a padding-free row, with the controller's weights on top."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model.loss import chunked_causal_lm_loss, has_teacher, weighted_causal_lm_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not has_teacher(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert has_teacher(model)
    examples = _encode(tok, 5, seed=12)
    marked = [{**ex, "rehearsal": [int(i >= 3)] * len(ex["input_ids"])} for i, ex in enumerate(examples)]
    batch = Collator(tok)(marked)
    mask = batch.pop("rehearsal_mask")
    labels = batch["labels"]
    n_items = int((labels[:, 1:] != IGNORE_INDEX).sum())
    task_only = labels.clone()
    task_only[mask.bool()] = IGNORE_INDEX

    # A fresh adapter: the rehearsal targets add nothing to the loss nor to the gradient.
    model.zero_grad()
    got, plain = weighted_causal_lm_loss(model, batch, None, n_items, chunked=True, chunk_tokens=5, distill_mask=mask)
    got.backward()
    fresh = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = chunked_causal_lm_loss(model, {**batch, "labels": task_only}, n_items)
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    for n, g in fresh.items():
        assert torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-6), n
    with torch.no_grad():
        assert float(plain) == pytest.approx(float(model(**batch, num_items_in_batch=n_items).loss), rel=1e-5)

    # A trained adapter: the KL by hand.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        student = model(**batch).logits[:, :-1].float()
        with model.disable_adapter():
            base_logits = model(**batch).logits[:, :-1].float()
    targets, distill = labels[:, 1:], mask[:, 1:].bool()
    ce = torch.nn.functional.cross_entropy(student.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                           reduction="none")
    p_base = base_logits.log_softmax(-1)
    kl = (p_base.exp() * (p_base - student.log_softmax(-1))).sum(-1)
    keep = targets != IGNORE_INDEX
    assert (kl[keep & distill] > 1e-4).all()
    weights = torch.where(mask.bool(), 2.0, 0.5)
    per = torch.where(distill, kl, ce) * weights[:, 1:]
    want = float(per[keep].sum() / n_items)
    alone = marked_only(batch, mask)  # the teacher's pass on the rehearsal lines alone: rows 3 and 4, trimmed
    assert alone["input_ids"].shape == (2, int(batch["attention_mask"][3:].sum(dim=1).max()))
    assert marked_only(batch, torch.zeros_like(mask)) is None
    grads = {}
    for chunked, teacher_inputs in ((True, None), (False, None), (True, alone), (False, alone)):
        model.zero_grad()
        got, _ = weighted_causal_lm_loss(model, batch, weights, n_items, chunked, chunk_tokens=5, distill_mask=mask,
                                         teacher_inputs=teacher_inputs)
        got.backward()
        assert float(got) == pytest.approx(want, rel=1e-4), chunked
        grads[chunked, teacher_inputs is None] = {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}
    first = grads[True, True]
    assert all(".lora_" in n for n in first)  # the base stays frozen: the teacher pass leaves it alone
    for other in grads.values():
        for n in first:
            assert torch.allclose(first[n], other[n], atol=1e-5, rtol=1e-4), n
    # A padding-free row, the same tokens marked: the same loss, with the teacher on the whole row and on the
    # rehearsal lines alone (one row of their tokens, each its own segment).
    flat = PackedCollator(tok.pad_token_id)([PackedRows(_ListStore(examples), [[3, 0, 4, 1, 2]], rehearsal_from=3)[0]])
    fmask = flat.pop("rehearsal_mask")
    alone = marked_only(flat, fmask)
    assert alone["segment_ids"].tolist() == [[1] * len(examples[3]["input_ids"]) + [2] * len(examples[4]["input_ids"])]
    assert alone["input_ids"].tolist() == [examples[3]["input_ids"] + examples[4]["input_ids"]]
    for teacher_inputs in (None, packed_inputs(alone, "sdpa")):
        with torch.no_grad():
            got, _ = weighted_causal_lm_loss(model, packed_inputs(flat, "sdpa"), torch.where(fmask.bool(), 2.0, 0.5),
                                             n_items, chunked=True, distill_mask=fmask, teacher_inputs=teacher_inputs)
        assert float(got) == pytest.approx(want, rel=1e-4)


def test_marked_only_keeps_each_marked_example_whole_and_apart_across_packed_rows():
    """Two packed rows, a rehearsal line in each and one ending row 0 beside one opening row 1: one row of
    their tokens, each its own segment (a row's last example and the next row's first never merge)."""
    store = _ListStore([{"input_ids": [10 + i] * (i + 2), "labels": [-100] + [10 + i] * (i + 1)} for i in range(4)])
    rows = PackedRows(store, [[0, 2], [3, 1]], rehearsal_from=2)
    batch = PackedCollator(0)([rows[0], rows[1]])
    mask = batch.pop("rehearsal_mask")
    alone = marked_only(batch, mask)
    assert alone["input_ids"].tolist() == [[12] * 4 + [13] * 5]
    assert alone["segment_ids"].tolist() == [[1] * 4 + [2] * 5]
    assert alone["position_ids"].tolist() == [list(range(4)) + list(range(5))]
    assert alone["labels"].tolist() == [[-100] + [12] * 3 + [-100] + [13] * 4]
    assert alone["attention_mask"].tolist() == [[1] * 9]
