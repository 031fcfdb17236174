"""The ``README.md`` model card of a :mod:`pretrain.hf_export` directory, written from the run's own files.

Every figure is copied from a file and says which: the recipe (``config.yaml`` of the export), the
export step (its safetensors metadata), ranks and ZeRO stage (``RUN/config.yaml``'s DeepSpeed section,
the latest checkpoint's ``COMPLETE`` record), the last logged loss and validation (``RUN/metrics.jsonl``),
the training data (the shard manifest, when it can be read from here) and the evaluation
(``RUN/eval.json``). The card of the best checkpoint by validation (``RUN/export/best``) names its
step, selection metric and score (``best/best.json``, copied into ``align_pro.json`` as ``selection``)
and reports no ``RUN/eval.json`` figures: that file evaluates the last export, other weights. What no
file records is written as "not recorded", never estimated.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.config import Config

_NOT_RECORDED = "not recorded"
_LICENCE_KEYS = ("licenses", "licences", "license", "licence")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _front_matter(licence: str) -> str:
    tags = ["protein", "contrastive-learning", "esm2", "bert", "gvp-gnn", "align-pro"]
    return (
        "---\nlibrary_name: transformers\nlicense: "
        + licence
        + "\ntags:\n"
        + "".join(f"- {t}\n" for t in tags)
        + "---\n"
    )


def _recipe(cfg: Config, info: dict) -> list[str]:
    m, loss, optim, train, data = cfg.model, cfg.loss, cfg.optim, cfg.train, cfg.data
    s, st, t = m.sequence, m.structure, m.text
    seq, text = info["modalities"]["sequence"], info["modalities"]["text"]
    seq_init = f"from `{Path(s.weights).name}`" if s.weights else "random initialisation"
    text_init = f"from `{Path(t.pretrained_dir).name}`" if t.pretrained_dir else "random initialisation"
    if loss.objective == "align_pro":
        objective = (
            f"align_pro: alpha/beta/gamma (seq-struct / seq-text / struct-text) {loss.alpha}/{loss.beta}/{loss.gamma}, "
            f"intra-modal seq/struct/text {loss.intra_seq}/{loss.intra_struct}/{loss.intra_text}, "
            f"false negatives: {loss.false_negatives}"
        )
    else:
        objective = loss.objective
    return [
        "| part | setting (from the export's config.yaml) |",
        "| --- | --- |",
        f"| sequence encoder | ESM-2 (preset `{s.preset}`): layers {seq['layers']}, width {seq['hidden_size']}, "
        f"heads {seq['heads']}, {seq_init}; at most {s.max_length} residues |",
        f"| structure encoder | GVP-GNN: layers {st.num_layers}, node channels {list(st.node_hidden)}, edge channels "
        f"{list(st.edge_hidden)}, {st.k_neighbors}-NN graph |",
        f"| text encoder | BERT: layers {text['layers']}, width {text['hidden_size']}, heads {text['heads']}, "
        f"vocabulary {text['vocab_size']}, {text_init}; {t.pooling} pooling; at most {t.max_length} tokens |",
        f"| projection heads | 2-layer MLP to {m.embed_dim} dimensions "
        f"(hidden {m.head_hidden_dim or 'encoder width'}) |",
        f"| objective | {objective} |",
        f"| optimisation | AdamW lr {optim.lr} (encoders {optim.encoder_lr}), weight decay {optim.weight_decay}, "
        f"warm-up {optim.warmup_steps} steps; {train.max_steps} steps planned, the first {train.stage1_steps} with "
        f"frozen encoders; batch {data.batch_size} per rank; precision {train.precision}; seed {train.seed} |",
    ]


def _scales_sentence(cfg: Config, info: dict) -> str:
    """What the loss's learned scales (and SigLIP biases) ended at, as ``align_pro.json`` records them."""
    terms = info.get("term_logit_scales")
    if not terms:
        text = f"The learned logit scale is {info['logit_scale']:.4g} (`align_pro.json`)."
    else:
        named = ", ".join(f"{name} {scale:.4g}" for name, scale in terms.items())
        per_term = cfg.loss.temperature == "per_term"
        text = f"The loss learned one logit scale per {'term' if per_term else 'pair'}: {named}"
        if per_term:  # the shared scale stays at its init: no term reads it
            shared = info["logit_scale"]
            text += f" (`align_pro.json` `term_logit_scales`; the shared `logit_scale` {shared:.4g} was not used)."
        else:
            text += f"; the intra-modal terms used the shared scale {info['logit_scale']:.4g} (`align_pro.json`)."
    if info.get("term_biases"):
        biases = ", ".join(f"{name.removeprefix('loss_')} {b:.4g}" for name, b in info["term_biases"].items())
        text += f" Loss: SigLIP's pairwise sigmoid with a learned bias per term ({biases})."
    return text


def _selected(sel: dict) -> str:
    """One sentence naming the selected checkpoint's step, metric and score."""
    better = "higher" if sel["mode"] == "max" else "lower"
    return (
        f"the best checkpoint by validation: step {sel['step']} (checkpoint `{sel['tag']}`), "
        f"`{sel['metric']}` = {_fmt(float(sel['score']))} ({better} is better)"
    )


def _training(info: dict, run_dir: Path | None) -> list[str]:
    step = info.get("export_step")
    sel = info.get("selection")
    lines = [f"- Weights from training step: {step if step is not None else _NOT_RECORDED} (export metadata)."]
    if sel is not None:
        lines.append(f"- Selected as {_selected(sel)} (the export's `best.json`).")
    if run_dir is None:
        lines.append(
            "- Run directory: not available when the card was written; ranks, losses and hardware not reported."
        )
        return lines
    ds = None
    try:
        import yaml

        ds = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("deepspeed")
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(ds, dict):
        zero = (ds.get("zero_optimization") or {}).get("stage")
        bf16 = (ds.get("bf16") or {}).get("enabled")
        lines.append(f"- DeepSpeed (RUN/config.yaml): ZeRO stage {_fmt(zero)}, bf16 {_fmt(bf16)}.")
    world = _checkpoint_world_size(run_dir)
    lines.append(f"- Ranks (latest checkpoint record): {world if world is not None else _NOT_RECORDED}.")
    lines.append(f"- Hardware (device model, count): {_NOT_RECORDED} by the run.")
    rows = _metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r.get("loss") is not None]
    if train_rows:
        last = train_rows[-1]
        lines.append(
            f"- Last logged training loss (RUN/metrics.jsonl): {_fmt(last['loss'])} at step {last.get('step')}."
        )
    val_rows = [r for r in rows if any(k.startswith("val/") for k in r)]
    if val_rows:
        last = val_rows[-1]
        lines.append(f"- Last validation (RUN/metrics.jsonl, step {last.get('step')}): {_val_figures(last)}.")
    at_best = [r for r in val_rows if sel is not None and r.get("step") == sel["step"]]
    if at_best and at_best[-1] is not val_rows[-1]:
        lines.append(
            f"- Validation of these weights (RUN/metrics.jsonl, step {sel['step']}): {_val_figures(at_best[-1])}."
        )
    return lines


def _val_figures(row: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k.startswith("val/") and isinstance(v, float))


def _checkpoint_world_size(run_dir: Path) -> int | None:
    from pretrain.engine.checkpoint_tags import complete_record, latest_tag

    ckpt = run_dir / "checkpoints"
    tag = latest_tag(ckpt) if ckpt.is_dir() else None
    if tag is None:
        return None
    try:
        return complete_record(ckpt / tag)["world_size"]
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _manifest(where: str) -> tuple[object | None, str | None]:
    from data_shards.manifest import load_manifest

    try:
        return load_manifest(where), None
    except Exception as e:  # noqa: BLE001 - any storage / format error: the card says it could not be read
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def _data(cfg: Config) -> tuple[list[str], list[str]]:
    """Data lines and the licence values any manifest records."""
    lines, licences = [], []
    for label, where in (("training", cfg.data.train_shards), ("evaluation", cfg.data.eval_shards)):
        manifest, error = _manifest(where)
        if manifest is None:
            lines.append(f"- {label} shards `{where}`: manifest not readable where this card was written ({error}).")
            continue
        extra = manifest.extra or {}
        mods = ", ".join(f"{k} {v}" for k, v in manifest.modalities.items())
        lines.append(
            f"- {label} shards `{where}`: {manifest.num_samples} proteins in {len(manifest.shards)} shard(s); "
            f"with each modality: {mods} (manifest.json)."
        )
        details = []
        for key in ("generator", "split", "split_key", "num_families"):
            if extra.get(key) is not None:
                details.append(f"{key}: {extra[key]}")
        sources = (extra.get("coverage") or {}).get("sources")
        if sources:
            details.append("sources: " + ", ".join(f"{k} {v}" for k, v in sources.items()))
        inputs = extra.get("inputs")
        if isinstance(inputs, dict) and inputs:
            details.append("inputs: " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in inputs.items()))
        if details:
            lines.append("  " + "; ".join(details) + ".")
        for key in _LICENCE_KEYS:
            if extra.get(key):
                licences.append(f"{label} shards: {json.dumps(extra[key])}")
    return lines, licences


def _evaluation(run_dir: Path | None, export_dir: str, selection: dict | None = None) -> list[str]:
    path = run_dir / "eval.json" if run_dir is not None else None
    ev = _read_json(path) if path is not None and path.is_file() else None
    if ev is None:
        return ["No evaluation file (RUN/eval.json) was found for this export: no figures are reported."]
    if selection is not None:
        from pretrain.engine.export import export_step

        last = export_step(run_dir / "export")
        return [
            f"`RUN/eval.json` evaluates the run's last export (`RUN/export`, step "
            f"{last if last is not None else _NOT_RECORDED}), not these weights (step {selection['step']}): its "
            "figures are not reported here. Evaluate this export with "
            "`python -m pretrain.eval --model RUN/export/best`."
        ]
    lines = [f"From `RUN/eval.json`: {ev.get('num_proteins')} proteins of `{ev.get('shards')}`."]
    weights = Path(export_dir) / "model.safetensors"
    try:
        if path.stat().st_mtime < weights.stat().st_mtime:
            lines.append(
                "**Warning:** eval.json is older than the exported weights; its figures may belong to earlier weights."
            )
    except OSError:
        pass
    directions = (ev.get("retrieval") or {}).get("directions") or {}
    rows = [(name, d) for name, d in directions.items() if d.get("n")]
    if rows:
        ks = sorted({int(k[2:]) for _, d in rows for k in d if k.startswith("R@") and k[2:].isdigit()})
        lines += ["", "Retrieval (exact pair; chance = k / n):", ""]
        lines.append(
            "| direction | n | " + " | ".join(f"R@{k}" for k in ks) + " | chance R@" + str(ks[-1]) + " | median rank |"
        )
        lines.append("| --- " * (len(ks) + 4) + "|")
        for name, d in rows:
            cells = [_fmt(d.get(f"R@{k}")) for k in ks]
            chance = _fmt(d.get(f"chance_R@{ks[-1]}"))
            rank = d.get("median_rank")
            rank = f"{rank:g}" if isinstance(rank, float) else _fmt(rank)
            lines.append(f"| {name} | {d['n']} | " + " | ".join(cells) + f" | {chance} | {rank} |")
    tasks = dict(ev.get("function") or {})
    if ev.get("fold"):
        tasks["fold"] = ev["fold"]
    if tasks:
        lines += [
            "",
            "Function prediction:",
            "",
            "| task | method | Fmax | AUPR | accuracy | n |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for task, d in tasks.items():
            if not isinstance(d, dict):
                continue
            if d.get("skipped"):
                lines.append(f"| {task} | skipped: {d['skipped']} | | | | |")
            for method, m in (d.get("methods") or {}).items():
                n = m.get("n_with_input", m.get("n"))
                cells = [_fmt(m.get(k)) for k in ("fmax", "aupr", "accuracy")] + [_fmt(n)]
                lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return lines


def _usage(info: dict) -> list[str]:
    text_pool = info["modalities"]["text"]["pooling"]
    text_pooled = "h[:, 0]" if text_pool == "cls" else "(h * m).sum(1) / m.sum(1).clamp_min(1)"
    return [
        "```python",
        "import torch, torch.nn.functional as F",
        "from safetensors.torch import load_file",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        "def _head(d):  # the projection head into the shared space, then L2 normalisation",
        '    w = load_file(f"{d}/projection_head.safetensors")',
        '    hidden = lambda x: F.gelu(F.linear(x, w["net.0.weight"], w["net.0.bias"]))',
        '    return lambda x: F.normalize(F.linear(hidden(x), w["net.3.weight"], w["net.3.bias"]), dim=-1)',
        "",
        "@torch.no_grad()",
        "def embed_sequences(hf_dir, seqs):  # one-letter, upper case",
        '    d = f"{hf_dir}/sequence"',
        "    tok, esm = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()",
        '    b = tok(seqs, return_tensors="pt", padding=True, truncation=True)',
        "    h = esm(**b).last_hidden_state",
        "    special = torch.tensor([tok.cls_token_id, tok.eos_token_id, tok.pad_token_id])",
        '    m = (~torch.isin(b["input_ids"], special)).unsqueeze(-1).float()',
        "    return _head(d)((h * m).sum(1) / m.sum(1).clamp_min(1))",
        "",
        "@torch.no_grad()",
        "def embed_texts(hf_dir, texts):",
        '    d = f"{hf_dir}/text"',
        "    tok, bert = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()",
        '    b = tok(texts, return_tensors="pt", padding=True, truncation=True, return_token_type_ids=False)',
        '    h, m = bert(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1).float()',
        f"    return _head(d)({text_pooled})",
        "```",
    ]


def model_card(cfg: Config, info: dict, run_dir: Path | None) -> str:
    """The model card text.

    Args:
        cfg: the export's recipe.
        info: the ``align_pro.json`` content written by :func:`pretrain.hf_export.export_hf`.
        run_dir: the run directory (eval.json, metrics.jsonl, checkpoints), or None.
    """
    data_lines, licences = _data(cfg)
    seq, text = info["modalities"]["sequence"], info["modalities"]["text"]
    sel = info.get("selection")
    chosen = (
        ["", f"These are the weights of {_selected(sel)}; the run's last weights are exported separately.", ""]
        if sel is not None
        else [""]
    )
    out = [
        _front_matter("other" if licences else "unknown"),
        "# align-pro tri-modal protein embeddings",
        "",
        "Three encoders trained CLIP-style with align-pro to put a protein's amino-acid "
        "**sequence** (ESM-2), **structure** (GVP-GNN on the N/CA/C/O backbone) and **function text** (BERT) "
        f"into one {info['embed_dim']}-dimensional space of unit vectors: a cosine between any two of them "
        "scores how well they match.",
        *chosen,
        "## Files",
        "",
        "| path | what | load with |",
        "| --- | --- | --- |",
        "| `sequence/` | ESM-2 weights, config, tokenizer (EsmForMaskedLM layout) | `AutoModel` (EsmModel), "
        "`AutoModelForMaskedLM`, `AutoTokenizer` |",
        "| `text/` | BERT weights, config, tokenizer | `AutoModel` (BertModel), `AutoTokenizer` |",
        "| `structure/` | GVP-GNN weights and config (no transformers class exists) | "
        "`pretrain.api.load_structure_encoder` |",
        "| `*/projection_head.safetensors`, `.json` | the 2-layer head into the shared space | the code below |",
        "| `align_pro.json` | export step, embedding width, logit scale, pooling per modality"
        + (", the selection (metric, mode, step, score)" if sel is not None else "")
        + " | json |",
        "",
        "## Use",
        "",
        f"With transformers alone (sequence: mean of the last hidden states over residues; text: {text['pooling']} "
        "pooling; then the head and L2 normalisation):",
        "",
        *_usage(info),
        "",
        "With this project (all three modalities, structures parsed from PDB / mmCIF files as the shard builder "
        "does; numpy float32 arrays, unit rows):",
        "",
        "```python",
        "from pretrain.api import load_model",
        (
            'model = load_model("RUN/export/best")  # these weights'
            if sel is not None
            else 'model = load_model("RUN/export")  # or the run directory'
        ),
        'z = model.embed_sequences(["MKTAYIAKQR"]) @ model.embed_texts(["ATP binding"]).T',
        "```",
        "",
        f"{_scales_sentence(cfg, info)} The pooler of "
        "`AutoModel` is not part of the trained model (transformers initialises it at random) and must not be used.",
        "",
        "## Training recipe",
        "",
        *_recipe(cfg, info),
        "",
        "## Training run",
        "",
        *_training(info, run_dir),
        "",
        "## Data",
        "",
        *data_lines,
        "",
        "## Licences",
        "",
        *(
            [f"- {line}" for line in licences]
            if licences
            else [
                "The shard manifests record no licence for their inputs: the licence of the training data, and so "
                "of these weights, is **unknown**. Check the licences of the inputs listed under Data before "
                "redistributing."
            ]
        ),
        "",
        "## Evaluation",
        "",
        *_evaluation(run_dir, info["source_export"], sel),
        "",
        "## Intended use and limits",
        "",
        "- Intended: research use; retrieval between proteins and function descriptions, nearest-neighbour search, "
        "features for probes (GO / EC / fold), measured against the figures above on data like the training data.",
        "- Not a validated predictor: do not use it for clinical, diagnostic or safety decisions.",
        f"- Sequences longer than {seq['max_residues']} residues (and structures with more residues) are cut to "
        f"their first {seq['max_residues']}; texts to {text['max_tokens']} tokens. Sequences must be upper case "
        "one-letter codes (the project upper-cases them; the transformers tokenizer maps lower case to `<unk>`).",
        "- Pass the attention mask to the transformers models: ESM-2 and BERT attend to padding without it.",
        *(
            [f"- The modules only the `{cfg.loss.objective}` objective trains on top of the encoders are not included."]
            if cfg.loss.objective != "align_pro"
            else []
        ),
        "- Figures from a small or synthetic training set do not carry over to other proteins; the embeddings "
        "reflect the training data's biases (organisms, experimental structures, annotation coverage).",
        "",
    ]
    return "\n".join(out)
