"""Tiny byte-level BPE tokenizers (trained here in a second) with ChatML, and tiny models that use them.

A GGUF's reader parses every token and merge in Python; with the built-in model's 49,152 tokens that
takes a minute per load on this machine, so the round-trip tests use a 400-token vocabulary of the
same kind: special ChatML tokens first, then byte-level BPE, split either SmolLM-style (each digit
apart, then GPT-2's rules) or Qwen2-style (Qwen2's split regex).
"""

from __future__ import annotations

from pathlib import Path

from ultimate_trainer.export.to_gguf import QWEN2_SPLIT

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["What is the capital of France? Paris is the capital of France.",
        "2+2 is 4, 12345 + 1 = 12346. Numbers: 0 1 2 3 4 5 6 7 8 9.",
        "Name a colour: red, green, blue. You are a helpful assistant. Answer briefly.",
        "The quick brown fox jumps over the lazy dog!\n\nLine breaks\tand tabs."] * 20


def tiny_tokenizer(out: Path, style: str) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return out


def tiny_model(out: Path, arch: str, seed: int = 0, layers: int = 2) -> Path:
    """A 2-layer (or ``layers``), 64-wide random ``llama`` (tied embeddings) or ``qwen2`` (q/k/v biases, untied, padded vocab)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tiny_tokenizer(out, "qwen2" if arch == "qwen2" else "smollm")
    tok = AutoTokenizer.from_pretrained(out)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) + 16, tie_word_embeddings=False, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)  # zero biases would hide a wrong bias mapping
    model.save_pretrained(out)
    return out
