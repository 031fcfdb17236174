import json

import numpy as np
import pytest

from pretrain.search import SearchIndex, _faiss, main


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute(emb, q, k, valid=None):
    s = q @ emb.T
    if valid is not None:
        s[:, ~valid] = -np.inf
    rows = np.stack([np.lexsort((np.arange(len(emb)), -row))[:k] for row in s])
    return np.take_along_axis(s, rows, 1), rows


@pytest.mark.parametrize("block_rows", [1, 97, 65_536])
def test_blocked_search_equals_brute_force(block_rows):
    rng = np.random.default_rng(0)
    emb, q = _unit(rng.normal(size=(1000, 16))), _unit(rng.normal(size=(5, 16)))
    index = SearchIndex(emb, [f"P{i}" for i in range(1000)], block_rows=block_rows, backend="exact")
    scores, rows = index.search(q, 10)
    ref_s, ref_r = _brute(emb, q, 10)
    np.testing.assert_array_equal(rows, ref_r)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5)
    assert index.ids_of(rows[0])[0] == f"P{ref_r[0, 0]}"


def test_k_larger_than_n_valid_rows_and_ties():
    emb = np.array([[1, 0], [1, 0], [0, 1], [-1, 0], [1, 0]], np.float32)
    valid = np.array([True, True, True, True, False])
    index = SearchIndex(emb, list("abcde"), valid, block_rows=2, backend="exact")
    scores, rows = index.search(np.array([[1, 0]], np.float32), 50)
    assert rows.tolist() == [[0, 1, 2, 3]]  # row 4 is invalid; ties by lower row
    np.testing.assert_allclose(scores, [[1, 1, 0, -1]])
    assert index.search(np.array([1, 0], np.float32), 0)[1].shape == (1, 0)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros((1, 3), np.float32), 1)


@pytest.mark.parametrize("block_rows", [1, 5, 97, 65_536])
def test_ties_at_the_cut_off_keep_the_lowest_rows(block_rows):
    """Identical embeddings (identical texts, identical sequences) tie exactly; the rows returned
    must be the lowest tied ones whatever the block size (argpartition alone kept any of them)."""
    rng = np.random.default_rng(0)
    base = rng.integers(-2, 3, size=(40, 8)).astype(np.float32)  # integer dot products: exact in any block shape
    emb = base[rng.integers(0, 40, 3000)]
    q = 4 * base[:3] + base[3:6]
    index = SearchIndex(emb, [str(i) for i in range(3000)], block_rows=block_rows, backend="exact")
    for k in (1, 10, 50, 100):
        scores, rows = index.search(q, k)
        ref_s, ref_r = _brute(emb, q, k)
        np.testing.assert_array_equal(rows, ref_r)
        np.testing.assert_allclose(scores, ref_s, rtol=1e-5)


def test_load_memory_maps_and_faiss_optional(tmp_path):
    rng = np.random.default_rng(1)
    emb = _unit(rng.normal(size=(30, 8)))
    np.save(tmp_path / "sequence.npy", emb)
    (tmp_path / "ids.json").write_text(json.dumps([f"P{i}" for i in range(30)]))
    index = SearchIndex.load(tmp_path, "sequence", block_rows=7, backend="exact")
    assert isinstance(index.embeddings, np.memmap) and index.valid is None
    _, rows = index.search(emb[3], 1)
    assert rows.tolist() == [[3]]
    with pytest.raises(FileNotFoundError):
        SearchIndex.load(tmp_path, "structure")
    if _faiss() is None:
        with pytest.raises(ValueError, match="faiss"):
            SearchIndex(emb, list(range(30)), backend="faiss")
    else:  # the FAISS path must agree with the exact one
        fs, fr = SearchIndex(emb, list(range(30)), backend="faiss").search(emb[:4], 5)
        es, er = SearchIndex(emb, list(range(30)), backend="exact").search(emb[:4], 5)
        np.testing.assert_array_equal(fr, er)


@pytest.fixture(scope="module")
def text_index(tmp_path_factory):
    from pretrain.eval.export_embeddings import export_embeddings
    from tests.pretrain.eval.tiny import build_corpus, build_export

    root = tmp_path_factory.mktemp("search")
    corpus = build_corpus(root / "corpus")
    export = build_export(corpus, root / "export")
    export_embeddings(export, corpus / "heldout", root / "index", max_samples=24, progress=False)
    return root / "index", export


def test_cli_text_to_protein_and_protein_to_text(text_index, capsys):
    index_dir, export = text_index
    ids = json.loads((index_dir / "ids.json").read_text())
    assert (
        main(
            [
                "kinase that phosphorylates histone H3",
                "--index",
                str(index_dir),
                "--model",
                str(export),
                "-k",
                "5",
                "--backend",
                "exact",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "structure" and len(out["results"]) == 5
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert all(r["id"] in ids for r in out["results"]) and out["results"][0]["text"]
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert main(["--protein-id", ids[3], "--index", str(index_dir), "-k", "100", "--backend", "exact"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "sequence" and len(out["results"]) == 24  # k capped at the index size
    # the protein -> text scores are the cosine of the stored embeddings
    seq, text = np.load(index_dir / "sequence.npy"), np.load(index_dir / "text.npy")
    best = out["results"][0]
    assert best["score"] == pytest.approx(float(seq[3] @ text[best["row"]]), abs=1e-5)


def test_cli_errors(text_index, capsys):
    index_dir, export = text_index
    assert main(["--protein-id", "NOPE", "--index", str(index_dir)]) == 2
    assert main(["a query", "--index", str(index_dir)]) == 2  # no --model
    assert main(["--index", str(index_dir)]) == 2  # no query at all
    assert capsys.readouterr().err.count("error") == 3
