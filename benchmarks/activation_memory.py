"""Activation memory one encoder pass keeps for the backward: per-layer formulas, and their check on a GPU.

Formulas (bytes per transformer layer, 16-bit activations, no recomputation; s tokens, b
micro-batch, h width, a heads), used by ``benchmarks/memory.py``:

- :func:`korthikanti_layer_bytes`: ``s·b·h·(34 + 5·a·s/h)``, Korthikanti et al. 2022 eq. 1 for a
  GPT-style layer with dropout.
- :func:`esm2_layer_bytes`: ``s·b·h·(48 + 6·a·s/h)``, fair-esm's ``TransformerLayer`` counted op by
  op from what autograd saves: two layer-norm inputs (2 + 2), the q/k/v input (2), rotated q and k
  for q·kᵀ (4), v (2), the out-projection input (2), the fc1 input (2), the composite erf GELU
  ``x·0.5·(1 + erf(x/√2))`` keeping x/√2, 0.5·x and 1 + erf (3 × 8), the fc2 input (8): 48·sbh;
  the softmax output in fp32 (4·as²b) and its bf16 copy for the product with v (2·as²b); no dropout.
- :func:`bert_layer_bytes`: ``34·s·b·h``, Korthikanti's layer without its 5·as²b term, because
  transformers' BERT runs SDPA, whose fused GPU kernels keep no s × s matrices.

Measurement (this script's ``main``, CUDA only): fair-esm ``ESM2`` and transformers ``BertModel`` at
their real sizes, randomly initialised, in bf16 (as DeepSpeed's bf16 mode runs them), in training
mode; for one forward pass with autograd recording, ``kept = memory_allocated after - before``
(saved tensors + the outputs) is what the pass holds until its backward. Only torch, fair-esm and
transformers are imported, so it runs on a bare GPU machine.

    python benchmarks/activation_memory.py --esm esm2_t36_3B:8 esm2_t48_15B:4 --bert 8 --out act.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

# (layers, width, heads) of fair-esm's presets (pretrain/models/sequence_encoder.py)
ESM2 = {
    "esm2_t33_650M": (33, 1280, 20),
    "esm2_t36_3B": (36, 2560, 40),
    "esm2_t48_15B": (48, 5120, 40),
}
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def korthikanti_layer_bytes(tokens: int, batch: int, hidden: int, heads: int) -> float:
    """Korthikanti et al. 2022 eq. 1: one GPT-style layer, 16-bit activations, no recomputation."""
    s, b, h, a = tokens, batch, hidden, heads
    return s * b * h * (34 + 5 * a * s / h)


def esm2_layer_bytes(tokens: int, batch: int, hidden: int, heads: int) -> float:
    """One fair-esm ESM-2 layer in bf16 (module docstring): ``s·b·h·(48 + 6·a·s/h)``."""
    s, b, h, a = tokens, batch, hidden, heads
    return s * b * h * (48 + 6 * a * s / h)


def bert_layer_bytes(tokens: int, batch: int, hidden: int, heads: int) -> float:
    """One transformers BERT layer with SDPA attention in 16-bit: ``34·s·b·h`` (no s × s matrices kept)."""
    return 34 * tokens * batch * hidden


def _kept(model: torch.nn.Module, run) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = run(model)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    del out
    return kept


def measure_esm(preset: str, batch: int, tokens: int) -> dict:
    from esm import Alphabet
    from esm.model.esm2 import ESM2 as Model

    layers, width, heads = ESM2[preset]
    alphabet = Alphabet.from_architecture("ESM-1b")
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: 15B in fp32 would not fit first
    try:
        with torch.device("cuda"):
            model = Model(num_layers=layers, embed_dim=width, attention_heads=heads, alphabet=alphabet)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16).train()  # also the fp32 rotary buffers, as DeepSpeed's bf16 mode does
    gen = torch.Generator(device="cuda").manual_seed(0)
    toks = torch.randint(4, 24, (batch, tokens), device="cuda", generator=gen)  # amino-acid tokens
    toks[:, 0], toks[:, -1] = alphabet.cls_idx, alphabet.eos_idx
    kept = _kept(model, lambda m: m(toks, repr_layers=[layers])["representations"][layers])
    del model
    torch.cuda.empty_cache()
    return _row(preset, batch, tokens, kept, layers, width, heads, esm2_layer_bytes)


def measure_bert(batch: int, tokens: int) -> dict:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **BERT_BASE)
    with torch.device("cuda"):
        model = BertModel(cfg, add_pooling_layer=False)
    model = model.to(torch.bfloat16).train()
    ids = torch.randint(1000, 30000, (batch, tokens), device="cuda")
    attn = torch.ones_like(ids)
    kept = _kept(model, lambda m: m(input_ids=ids, attention_mask=attn).last_hidden_state)
    impl = getattr(model.config, "_attn_implementation", "?")
    del model
    torch.cuda.empty_cache()
    return _row(f"bert-base ({impl} attention)", batch, tokens, kept, 12, 768, 12, bert_layer_bytes)


def _row(name, batch, tokens, kept, layers, width, heads, layer_bytes) -> dict:
    return {
        "model": name,
        "batch": batch,
        "tokens": tokens,
        "kept_gb": kept / 1e9,
        "formula_gb": layers * layer_bytes(tokens, batch, width, heads) / 1e9,
        "korthikanti_gb": layers * korthikanti_layer_bytes(tokens, batch, width, heads) / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--esm", nargs="*", default=[], metavar="PRESET:BATCH", help="ESM-2 passes to measure")
    p.add_argument("--esm-tokens", type=int, default=452, help="tokens per sequence (max_length 450 + BOS/EOS)")
    p.add_argument("--bert", nargs="*", type=int, default=[], metavar="BATCH", help="BERT-base batches")
    p.add_argument("--bert-tokens", type=int, default=512)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("activation_memory.py measures CUDA memory: run it on a GPU machine", file=sys.stderr)
        return 2
    rows = []
    for item in args.esm:
        preset, batch = item.split(":")
        rows.append(measure_esm(preset, int(batch), args.esm_tokens))
    for batch in args.bert:
        rows.append(measure_bert(batch, args.bert_tokens))
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}, torch {torch.__version__}")
    print("| encoder pass | micro-batch | tokens | kept GB (measured) | formula GB | measured / formula ", end="")
    print("| Korthikanti GB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [r["model"], r["batch"], r["tokens"], f"{r['kept_gb']:.2f}", f"{r['formula_gb']:.2f}"]
        cells += [f"{r['kept_gb'] / r['formula_gb']:.3f}", f"{r['korthikanti_gb']:.2f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
