"""Bytes one ESM-2 layer keeps for its backward with fused (SDPA) attention: measured on CPU, fitted.

``benchmarks/memory.py`` needs a per-layer activation formula for the path training runs by default
(``model.sequence.attention: fused``). The reference-attention formula ``s·b·h·(48 + 6·a·s/h)``
(``benchmarks/activation_memory.py``) was derived op by op and checked on an H100; this script
measures the fused path instead of assuming it.

Measurement: one fair-esm ESM-2 ``TransformerLayer`` (rotary, ESM-1b layer norm, feed-forward 4h)
of width h with a heads, its attention run by ``pretrain.models.esm_attention`` (``fused`` or
``reference``), random weights, training mode, cast to the measured dtype (``model.to(dtype)``, as
DeepSpeed's bf16 mode runs it; the rotary buffers too). Input: a (s, b, h) activation that requires
grad, no padding. Kept bytes: the distinct storages autograd saves for the backward during one
forward (saved-tensor hooks, parameters excluded; ``benchmarks/_common.py``); the layer's input
counts, since its first layer norm keeps it. One layer is exact: in the model a layer's input is the
previous layer's output, which only the next layer keeps.

Fit: least squares of the kept bytes on ``s·b·h``, ``s·b·a``, ``s·b`` and ``s·h/a`` (and, to check
there is no L × L term left, on ``a·s²·b`` as well) over the fit points; the held-out points check the fitted
formula. What this does NOT measure: the GPU's flash / memory-efficient SDPA kernels, whose saved
tensors (log-sum-exp, RNG state, any padding of the log-sum-exp) may differ from the CPU flash
kernel's; on CPU, torch's flash kernel is the one SDPA picks for these inputs.

    python benchmarks/esm_fused_memory.py --dtype bf16 fp32 --json /tmp/fused_fit.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from activation_memory import esm2_layer_bytes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (h, a) of the published ESM-2 sizes: 8M, 35M, 150M, 650M, 3B, 15B
REAL_WIDTHS = ((320, 20), (480, 20), (640, 20), (1280, 20), (2560, 40), (5120, 40))
# (s tokens, b, h, a): fit points and held-out points (the held-out ones mix sizes the fit never saw)
FIT_POINTS = (
    (66, 1, 320, 20),
    (258, 1, 320, 20),
    (1024, 1, 320, 20),
    (130, 4, 320, 20),
    (514, 2, 480, 20),
    (130, 1, 640, 20),
    (258, 2, 1280, 20),
    (66, 1, 2560, 40),
)
HELDOUT_POINTS = ((1024, 2, 480, 20), (452, 1, 1280, 20), (130, 3, 640, 20), (130, 1, 5120, 40))


def esm2_fused_layer_bytes(tokens: int, batch: int, hidden: int, heads: int, element_bytes: int = 2) -> float:
    """One fair-esm ESM-2 layer with fused attention: ``s·b·(24·E·h + 4·a + 4·E) + 2·E·s·h/a`` bytes kept.

    Measured and fitted on CPU (module docstring; BENCHMARKS.md). E = 2 for 16-bit activations,
    4 for fp32. In 16-bit: ``s·b·(48·h + 4·a + 8) + 4·s·h/a``, i.e. the reference formula's
    ``48·s·b·h`` with its ``6·a·s²·b`` of softmax probabilities replaced by a ``4·a·s·b`` fp32
    log-sum-exp; ``4·E·s·b`` are the two layer norms' mean and reciprocal std (in the activation
    dtype on CPU), ``2·E·s·h/a`` the layer's rotary cos / sin tables (no batch dimension). No ``a·s²`` term.
    """
    s, b, h, a, e = tokens, batch, hidden, heads, element_bytes
    return s * b * (24 * e * h + 4 * a + 4 * e) + 2 * e * s * h / a


def layer_saved_bytes(tokens: int, batch: int, hidden: int, heads: int, dtype: str, mode: str = "fused") -> int:
    """Bytes one ESM-2 layer keeps for its backward in one forward (module docstring)."""
    from esm.modules import TransformerLayer

    from pretrain.models.esm_attention import set_esm_attention

    torch.manual_seed(0)
    layer = TransformerLayer(
        hidden, 4 * hidden, heads, add_bias_kv=False, use_esm1b_layer_norm=True, use_rotary_embeddings=True
    )
    set_esm_attention(layer, mode)
    layer = layer.to(DTYPES[dtype]).train()
    x = torch.randn(tokens, batch, hidden, dtype=DTYPES[dtype], requires_grad=True)  # (s, b, h)
    return _common.saved_activation_bytes(
        lambda: layer(x, self_attn_padding_mask=None)[0], _common.parameter_storages(layer)
    )


FEATURES = ("s·b·h", "s·b·a", "s·b", "s·h/a")


def _features(points: np.ndarray, quadratic: bool) -> np.ndarray:
    s, b, h, a = points.T.astype(float)
    cols = [s * b * h, s * b * a, s * b, s * h / a] + ([a * s * s * b] if quadratic else [])
    return np.stack(cols, axis=1)


def fit(points: list[tuple[int, int, int, int]], kept: list[int], quadratic: bool = False) -> np.ndarray:
    """Least-squares coefficients of kept bytes on (s·b·h, s·b·a, s·b, s·h/a[, a·s²·b]), relative errors weighted
    equally (each row divided by its measurement)."""
    x = _features(np.array(points), quadratic)
    y = np.array(kept, dtype=float)
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    return coef


def section(results: dict, command: str) -> str:
    """The BENCHMARKS.md section: fitted coefficients per dtype and every point, measured vs formula."""
    intro = [
        f"Device: **{results['machine']}**; torch {results['torch']}; command: `{command}`.",
        "One fair-esm ESM-2 layer (rotary, feed-forward 4h, training mode, random weights, cast to the dtype), "
        "fused attention (`model.sequence.attention: fused`), input (s, b, h) without padding; kept = distinct "
        "storages autograd saves in one forward (saved-tensor hooks, parameters excluded). Bytes are exact "
        "(deterministic): no repeats needed. The GPU flash / memory-efficient kernels were not measured.",
        "",
        *(
            f"- {dtype}: fit " + " + ".join(f"{c:.3f}·{f}" for c, f in zip(v["coef"], FEATURES)) + " bytes; "
            f"an added a·s²·b feature gets {v['coef_with_quadratic'][-1]:.1e}"
            for dtype, v in results["dtypes"].items()
        ),
    ]
    table = [
        "| dtype | points | s | b | h | a | kept MiB (measured) | formula / measured | reference path MiB "
        "| `s·b·h·(48 + 6·a·s/h)` / reference path |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype, v in results["dtypes"].items():
        for r in v["rows"]:
            ref, check = "", ""
            if r["reference_measured"]:
                ref = f"{r['reference_measured'] / 2**20:.2f}"
                if dtype == "bf16":  # the 16-bit reference formula (checked on an H100) against the CPU count
                    formula = esm2_layer_bytes(r["s"], r["b"], r["h"], r["a"])
                    check = f"{formula / r['reference_measured']:.4f}"
            table.append(
                f"| {dtype} | {r['kind']} | {r['s']} | {r['b']} | {r['h']} | {r['a']} | {r['measured'] / 2**20:.3f} "
                f"| {r['formula'] / r['measured']:.4f} | {ref} | {check} |"
            )
    return _common.markdown_section("ESM-2 layer with fused attention: bytes kept for backward, CPU", intro, table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--machine", default=None, help="machine description for the section")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file (e.g. BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None, help="write the measurements and fits here")
    args = p.parse_args(argv)
    results = {"machine": args.machine or _common.cpu_name(), "torch": torch.__version__, "dtypes": {}}
    for dtype in args.dtype:
        element = torch.tensor([], dtype=DTYPES[dtype]).element_size()
        fit_kept = [layer_saved_bytes(*pt, dtype) for pt in FIT_POINTS]
        coef = fit(FIT_POINTS, fit_kept)
        coef_q = fit(FIT_POINTS, fit_kept, quadratic=True)
        terms = " + ".join(f"{c:.3f}·{f}" for c, f in zip(coef, FEATURES))
        print(f"[{dtype}] fit: {terms} bytes (with an a·s²·b feature: {coef_q[-1]:.2e}·a·s²·b)", flush=True)
        rows = []
        for kind, points, kept in (("fit", FIT_POINTS, fit_kept), ("held-out", HELDOUT_POINTS, None)):
            for i, pt in enumerate(points):
                measured = kept[i] if kept is not None else layer_saved_bytes(*pt, dtype)
                formula = esm2_fused_layer_bytes(*pt, element_bytes=element)
                fitted = float((_features(np.array([pt]), False) @ coef)[0])
                held = kind == "held-out" and pt[2] <= 1280
                reference = layer_saved_bytes(*pt, dtype, "reference") if held else None
                rows.append(
                    {
                        "kind": kind,
                        "s": pt[0],
                        "b": pt[1],
                        "h": pt[2],
                        "a": pt[3],
                        "measured": measured,
                        "fitted": fitted,
                        "formula": formula,
                        "reference_measured": reference,
                    }
                )
                ref = f", reference path {reference / 2**20:.2f} MiB" if reference else ""
                print(
                    f"[{dtype}] {kind} s={pt[0]} b={pt[1]} h={pt[2]} a={pt[3]}: measured {measured / 2**20:.3f} MiB, "
                    f"formula / measured {formula / measured:.4f}, fit / measured {fitted / measured:.4f}{ref}",
                    flush=True,
                )
        results["dtypes"][dtype] = {"coef": coef.tolist(), "coef_with_quadratic": coef_q.tolist(), "rows": rows}
    command = _common.command_line("benchmarks/esm_fused_memory.py", argv)
    _common.publish(section(results, command), args.out, args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
