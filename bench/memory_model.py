"""Expected peak GPU memory of the shipped config.json (Qwen2.5-7B-Instruct, QLoRA) on one GPU, term by term.

    python bench/memory_model.py [--measure] [--batch 4] [--seq 2048] [--markdown]

Every term is computed from the model's shape (Qwen2.5-7B's config values, below) and the shipped
settings (NF4 with double quantization, LoRA r64 on the seven projections, AdamW, gradient
checkpointing, the chunked loss, bf16 compute, padding-free rows of ``batch`` examples of at most
``seq`` tokens each). ``--measure`` adds what this CPU can measure exactly without a GPU: the LoRA
parameter count of PEFT on the real Qwen2 module tree (built on the meta device: no memory), and
the bytes bitsandbytes stores for one decoder layer's seven projections quantized to NF4 (one
layer at the real width, random weights, ~1 GB of RAM for a moment), times 28. The table is
docs/MEMORY.md's; run it to reproduce it.

What is an estimate and not a count: the activations of the one decoder layer recomputed during
backward (a sum of the tensors autograd keeps, see ``layer_activation_elements``), the allocator's
slack (``FRAGMENTATION``) and the CUDA context (``CUDA_CONTEXT_GB``). They are marked so.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GB = 1e9
GiB = 1024**3

# Qwen2.5-7B-Instruct's config.json
QWEN7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, tied=False)
LORA_R = 64
LORA_DROPOUT = 0.05  # > 0: PEFT keeps the dropped-out input of every adapted projection for backward
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size
DOUBLE_QUANT_BLOCK = 256  # the absmax of 256 blocks share one fp32 scale (double quantization)
CHUNK_ELEMENTS = 1 << 26  # model/loss.py: logits elements per chunk
CUDA_CONTEXT_GB = 0.6  # CUDA context, cuBLAS workspace (estimate)
FRAGMENTATION = 0.10  # the caching allocator's slack over live tensors (estimate)


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of the seven adapted projections of one layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.projections().values())

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.projections().values())

    def other_params(self) -> int:
        """Embeddings, output layer, q/k/v biases, norms: kept in bf16."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        bias = self.layers * (self.hidden + 2 * self.kv_dim)
        norms = self.layers * 2 * self.hidden + self.hidden
        return emb + bias + norms


def nf4_bytes_per_param(double_quant: bool = True) -> float:
    """Packed 4-bit values + the per-block absmax (8-bit + shared fp32 scale with double quantization)."""
    absmax = (1 + 4 / DOUBLE_QUANT_BLOCK) if double_quant else 4
    return 0.5 + absmax / NF4_BLOCK


def layer_activation_elements(s: Shape, r: int, dropout: bool) -> int:
    """Elements per token autograd keeps inside one decoder layer (bf16): what its recomputation holds.

    norm out, q/k/v out, attention out (SDPA's), o out, residual, post-norm out, gate and up out,
    act(gate), act(gate)*up, down out; with LoRA dropout the dropped copy of each adapted input
    (six of width hidden, one of width intermediate); the seven rank-r LoRA intermediates."""
    h, i = s.hidden, s.intermediate
    base = h + (h + 2 * s.kv_dim) + h + h + h + h + 2 * i + i + i + h
    drop = (6 * h + i) if dropout else 0
    return base + drop + 7 * r


def terms(s: Shape, batch: int, seq: int, *, checkpointing: bool = True, chunked: bool = True,
          r: int = LORA_R, dropout: bool = True) -> list[tuple[str, float, str]]:
    """(term, bytes, how it is computed) of the peak, in order."""
    tokens = batch * seq
    lora = s.lora_params(r)
    out = [
        ("base weights, NF4 (7 projections x 28 layers)", s.linear_params() * nf4_bytes_per_param(),
         f"{s.linear_params():,} params x {nf4_bytes_per_param():.4f} B"),
        ("embeddings + output layer + biases + norms, bf16", s.other_params() * 2,
         f"{s.other_params():,} params x 2 B (untied: two {s.vocab:,} x {s.hidden:,} matrices)"),
        ("LoRA adapter, fp32", lora * 4, f"{lora:,} params x 4 B"),
        ("LoRA gradients, fp32", lora * 4, f"{lora:,} x 4 B"),
        ("AdamW states (exp_avg, exp_avg_sq), fp32", lora * 8, f"{lora:,} x 8 B"),
    ]
    per_layer = layer_activation_elements(s, r, dropout) * tokens * 2
    if checkpointing:
        out.append(("checkpointed layer inputs, bf16", s.layers * tokens * s.hidden * 2,
                    f"{s.layers} layers x {tokens:,} tokens x {s.hidden:,} x 2 B"))
        out.append(("one layer recomputed in backward, bf16 (estimate)", 2 * per_layer,
                    f"{layer_activation_elements(s, r, dropout):,} elements/token x {tokens:,} x 2 B, x2 for its "
                    f"gradients"))
    else:
        out.append(("all layers' activations, bf16 (estimate)", s.layers * per_layer + per_layer,
                    f"{s.layers} x {layer_activation_elements(s, r, dropout):,} elements/token x {tokens:,} x 2 B"))
    dq = max(a * b for a, b in s.projections().values()) * 2
    out.append(("one projection dequantized for its matmul, bf16", dq, "the largest (gate/up/down) at a time"))
    if chunked:
        chunk = max(64, CHUNK_ELEMENTS // s.vocab)
        out.append(("logits, chunked loss", chunk * s.vocab * (2 + 4 + 4),
                    f"{chunk} tokens a chunk x {s.vocab:,}: bf16 logits + fp32 upcast + fp32 gradient"))
    else:
        out.append(("logits, whole batch", tokens * s.vocab * (2 + 4 + 4),
                    f"{tokens:,} tokens x {s.vocab:,}: bf16 + fp32 upcast + fp32 gradient"))
    return out


def peak(rows: list[tuple[str, float, str]]) -> float:
    live = sum(b for _, b, _ in rows)
    return live * (1 + FRAGMENTATION) + CUDA_CONTEXT_GB * GB


def measure(s: Shape) -> dict[str, float]:
    """What this CPU counts exactly: PEFT's LoRA parameters on the meta-device model, and one layer in NF4."""
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      tie_word_embeddings=s.tied)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    peft = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=list(s.projections())))
    lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    total = sum(p.numel() for n, p in peft.named_parameters() if "lora_" not in n)

    from bitsandbytes.functional import quantize_4bit

    nbytes = 0
    gen = torch.Generator().manual_seed(0)
    for a, b in s.projections().values():
        w = torch.randn(b, a, generator=gen, dtype=torch.bfloat16) * 0.02
        q, state = quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=NF4_BLOCK)
        packed = state.as_dict(packed=True)
        nbytes += q.numel() * q.element_size() + sum(v.numel() * v.element_size() for v in packed.values()
                                                     if torch.is_tensor(v))
        del w, q
    return {"lora_params": lora, "base_params": total, "nf4_bytes_one_layer": nbytes,
            "nf4_bytes_all_layers": nbytes * s.layers}


SCENARIOS = [  # (label, batch, seq, checkpointing, chunked)
    ("shipped: batch 4 x 2,048, checkpointing, chunked loss", 4, 2048, True, True),
    ("batch 2 x 2,048", 2, 2048, True, True),
    ("batch 1 x 2,048", 1, 2048, True, True),
    ("batch 4 x 1,024", 4, 1024, True, True),
    ("batch 4 x 2,048 without the chunked loss", 4, 2048, True, False),
    ("batch 4 x 2,048 without gradient checkpointing", 4, 2048, False, True),
]


def fits(total: float) -> str:
    return " / ".join(f"{cap} GB {'yes' if total <= cap * GB * 0.95 else 'no'}" for cap in (16, 24, 48))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--measure", action="store_true", help="count the LoRA params and one NF4 layer on this CPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    s = Shape(**QWEN7B)
    rows = terms(s, args.batch, args.seq)
    measured = measure(s) if args.measure else None
    if args.json:
        print(json.dumps({"terms": [{"term": t, "bytes": b, "how": h} for t, b, h in rows], "peak_bytes": peak(rows),
                          "measured": measured, "scenarios": {label: peak(terms(s, b, q, checkpointing=c, chunked=k))
                                                              for label, b, q, c, k in SCENARIOS}}, indent=2))
        return 0
    print("| term | GB | how |\n|---|---:|---|")
    for t, b, h in rows:
        print(f"| {t} | {b / GB:.2f} | {h} |")
    live = sum(b for _, b, _ in rows)
    print(f"| live tensors | **{live / GB:.2f}** | |")
    print(f"| + allocator slack {FRAGMENTATION:.0%} + CUDA context {CUDA_CONTEXT_GB} GB (estimates) | "
          f"**{peak(rows) / GB:.2f}** | expected peak (nvidia-smi) |")
    if measured:
        print()
        print("| measured on this CPU | value | computed above |\n|---|---:|---:|")
        print(f"| LoRA parameters (PEFT on the meta-device Qwen2 tree) | {measured['lora_params']:,} | "
              f"{s.lora_params(LORA_R):,} |")
        print(f"| base parameters besides LoRA | {measured['base_params']:,} | "
              f"{s.linear_params() + s.other_params():,} |")
        print(f"| NF4 bytes of one layer's 7 projections (bitsandbytes, double quant) | "
              f"{measured['nf4_bytes_one_layer'] / 1e6:.1f} MB | "
              f"{s.linear_params() / s.layers * nf4_bytes_per_param() / 1e6:.1f} MB |")
        print(f"| NF4 bytes, 28 layers | {measured['nf4_bytes_all_layers'] / GB:.3f} GB | "
              f"{s.linear_params() * nf4_bytes_per_param() / GB:.3f} GB |")
    print()
    print("| setting | expected peak GB | fits 16 / 24 / 48 GB (95% of the card) |\n|---|---:|---|")
    for label, b, q, c, k in SCENARIOS:
        total = peak(terms(s, b, q, checkpointing=c, chunked=k))
        print(f"| {label} | {total / GB:.1f} | {fits(total)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
