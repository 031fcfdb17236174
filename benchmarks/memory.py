"""Per-GPU training memory of each real-size recipe at its ZeRO stage and micro-batch.

A computation, not a measurement. Parameter counts come from the real architectures (fair-esm
``ESM2``, transformers ``BertModel``, our GVP-GNN, heads; ProtCLIP heads in protclip mode) built on
the ``meta`` device: no weights are read or downloaded. Memory then follows two published formulas.

Model states: ZeRO (Rajbhandari et al. 2020, sec. 3.1 and 5) for mixed-precision Adam, Ψ parameters
on N_d data-parallel GPUs, K = 12 bytes/param of optimizer state (fp32 master weights, momentum,
variance) on top of 2 bytes of 16-bit weights and 2 of 16-bit gradients::

    no ZeRO  (2 + 2 + K) Ψ
    stage 1  2Ψ + 2Ψ + KΨ / N_d
    stage 2  2Ψ + (2 + K) Ψ / N_d
    stage 3  (2 + 2 + K) Ψ / N_d

Activations: the bytes each encoder pass keeps for its backward, per layer (16-bit, no
recomputation; s tokens, b micro-batch, h width, a heads). ESM-2 with fused attention
(``model.sequence.attention: fused``, the default): ``s·b·(48·h + 4·a + 8) + 4·s·h/a``, measured with
saved-tensor hooks on CPU in bf16 and fp32 and fitted (``benchmarks/esm_fused_memory.py``; exact at
every measured point; the GPU flash kernels' saved tensors were not measured). ESM-2 with fair-esm's
reference attention (``model.sequence.attention: reference``): ``s·b·h·(48 + 6·a·s/h)``, and
transformers BERT with SDPA attention ``34·s·b·h`` (derivations in ``benchmarks/activation_memory.py``):
both checked on an H100 against ``memory_allocated`` around one bf16 forward of the real models
(within 0.2-0.7 % for ESM-2 650M / 3B / 15B, 1.5-3 % for BERT-base; BENCHMARKS.md); Korthikanti et
al. 2022's generic ``s·b·h·(34 + 5·a·s/h)`` undercounts fair-esm's reference layer by a quarter.
A layer counts once per encoder pass a training step makes: Align-Pro runs the
sequence and text encoders a second time for the intra-modal views when their weights are > 0;
ProtCLIP runs ESM-2 up to three times (clean, MLM-masked, span-masked tokens). The "checkpointed"
columns assume per-layer activation checkpointing: the 2·s·b·h bytes of every layer input, plus the
largest single layer recomputed during the backward.

Not counted (say so wherever the figures are quoted): GVP-GNN activations (edges = residues × k
neighbours; small next to ESM-2 at these sizes but not zero), projection heads and the loss
(the fused InfoNCE never materialises B × B), ZeRO's communication buckets and ZeRO-3's gathered
live parameters (configs/zero*.json: 5e7-element buckets, at most 1e8 live parameters), the CUDA
context and NCCL buffers, and allocator fragmentation; leave 10-15 GB of an 80 GB card for them.
GB is 10^9 bytes, as in the ZeRO paper.

    python benchmarks/memory.py                 # print the table and rewrite it in README.md
    python benchmarks/memory.py --no-readme     # print only
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation_memory import bert_layer_bytes, esm2_layer_bytes  # noqa: E402
from esm_fused_memory import esm2_fused_layer_bytes  # noqa: E402

from pretrain.config import Config, load_config  # noqa: E402
from pretrain.models.sequence_encoder import resolve_preset  # noqa: E402
from pretrain.models.text_encoder import TEXT_PRESETS  # noqa: E402
from pretrain.readme_section import replace_section  # noqa: E402

GB = 1e9
ADAM_K = 12  # bytes/param of mixed-precision Adam state (ZeRO paper, sec. 3.1)
GPU_MEMORY_GB = 80.0  # A100 / H100 80 GB, the card the plans below target
RESERVE_GB = 12.0  # left for what is not counted (module docstring)
README_BEGIN = "<!-- memory-table:begin (benchmarks/memory.py writes this; do not edit by hand) -->"
README_END = "<!-- memory-table:end -->"


@dataclass(frozen=True)
class Plan:
    """How a recipe is meant to be launched: the DeepSpeed JSON's ZeRO stage and the GPU count."""

    recipe: str  # file name under configs/recipes/ without .yaml
    zero_stage: int  # configs/zeroN.json passed as --config
    gpus: int  # data-parallel ranks N_d (the recipe's batch_size is per rank)


# The stage and GPU count each recipe's header names (micro-batch: the recipe's data.batch_size).
PLANS = (
    Plan("align_pro_35M", 2, 8),
    Plan("align_pro_650M", 3, 16),
    Plan("protclip_650M", 3, 16),
    Plan("align_pro_3B", 2, 16),
    Plan("align_pro_15B", 3, 32),
)


# --------------------------------------------------------------------------- formulas


def model_state_bytes(params: float, stage: int, gpus: int, k: int = ADAM_K) -> float:
    """Bytes per GPU of 16-bit weights + 16-bit gradients + optimizer state (ZeRO paper, fig. 1).

    Args:
        params: Ψ, the number of trained parameters.
        stage: 0 (plain data parallel), 1, 2 or 3.
        gpus: N_d, the data-parallel degree.
        k: optimizer-state bytes per parameter (12 for mixed-precision Adam).
    """
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: must be >= 1")
    psi = float(params)
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return 2 * psi + 2 * psi + k * psi / gpus
    if stage == 2:
        return 2 * psi + (2 + k) * psi / gpus
    if stage == 3:
        return (2 + 2 + k) * psi / gpus
    raise ValueError(f"stage={stage}: ZeRO stages are 0, 1, 2, 3")


# per-layer activation bytes (16-bit) by family: ESM-2 with fused (SDPA) or fair-esm's reference attention, BERT
LAYER_BYTES = {"esm2-fused": esm2_fused_layer_bytes, "esm2": esm2_layer_bytes, "bert": bert_layer_bytes}


@dataclass(frozen=True)
class Transformer:
    """The activation-relevant shape of one encoder pass."""

    name: str  # a LAYER_BYTES family: "esm2-fused", "esm2" (reference attention) or "bert"
    layers: int
    hidden: int
    heads: int
    tokens: int  # sequence length per sample, special tokens included
    passes: int  # forward passes per training step that keep activations for the backward


def activation_bytes(stacks: list[Transformer], batch: int, checkpointed: bool = False) -> float:
    """Activation bytes of one training step's forward passes kept for the backward.

    With ``checkpointed``: every layer input (2·s·b·h bytes) of every pass, plus the largest single
    layer that is recomputed during the backward.
    """
    total, largest = 0.0, 0.0
    for t in stacks:
        layer = LAYER_BYTES[t.name](t.tokens, batch, t.hidden, t.heads)
        if checkpointed:
            total += t.passes * t.layers * 2 * t.tokens * batch * t.hidden
            largest = max(largest, layer)
        else:
            total += t.passes * t.layers * layer
    return total + largest


# --------------------------------------------------------------------------- the recipes


def _buildable(cfg: Config) -> Config:
    """The recipe with weight files dropped: the architecture is the same, nothing is read."""
    cfg.model.sequence.weights = None
    cfg.model.text.pretrained_dir = None
    return cfg


def parameter_counts(cfg: Config) -> dict[str, int]:
    """Parameters of the model a recipe trains, per part, counted on the ``meta`` device.

    Returns:
        ``sequence``, ``structure``, ``text``, ``heads`` (projection heads, logit scale and, in
        protclip mode, the BSR / PDA heads) and ``total`` (shared tensors counted once).
    """
    from pretrain.losses.registry import build_objective
    from pretrain.models.trimodal import TriModalModel

    cfg = _buildable(cfg)
    vocab = TEXT_PRESETS[cfg.model.text.preset]["vocab_size"]  # the pretrained vocabulary, not the demo one
    with torch.device("meta"):  # with the modules the objective adds (ProtCLIP's BSR / PDA heads)
        model = TriModalModel(cfg.model, text_vocab_size=vocab, objective=build_objective(cfg.loss))
    parts = {
        "sequence": model.sequence_encoder,
        "structure": model.structure_encoder,
        "text": model.text_encoder,
    }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    total = sum(p.numel() for p in model.parameters())
    counts["heads"] = total - sum(counts.values())
    counts["total"] = total
    return counts


def encoder_passes(cfg: Config) -> list[Transformer]:
    """The transformer passes one training step of this recipe makes that keep activations for
    backward (GVP-GNN not included)."""
    lo, m = cfg.loss, cfg.model
    if lo.objective == "protclip":
        seq_passes = 1 + (lo.protclip.mlm > 0) + (lo.protclip.bsr > 0)
        text_passes = 1
    else:
        seq_passes = 1 + (lo.intra_seq > 0)
        text_passes = 1 + (lo.intra_text > 0)
    # A frozen encoder (train.frozen_encoders) runs without autograd history: nothing is kept for backward.
    frozen = set(cfg.train.frozen_encoders)
    seq_passes *= "sequence" not in frozen
    text_passes *= "text" not in frozen
    s = m.sequence
    layers, width, heads = resolve_preset(s.preset)
    layers, width, heads = s.num_layers or layers, s.embed_dim or width, s.attention_heads or heads
    text = dict(TEXT_PRESETS[m.text.preset])
    esm2 = "esm2-fused" if s.attention == "fused" else "esm2"  # model.sequence.attention picks the formula
    return [
        Transformer(esm2, layers, width, heads, m.sequence.max_length + 2, seq_passes),  # + BOS, EOS
        Transformer(
            "bert",
            m.text.num_layers or text["num_hidden_layers"],
            m.text.hidden_size or text["hidden_size"],
            m.text.attention_heads or text["num_attention_heads"],
            m.text.max_length,  # [CLS] and [SEP] included
            text_passes,
        ),
    ]


@dataclass
class Row:
    plan: Plan
    preset: str
    counts: dict[str, int]
    micro_batch: int
    passes: str
    states_gb: float
    act_gb: float
    act_ckpt_gb: float
    recipe_ckpt: tuple[str, ...]  # the recipe's own train.activation_checkpointing

    @property
    def total_gb(self) -> float:
        return self.states_gb + self.act_gb

    @property
    def total_ckpt_gb(self) -> float:
        return self.states_gb + self.act_ckpt_gb


def compute_row(plan: Plan, recipes_dir: Path | None = None) -> Row:
    """Parameter counts, model states and activations for one plan."""
    path = (recipes_dir or REPO / "configs" / "recipes") / f"{plan.recipe}.yaml"
    cfg = load_config(path, ["model.sequence.weights=null", "model.text.pretrained_dir=null"])
    counts = parameter_counts(cfg)
    stacks = encoder_passes(cfg)
    b = cfg.data.batch_size
    return Row(
        plan=plan,
        preset=cfg.model.sequence.preset,
        counts=counts,
        micro_batch=b,
        passes=", ".join(f"{t.name}×{t.passes} (s={t.tokens})" for t in stacks),
        states_gb=model_state_bytes(counts["total"], plan.zero_stage, plan.gpus) / GB,
        act_gb=activation_bytes(stacks, b) / GB,
        act_ckpt_gb=activation_bytes(stacks, b, checkpointed=True) / GB,
        recipe_ckpt=tuple(cfg.train.activation_checkpointing),
    )


def _m(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _yes(gb: float) -> str:
    return "yes" if gb <= GPU_MEMORY_GB - RESERVE_GB else "**no**"


def markdown_table(rows: list[Row]) -> str:
    """The README table (one line per recipe)."""
    head = (
        "| recipe | ESM-2 | params: seq / struct / text / heads = total | ZeRO | GPUs | micro-batch "
        "| encoder passes per step | model states GB | activations GB | total GB "
        "| activations GB, checkpointed | total GB, checkpointed "
        f"| fits ≤ {GPU_MEMORY_GB - RESERVE_GB:.0f} GB: plain / checkpointed | recipe checkpoints |\n"
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    )
    lines = [head]
    for r in rows:
        c = r.counts
        params = " / ".join(_m(c[k]) for k in ("sequence", "structure", "text", "heads")) + f" = {_m(c['total'])}"
        lines.append(
            f"| `{r.plan.recipe}` | `{r.preset}` | {params} | {r.plan.zero_stage} | {r.plan.gpus} | {r.micro_batch} "
            f"| {r.passes} | {r.states_gb:.1f} | {r.act_gb:.1f} | {r.total_gb:.1f} "
            f"| {r.act_ckpt_gb:.1f} | {r.total_ckpt_gb:.1f} | {_yes(r.total_gb)} / {_yes(r.total_ckpt_gb)} "
            f"| {', '.join(r.recipe_ckpt) or 'none'} |"
        )
    return "\n".join(lines)


def readme_section(rows: list[Row]) -> str:
    return (
        f"{README_BEGIN}\n"
        f"Computed by `python benchmarks/memory.py` (no training run was measured). Parameters: the real "
        f"architectures built on the `meta` device. Model states: ZeRO paper formulas, mixed-precision "
        f"Adam (K = 12), 16-bit weights and gradients. Activations: per-layer formulas, per encoder pass "
        f"a step makes: ESM-2 with fused attention (`esm2-fused`, the recipes' `model.sequence.attention`) "
        f"measured on CPU in bf16 and fp32 with saved-tensor hooks (the GPU flash kernels' saved tensors "
        f"not measured); fair-esm's reference attention (`esm2`) and BERT (SDPA) as checked against one "
        f"bf16 forward on an H100 within 0.2-3 % (BENCHMARKS.md); without and with per-layer activation "
        f"checkpointing (the last column: the encoders the recipe's `train.activation_checkpointing` "
        f"names). Not counted: GVP-GNN activations, heads and loss, communication buckets, "
        f'ZeRO-3 live parameters, CUDA context and NCCL buffers, fragmentation; "fits" means at '
        f"most {GPU_MEMORY_GB - RESERVE_GB:.0f} GB, leaving {RESERVE_GB:.0f} GB of an "
        f"{GPU_MEMORY_GB:.0f} GB card for them. GB = 10^9 bytes.\n\n"
        f"{markdown_table(rows)}\n"
        f"{README_END}"
    )


def write_readme(section: str, readme: Path) -> None:
    """Replace the text between the markers (or append the section when there are none)."""
    replace_section(readme, section, README_BEGIN, README_END, "### Memory per GPU (computed)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=REPO / "README.md", help="README to rewrite between the markers")
    p.add_argument("--no-readme", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    rows = [compute_row(plan) for plan in PLANS]
    print(markdown_table(rows))
    if not args.no_readme:
        write_readme(readme_section(rows), args.readme)
        print(f"wrote the table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
