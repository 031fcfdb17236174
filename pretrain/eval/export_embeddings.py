"""``python -m pretrain.eval.export_embeddings --model EXPORT --shards DIR --modality M --out DIR``.

Writes, for each requested modality ``M`` (``sequence``, ``structure``, ``text`` or ``all``),
``OUT/<M>.npy``: float32 (N, E) unit-norm embeddings in manifest order (rows of proteins that lack
the modality are zeros), filled batch by batch into a memory-mapped file so N is not bounded by
memory; plus

* ``OUT/ids.json``: the N protein ids in row order ("" for an unreadable sample);
* ``OUT/index.parquet``: ``row``, ``id``, ``present_<M>`` per modality, ``text`` (the canonical
  function text, shown by ``pretrain.search`` results);
* ``OUT/meta.json``: model, shards, modalities, embedding dimension, N.

Those files are what :class:`pretrain.search.SearchIndex` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_shards.text_rules import canonical_text
from pretrain.cli_types import positive_int
from pretrain.engine.export import check_device, load_exported
from pretrain.eval.embed import count_samples, iter_embedded_batches, resolve_device
from pretrain.models.trimodal import MODALITIES


def export_embeddings(
    export_dir: str | Path,
    shard_dir: str | Path,
    out_dir: str | Path,
    modalities=MODALITIES,
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    device: str = "auto",
) -> dict:
    """Embed ``shard_dir`` with the exported model and write the index files into ``out_dir``.

    Returns the ``meta.json`` content.
    """
    modalities = tuple(modalities)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    n = count_samples(shard_dir, max_samples)  # before the model: a wrong --shards fails fast
    if n == 0:
        raise ValueError(f"shard set {shard_dir} holds no samples")
    model, cfg = load_exported(export_dir, device=resolve_device(device))  # a path or a URL
    bs = batch_size or cfg.eval.batch_size
    out.mkdir(parents=True, exist_ok=True)
    dim = model.cfg.embed_dim
    arrays = {
        m: np.lib.format.open_memmap(out / f"{m}.npy", mode="w+", dtype=np.float32, shape=(n, dim)) for m in modalities
    }
    present = {m: np.zeros(n, dtype=bool) for m in modalities}
    ids: list[str] = []
    texts: list[str] = []
    batches = iter_embedded_batches(model, cfg, shard_dir, bs, max_samples, modalities)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-n // bs), desc="embed", unit="batch", file=sys.stderr)
    row = 0
    for records, emb, pres in batches:
        b = len(records)
        for m in modalities:
            arrays[m][row : row + b] = emb[m]
            present[m][row : row + b] = pres[m]
        ids.extend(r.id if r is not None else "" for r in records)
        texts.extend(canonical_text(r.text) if r is not None and r.text else "" for r in records)
        row += b
    for a in arrays.values():
        a.flush()
    del arrays
    (out / "ids.json").write_text(json.dumps(ids))
    columns = {"row": pa.array(np.arange(n, dtype=np.int64)), "id": pa.array(ids, pa.string())}
    columns.update({f"present_{m}": pa.array(present[m]) for m in modalities})
    columns["text"] = pa.array(texts, pa.string())
    pq.write_table(pa.table(columns), out / "index.parquet")
    meta = {
        "model": str(export_dir),
        "shards": str(shard_dir),
        "modalities": list(modalities),
        "embed_dim": dim,
        "num_rows": n,
        "present": {m: int(present[m].sum()) for m in modalities},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.eval.export_embeddings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="export directory or URL (model.safetensors + config.yaml)")
    p.add_argument("--shards", required=True, help="shard directory with manifest.json")
    p.add_argument("--modality", default="all", choices=(*MODALITIES, "all"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--max-samples", type=positive_int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda if available)")
    args = p.parse_args(argv)
    modalities = MODALITIES if args.modality == "all" else (args.modality,)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        check_device(resolve_device(args.device))
        meta = export_embeddings(
            args.model,
            args.shards,
            args.out,
            modalities,
            batch_size=args.batch_size,
            max_samples=args.max_samples,
            progress=not args.no_progress,
            device=args.device,
        )
    except (OSError, ValueError) as e:  # FileNotFoundError, ConfigError, ExportError, ManifestError, ...
        print(f"align-pro export_embeddings: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
