"""Text -> protein and protein -> text search over exported embeddings.

    python -m pretrain.search "ATP-dependent DNA helicase" --index EMB_DIR --model EXPORT [-k 10]
        [--target structure|sequence]
    python -m pretrain.search --protein-id P12345 --index EMB_DIR [--source sequence|structure]
        [--text-index EMB_DIR2] [-k 10]

``EMB_DIR`` is written by ``python -m pretrain.eval.export_embeddings``. A text query is embedded
with the export's text encoder and searched against the index's protein embeddings; a protein
query takes its own embedding from the index and searches the text embeddings (of
``--text-index``, default the same index). Results are printed as JSON: rank, id, score (cosine)
and, where the index has it, the protein's canonical text.

:class:`SearchIndex` does an exact top-k by inner product over a memory-mapped ``.npy`` in blocks
of 65,536 rows (so the index may exceed memory), or uses FAISS ``IndexFlatIP`` when ``faiss`` is
importable and ``backend`` allows it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pretrain.cli_types import positive_int

BLOCK_ROWS = 65_536


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class SearchIndex:
    """Exact inner-product top-k over an (N, E) embedding matrix.

    Args:
        embeddings: (N, E) float32 array or memmap (unit-norm rows give cosine scores).
        ids: the N row ids.
        valid: (N,) bool, rows that may be returned (e.g. proteins that have the modality); None: all.
        block_rows: rows per block of the exact search.
        backend: "auto" (FAISS when importable, else exact), "exact" or "faiss".
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: list[str],
        valid: np.ndarray | None = None,
        *,
        block_rows: int = BLOCK_ROWS,
        backend: str = "auto",
    ):
        if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
            raise ValueError(f"embeddings {embeddings.shape} and {len(ids)} ids do not match")
        if backend not in ("auto", "exact", "faiss"):
            raise ValueError(f"backend {backend!r}: expected 'auto', 'exact' or 'faiss'")
        if backend == "faiss" and _faiss() is None:
            raise ValueError("backend 'faiss' requested but faiss is not installed")
        self.embeddings = embeddings
        self.ids = list(ids)
        self.valid = None if valid is None else np.asarray(valid, dtype=bool)
        self.block_rows = block_rows
        self.backend = "faiss" if backend == "faiss" or (backend == "auto" and _faiss() is not None) else "exact"
        self._faiss_index = None
        self._faiss_rows = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def load(cls, index_dir: str | Path, modality: str, **kwargs) -> SearchIndex:
        """Open ``<index_dir>/<modality>.npy`` memory-mapped, with ids and presence from the index.

        Raises:
            FileNotFoundError: the directory, the ``.npy`` or ``ids.json`` is missing.
            ValueError: a file of the index is damaged or they disagree; the message names the file.
        """
        d = Path(index_dir)
        if not d.is_dir():
            raise FileNotFoundError(
                f"index directory {d} does not exist (write it with pretrain.eval.export_embeddings)"
            )
        path = d / f"{modality}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"no {modality} embeddings in {d} (expected {path.name})")
        try:
            emb = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # truncated, another format, a pickle
            raise ValueError(f"{path}: not a readable .npy embedding matrix ({e})") from None
        if emb.ndim != 2:
            raise ValueError(f"{path}: expected an (N, E) matrix, got shape {emb.shape}")
        ids_path = d / "ids.json"
        if not ids_path.is_file():
            raise FileNotFoundError(f"no ids.json in {d}")
        try:
            ids = json.loads(ids_path.read_text())
        except ValueError as e:  # not JSON, not UTF-8
            raise ValueError(f"{ids_path}: not valid JSON ({e})") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{ids_path}: expected a JSON list of protein id strings")
        if len(ids) != emb.shape[0]:
            raise ValueError(f"{ids_path} lists {len(ids)} ids but {path} has {emb.shape[0]} rows")
        valid = None
        if (d / "index.parquet").is_file():
            table = _read_parquet(d / "index.parquet")
            if table.num_rows != len(ids):
                raise ValueError(f"{d / 'index.parquet'} has {table.num_rows} rows but {ids_path} lists {len(ids)} ids")
            if f"present_{modality}" in table.column_names:
                valid = table.column(f"present_{modality}").to_numpy(zero_copy_only=False)
        return cls(emb, ids, valid, **kwargs)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product, best first; ties broken by the lower row.

        Shapes:
            queries (Q, E) -> scores (Q, k'), rows (Q, k') with k' = min(k, number of valid rows)
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"query dimension {q.shape[1]} differs from the index's {self.embeddings.shape[1]}")
        n_valid = len(self) if self.valid is None else int(self.valid.sum())
        k = max(0, min(int(k), n_valid))
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.backend == "faiss":
            return self._search_faiss(q, k)
        return self._search_exact(q, k)

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_r = np.zeros((len(q), 0), np.int64)
        for start in range(0, len(self), self.block_rows):
            block = np.asarray(self.embeddings[start : start + self.block_rows], dtype=np.float32)
            s = q @ block.T  # (Q, b)
            if self.valid is not None:
                s[:, ~self.valid[start : start + len(block)]] = -np.inf
            part = _first_best(s, min(k, s.shape[1]))
            cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
            cand_r = np.concatenate([best_r, part + start], 1)
            best_s, best_r = _top(cand_s, cand_r, k)
        return best_s, best_r

    def _search_faiss(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if self._faiss_index is None:
            index = faiss.IndexFlatIP(self.embeddings.shape[1])
            rows = []
            for start in range(0, len(self), self.block_rows):
                block = np.ascontiguousarray(self.embeddings[start : start + self.block_rows], dtype=np.float32)
                keep = np.arange(start, start + len(block))
                if self.valid is not None:
                    mask = self.valid[start : start + len(block)]
                    block, keep = np.ascontiguousarray(block[mask]), keep[mask]
                index.add(block)
                rows.append(keep)
            self._faiss_index, self._faiss_rows = index, np.concatenate(rows)
        scores, pos = self._faiss_index.search(q, k)
        return _top(scores.astype(np.float32), self._faiss_rows[pos], k)

    def ids_of(self, rows: np.ndarray) -> list[str]:
        return [self.ids[int(r)] for r in rows]


def _first_best(s: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best scores of each row of ``s`` (Q, b), lower columns first among ties.

    ``argpartition`` alone keeps an arbitrary subset of the scores tied at the cut-off, which
    would make the rows returned depend on ``block_rows``; here every score above the k-th best
    is kept, then the lowest columns tied with it. O(b) per row, no sort. Returns (Q, k), ascending.
    """
    if k >= s.shape[1]:
        return np.tile(np.arange(s.shape[1]), (len(s), 1))
    s = np.where(np.isnan(s), -np.inf, s)  # a NaN score (a broken embedding) ranks last, never breaks the count
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]  # (Q, 1) the k-th best score
    above, tied = s > kth, s == kth
    keep = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
    return np.nonzero(keep)[1].reshape(len(s), k)


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best per query row, sorted by score desc then row asc; -inf candidates are dropped last."""
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _read_parquet(path: Path):
    """``index.parquet`` as a pyarrow table; ValueError naming the file when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:  # truncated, not parquet
        raise ValueError(f"{path}: not a readable parquet table ({' '.join(str(e).split())})") from None


def _texts(index_dir: Path) -> list[str] | None:
    path = index_dir / "index.parquet"
    if not path.is_file():
        return None
    table = _read_parquet(path)
    return table.column("text").to_pylist() if "text" in table.column_names else None


def _results(index: SearchIndex, scores, rows, texts) -> list[dict]:
    out = []
    for rank, (s, r) in enumerate(zip(scores, rows), 1):
        item = {"rank": rank, "id": index.ids[int(r)], "row": int(r), "score": round(float(s), 6)}
        if texts is not None:
            item["text"] = texts[int(r)]
        out.append(item)
    return out


def search_text(
    query: str, index_dir: Path, export_dir: Path | str, target: str, k: int, backend: str = "auto"
) -> dict:
    """Embed ``query`` with the export's text encoder; top-k proteins by ``target`` embedding."""
    from pretrain.engine.export import load_exported
    from pretrain.eval.embed import embed_texts, resolve_device

    index = SearchIndex.load(index_dir, target, backend=backend)  # before the model: a wrong --index fails fast
    model, cfg = load_exported(export_dir, device=resolve_device("auto"))
    q = embed_texts(model, cfg, [query])
    scores, rows = index.search(q, k)
    return {
        "query": query,
        "target": target,
        "backend": index.backend,
        "results": _results(index, scores[0], rows[0], _texts(index_dir)),
    }


def search_protein(protein_id: str, index_dir: Path, source: str, text_index_dir: Path, k: int, backend="auto") -> dict:
    """The protein's ``source`` embedding from ``index_dir`` against the texts of ``text_index_dir``."""
    proteins = SearchIndex.load(index_dir, source, backend="exact")
    try:
        row = proteins.ids.index(protein_id)
    except ValueError:
        raise ValueError(f"protein id {protein_id!r} is not in {index_dir}") from None
    if proteins.valid is not None and not proteins.valid[row]:
        raise ValueError(f"protein {protein_id!r} has no {source} embedding in {index_dir}")
    texts = SearchIndex.load(text_index_dir, "text", backend=backend)
    scores, rows = texts.search(np.asarray(proteins.embeddings[row : row + 1], dtype=np.float32), k)
    return {
        "protein_id": protein_id,
        "source": source,
        "backend": texts.backend,
        "results": _results(texts, scores[0], rows[0], _texts(text_index_dir)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("query", nargs="?", help="free-text query (text -> protein)")
    p.add_argument("--protein-id", help="protein query (protein -> text) instead of a text query")
    p.add_argument("--index", required=True, help="embedding directory from pretrain.eval.export_embeddings")
    p.add_argument("--model", help="export directory (needed for a text query)")
    p.add_argument(
        "--target",
        choices=("structure", "sequence"),
        help="protein embeddings searched (default: structure if indexed)",
    )
    p.add_argument("--source", choices=("sequence", "structure"), default="sequence", help="protein query embedding")
    p.add_argument("--text-index", help="text embeddings searched by --protein-id (default: --index)")
    p.add_argument("-k", type=positive_int, default=10, help="results per query (>= 1)")
    p.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto")
    args = p.parse_args(argv)
    index_dir = Path(args.index)
    try:
        if (args.query is None) == (args.protein_id is None):
            raise ValueError("give either a text query or --protein-id")
        if args.query is not None:
            if not args.model:
                raise ValueError("a text query needs --model (the export whose text encoder embeds it)")
            target = args.target or ("structure" if (index_dir / "structure.npy").is_file() else "sequence")
            result = search_text(args.query, index_dir, args.model, target, args.k, args.backend)  # path or URL
        else:
            result = search_protein(
                args.protein_id, index_dir, args.source, Path(args.text_index or index_dir), args.k, args.backend
            )
    except (OSError, ValueError) as e:  # FileNotFoundError, ConfigError, ExportError (a damaged --model), ...
        print(f"align-pro search: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
