"""``python -m pretrain.hf_export --run-dir RUN [--which last|best|both] | --export DIR [--out DIR]``: the
trained model for other tools.

Reads an export (``model.safetensors`` + ``config.yaml``, see :mod:`pretrain.engine.export`; a ZeRO-3
run is consolidated there already, so no DeepSpeed is needed here) and writes::

    OUT/README.md                  model card (pretrain.model_card): recipe, data, steps, evaluation, limits
    OUT/align_pro.json             format version, export step, embedding width, logit scale(s), pooling
    OUT/sequence/                  transformers ESM-2: config.json (EsmForMaskedLM), model.safetensors,
                                   EsmTokenizer files; AutoModel gives EsmModel, AutoModelForMaskedLM the LM
    OUT/text/                      transformers BertModel: config.json, model.safetensors, tokenizer files
    OUT/{sequence,text,structure}/projection_head.safetensors + projection_head.json
    OUT/structure/                 GVP-GNN: config.json (encoder + featurisation), model.safetensors;
                                   read back with pretrain.api.load_structure_encoder

The default ``OUT`` is the export's sibling ``<export>_hf`` (``RUN/export_hf``), not a folder inside
the export: :func:`pretrain.engine.export.write_export` replaces the export directory as a whole, and
``train.remote_dir`` uploads all of it. The best checkpoint by validation, exported as
``RUN/export/best`` (:mod:`pretrain.engine.best_checkpoint`), goes to ``RUN/export_best_hf``; its model
card and ``align_pro.json`` name its step, selection metric and score (from ``best/best.json``).
With ``--run-dir`` both are converted when the run has a best (``--which`` picks one). The directory
is written to a temporary sibling and renamed into place, like the export.

The ESM-2 weights are renamed from fair-esm's ``ESM2`` to transformers' ESM layout with the mapping of
transformers' own converter (``models/esm/convert_esm.py``): q/k/v/out projections, the two pre-layer
norms, FFN, ``emb_layer_norm_after``, the contact regression, the LM head (its decoder weight is the
token embedding, tied as in fair-esm) and the rotary ``inv_freq`` (copied, not recomputed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from pretrain.config import Config
from pretrain.engine import best_checkpoint
from pretrain.engine.export import MODEL_FILE, export_step, load_exported
from pretrain.models.text_encoder import build_tokenizer
from pretrain.models.trimodal import TriModalModel

FORMAT_VERSION = 1
INFO_FILE = "align_pro.json"  # marks a directory written by export_hf
HEAD_WEIGHTS = "projection_head.safetensors"
HEAD_CONFIG = "projection_head.json"
STRUCTURE_FORMAT = "align-pro-gvp"
_ST_META = {"format": "pt", "producer": "align-pro hf_export"}
WHICH = ("last", "best", "both")  # which exports of a run directory --run-dir converts

# fair-esm TransformerLayer submodule -> transformers EsmLayer submodule (weights and biases alike).
_ESM_LAYER_NAMES = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "LayerNorm",
}
_ESM_TOP_NAMES = {
    "embed_tokens.weight": "esm.embeddings.word_embeddings.weight",
    "emb_layer_norm_after.weight": "esm.encoder.emb_layer_norm_after.weight",
    "emb_layer_norm_after.bias": "esm.encoder.emb_layer_norm_after.bias",
    "contact_head.regression.weight": "esm.contact_head.regression.weight",
    "contact_head.regression.bias": "esm.contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
_ESM_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_ESM_INV_FREQ = re.compile(r"^layers\.(\d+)\.self_attn\.rot_emb\.inv_freq$")


def default_out_dir(export_dir: Path | str) -> Path:
    """``<export>_hf`` beside the export (``RUN/export`` -> ``RUN/export_hf``); a best export inside an
    export (``RUN/export/best``, beside ``RUN/export/config.yaml``) -> ``RUN/export_best_hf``."""
    export_dir = Path(export_dir)
    if _is_best_of_an_export(export_dir):
        parent = export_dir.parent
        return parent.with_name(f"{parent.name}_{export_dir.name}_hf")
    return export_dir.with_name(f"{export_dir.name}_hf")


def _is_best_of_an_export(export_dir: Path) -> bool:
    return export_dir.name == best_checkpoint.EXPORT_SUBDIR and (export_dir.parent / "config.yaml").is_file()


def esm2_to_hf(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Rename a fair-esm ``ESM2.state_dict()`` to transformers' ``EsmForMaskedLM`` keys.

    Returns:
        (state dict, tied): ``tied`` is True when fair-esm's LM-head weight is the token embedding
        (always, for a model built by fair-esm), so ``lm_head.decoder.weight`` is left out and tied
        on load (``tie_word_embeddings``); otherwise it is written.

    Raises:
        ValueError: a key the mapping does not know, or per-layer rotary frequencies that differ.
    """
    out: dict[str, Tensor] = {}
    inv_freq: Tensor | None = None
    for key, value in state.items():
        if key in _ESM_TOP_NAMES:
            out[_ESM_TOP_NAMES[key]] = value
        elif key == "lm_head.weight":
            continue  # below: tied or not
        elif _ESM_INV_FREQ.match(key):
            if inv_freq is not None and not torch.equal(inv_freq, value):
                raise ValueError(f"ESM-2 rotary inv_freq of {key} differs from layer 0's: cannot share one buffer")
            inv_freq = value if inv_freq is None else inv_freq
        elif (m := _ESM_LAYER_KEY.match(key)) and m.group(2) in _ESM_LAYER_NAMES:
            out[f"esm.encoder.layer.{m.group(1)}.{_ESM_LAYER_NAMES[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise ValueError(f"ESM-2 weight {key!r} has no transformers counterpart (fair-esm version?)")
    if inv_freq is not None:
        out["esm.rotary_embeddings.inv_freq"] = inv_freq
    lm = state.get("lm_head.weight")
    tied = lm is None or torch.equal(lm, state["embed_tokens.weight"])
    if not tied:
        out["lm_head.decoder.weight"] = lm
    return out, tied


def _save_tensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    """fp32, contiguous, untied copies (safetensors refuses shared storage)."""
    state = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in tensors.items()}
    save_file(state, str(path), metadata=dict(_ST_META))


def _check_keys(model_cls, config, state: Mapping[str, Tensor], tied: bool) -> None:
    """The written keys and shapes are those of ``model_cls(config)`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        ref = model_cls(config).state_dict()
    if tied:
        ref.pop("lm_head.decoder.weight", None)
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    shapes = sorted(k for k in set(ref) & set(state) if tuple(ref[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(
            f"converted weights do not fit {model_cls.__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {shapes[:5]} (transformers version?)"
        )


def _write_head(model: TriModalModel, cfg: Config, modality: str, out: Path, pooling: str) -> dict:
    head = model.heads[modality]
    _save_tensors(head.state_dict(), out / HEAD_WEIGHTS)
    linear1, linear2 = head.net[0], head.net[3]
    info = {
        "in_dim": linear1.in_features,
        "hidden_dim": linear1.out_features,
        "out_dim": linear2.out_features,
        "formula": "normalize(net.3(gelu(net.0(pooled))))  # gelu = exact (erf) GELU, normalize = L2",
        "pooling": pooling,
        "normalize": "l2",
    }
    (out / HEAD_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _write_sequence(model: TriModalModel, cfg: Config, out: Path) -> dict:
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    out.mkdir()
    esm = model.sequence_encoder.esm
    alphabet = model.sequence_encoder.alphabet
    state, tied = esm2_to_hf(esm.state_dict())
    max_length = cfg.model.sequence.max_length
    config = EsmConfig(
        vocab_size=esm.embed_tokens.num_embeddings,
        mask_token_id=alphabet.mask_idx,
        pad_token_id=alphabet.padding_idx,
        eos_token_id=alphabet.eos_idx,
        hidden_size=esm.embed_dim,
        num_hidden_layers=esm.num_layers,
        num_attention_heads=esm.attention_heads,
        intermediate_size=esm.layers[0].fc1.out_features if esm.num_layers else 4 * esm.embed_dim,
        max_position_embeddings=max(1026, max_length + 2),
        hidden_dropout_prob=0.0,  # fair-esm's ESM2 has no dropout
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=esm.emb_layer_norm_after.eps,
        position_embedding_type="rotary",
        emb_layer_norm_before=False,
        token_dropout=bool(esm.token_dropout),
        tie_word_embeddings=tied,
    )
    config.architectures = ["EsmForMaskedLM"]
    _check_keys(EsmForMaskedLM, config, state, tied)
    _save_tensors(state, out / MODEL_FILE)
    config.save_pretrained(out)
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(alphabet.all_toks))
    # model_max_length: truncation=True keeps the first max_length residues, as the project crops.
    EsmTokenizer(vocab_file=str(vocab), model_max_length=max_length + 2).save_pretrained(out)
    head = _write_head(model, cfg, "sequence", out, "mean over residue positions (not <cls>, <eos>, <pad>)")
    arch = {"layers": esm.num_layers, "hidden_size": esm.embed_dim, "heads": esm.attention_heads}
    return {**arch, "max_residues": max_length, "head": head}


def _write_text(model: TriModalModel, cfg: Config, out: Path) -> dict:
    out.mkdir()
    bert = model.text_encoder.bert
    bert.save_pretrained(out)
    tokenizer = build_tokenizer(cfg.model.text)  # the export's own vocabulary (load_exported points there)
    tokenizer.model_max_length = cfg.model.text.max_length  # truncation=True cuts where training did
    tokenizer.save_pretrained(out)
    if not (
        out / "vocab.txt"
    ).is_file():  # transformers 5 writes tokenizer.json only; older readers want the WordPiece list
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        (out / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab))
    pooling = cfg.model.text.pooling
    described = "[CLS] token (position 0)" if pooling == "cls" else "mean over non-padding tokens"
    head = _write_head(model, cfg, "text", out, described)
    c = bert.config
    arch = {"layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "heads": c.num_attention_heads}
    return {
        **arch,
        "vocab_size": c.vocab_size,
        "max_tokens": cfg.model.text.max_length,
        "pooling": pooling,
        "head": head,
    }


def _write_structure(model: TriModalModel, cfg: Config, out: Path) -> dict:
    out.mkdir()
    encoder = model.structure_encoder
    _save_tensors(encoder.state_dict(), out / MODEL_FILE)
    config = {
        "format": STRUCTURE_FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": dataclasses.asdict(cfg.model.structure),
        "output_dim": encoder.output_dim,
        # what the featurisation (pretrain.data.collate.BatchBuilder, evaluation mode) reads besides
        # the encoder's own k_neighbors / num_rbf / num_positional
        "featurize": {"max_residues": cfg.model.sequence.max_length, "min_plddt": cfg.data.min_plddt},
        "reader": "data_shards.readers.structures.read_structure(path, plddt='auto')",
        "load_with": "pretrain.api.load_structure_encoder(dir)",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    head = _write_head(model, cfg, "structure", out, "mean over graph nodes (StructureEncoder)")
    return {"max_residues": cfg.model.sequence.max_length, "min_plddt": cfg.data.min_plddt, "head": head}


def _logit_scales(model: TriModalModel, cfg: Config) -> dict:
    """The contrastive temperature as trained (raw log value) and as used (clamped, exponentiated); with
    per-term scales (``loss.temperature``) or SigLIP biases (``loss.kind: sigmoid``) those too, by name."""
    raw = float(model.log_logit_scale.detach().float().reshape(-1)[0])
    out = {
        "log_logit_scale": raw,
        "logit_scale": math.exp(min(raw, math.log(cfg.model.max_logit_scale))),
        "max_logit_scale": cfg.model.max_logit_scale,
    }
    others = {
        k: (v.float().tolist() if v.numel() > 1 else float(v.float().reshape(-1)[0]))
        for k, v in model.state_dict().items()
        if k.endswith("log_logit_scale") and k != "log_logit_scale"
    }
    if others:  # objective heads (ProtCLIP's PDA) keep scales of their own; their modules are not exported
        out["other_log_logit_scales"] = others
    term_scales = getattr(model, "term_temperature", None)  # loss.temperature per_pair / per_term
    if term_scales is not None:
        used = term_scales()["term_logit_scale"].detach().float().reshape(-1).tolist()
        out["term_logit_scales"] = dict(zip(term_scales.names, used))  # as used: clamped, exponentiated
    siglip = getattr(model, "siglip", None)  # loss.kind sigmoid: SigLIP's learned bias per term
    if siglip is not None:
        out["term_biases"] = dict(zip(siglip.terms, siglip.bias.detach().float().reshape(-1).tolist()))
    return out


def _run_dir_of(export_dir: Path) -> Path | None:
    """The run directory an export sits in (``RUN/export`` or ``RUN/export/best``, beside
    ``RUN/config.yaml``), else None."""
    export_dir = export_dir.resolve()
    if _is_best_of_an_export(export_dir):
        export_dir = export_dir.parent
    parent = export_dir.parent
    return parent if export_dir.name == "export" and (parent / "config.yaml").is_file() else None


def _selection(export_dir: Path | str) -> dict | None:
    """The record a best export was written from (its ``best.json``: metric, mode, step, tag, score),
    or None for an export that is not a selected best."""
    from data_shards import storage

    return best_checkpoint.read_record(storage.join(export_dir, best_checkpoint.RECORD_IN_EXPORT))


def export_hf(export_dir: Path | str, out_dir: Path | str | None = None, *, run_dir: Path | str | None = None) -> Path:
    """Write the transformers / safetensors directories and the model card of an export.

    Args:
        export_dir: the export (``RUN/export``: ``model.safetensors`` + ``config.yaml``), a path or URL.
        out_dir: where to write (replaced as a whole if it exists); default :func:`default_out_dir`
            (required for a URL).
        run_dir: the run the export came from, for the model card (``eval.json``, ``metrics.jsonl``,
            the DeepSpeed config and checkpoint records); default: the export's parent when the export
            is ``RUN/export`` of a run directory.

    Returns:
        The output directory.

    Raises:
        FileNotFoundError, ConfigError, ExportError, ValueError: as :func:`load_exported`; ValueError
        also when the weights do not fit transformers' classes.
    """
    from data_shards import storage

    is_url = storage.is_url(export_dir)
    if is_url and out_dir is None:
        raise ValueError(f"{export_dir} is a URL: give out_dir (--out)")
    export_path = None if is_url else Path(export_dir)
    model, cfg = load_exported(export_dir)
    selection = _selection(export_dir)
    if run_dir is None and export_path is not None:
        run_dir = _run_dir_of(export_path)
    out = Path(out_dir) if out_dir is not None else default_out_dir(export_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier call of this process id
    tmp.mkdir()
    try:
        parts = {
            "sequence": _write_sequence(model, cfg, tmp / "sequence"),
            "text": _write_text(model, cfg, tmp / "text"),
            "structure": _write_structure(model, cfg, tmp / "structure"),
        }
        info = {
            "format": "align-pro-hf",
            "format_version": FORMAT_VERSION,
            "source_export": str(export_dir),
            "export_step": export_step(export_dir),
            "embed_dim": cfg.model.embed_dim,
            "modalities": parts,
            **_logit_scales(model, cfg),
        }
        if selection is not None:  # the best checkpoint by validation (RUN/export/best/best.json)
            info["selection"] = selection
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        from pretrain.model_card import model_card

        (tmp / "README.md").write_text(model_card(cfg, info, Path(run_dir) if run_dir is not None else None))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is swapped out first and then removed."""
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def run_exports(run_dir: Path | str, which: str | None = None) -> list[tuple[str, Path]]:
    """The exports of a run directory to convert: ``("last", RUN/export)`` and/or ``("best", RUN/export/best)``.

    ``which``: ``last``, ``best`` or ``both``; None: both when the run has a best export, else the last.

    Raises:
        FileNotFoundError: an export asked for is not there (the message says how it is written).
        ValueError: ``which`` is not one of :data:`WHICH`.
    """
    run_dir = Path(run_dir)
    if which is not None and which not in WHICH:
        raise ValueError(f"--which {which!r}: expected one of {WHICH}")
    last, best = run_dir / "export", run_dir / "export" / best_checkpoint.EXPORT_SUBDIR
    has_best = (best / "config.yaml").is_file()
    which = which or ("both" if has_best else "last")
    if which in ("last", "both") and not (last / "config.yaml").is_file():
        hint = (
            " (it has checkpoints: python -m pretrain.export --run-dir RUN first)"
            if (run_dir / "checkpoints").is_dir()
            else ""
        )
        raise FileNotFoundError(f"no export in {run_dir}{hint}")
    if which in ("best", "both") and not has_best:
        raise FileNotFoundError(
            f"no best export {best} (written from the checkpoint RUN/{best_checkpoint.FILE} pins, by the "
            "trainer's export or python -m pretrain.export --run-dir RUN; a run pins one only when it validates: "
            "train.validate_every, at steps that get a checkpoint)"
        )
    return [(name, path) for name, path in (("last", last), ("best", best)) if which in (name, "both")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.hf_export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run-dir", help="run directory: its export/ (and export/best) is converted, its eval.json feeds the card"
    )
    src.add_argument("--export", help="export directory or URL (model.safetensors + config.yaml)")
    p.add_argument(
        "--which",
        choices=WHICH,
        default=None,
        help="with --run-dir: the last export (RUN/export -> RUN/export_hf), the best by validation "
        "(RUN/export/best -> RUN/export_best_hf) or both (default: both when the run has a best; "
        "with --out: last)",
    )
    p.add_argument("--out", default=None, help="output directory (default: <export>_hf beside the export)")
    args = p.parse_args(argv)
    try:
        if args.export is not None:
            if args.which is not None:
                raise ValueError("--which applies to --run-dir (--export names the one export to convert)")
            jobs = [(None, args.export)]
        else:
            if args.out is not None and args.which == "both":
                raise ValueError("--out names one directory: --which last or --which best")
            # --out without --which: the last export, as before there were best exports
            jobs = run_exports(args.run_dir, args.which or ("last" if args.out is not None else None))
        for _, export_dir in jobs:
            out = export_hf(export_dir, args.out, run_dir=args.run_dir)
            print(f"wrote {out}")
    except (OSError, ValueError) as e:  # ConfigError and ExportError are ValueErrors
        print(f"align-pro hf_export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
