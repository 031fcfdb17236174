import numpy as np
import pytest

from pretrain.engine.export import load_exported
from pretrain.eval.embed import Annotations, embed_texts
from pretrain.eval.function import FunctionSettings, evaluate_function
from pretrain.eval.zeroshot import ec_dashed, ec_prompt, go_prompt, load_ec_names, zero_shot_scores


def test_prompts():
    assert go_prompt("kinase activity", "F") == "A protein with kinase activity."
    assert go_prompt("ATP binding", "F") == "A protein with ATP binding activity."
    assert go_prompt("DNA repair", "P") == "A protein involved in DNA repair."
    assert go_prompt("nucleus", "C") == "A protein located in the nucleus."
    assert ec_dashed("2.7.") == "2.7.-.-" and ec_dashed("2.7.11.1") == "2.7.11.1"
    assert ec_prompt("2.7.", "Transferring phosphorus-containing groups.") == (
        "A protein with Transferring phosphorus-containing groups activity. Enzyme class EC 2.7.-.-."
    )
    assert ec_prompt("3.") == "A protein of enzyme class EC 3.-.-.-."


def test_load_ec_names(tmp_path):
    path = tmp_path / "ec.tsv"
    path.write_text(
        "id\tEC_number\thier1\thier2\thier3\tname\tcomment\talter_name\n"
        "0\t4.2.1.10\tLyases.\tCarbon-oxygen lyases.\tHydro-lyases.\t3-dehydroquinate dehydratase.\t\t\n"
    )
    names = load_ec_names(path)
    assert names == {
        "4.2.1.10": "3-dehydroquinate dehydratase.",
        "4.": "Lyases.",
        "4.2.": "Carbon-oxygen lyases.",
        "4.2.1.": "Hydro-lyases.",
    }


def test_zero_shot_scores_min_max():
    p = np.array([[1, 0], [0, 1]], np.float32)
    t = np.array([[1, 0], [0.6, 0.8], [-1, 0]], np.float32)
    s = zero_shot_scores(p, t)
    np.testing.assert_allclose(s, [[1.0, 0.8, 0.0], [0.0, 1.0, 0.0]], atol=1e-6)


def _emb(vectors, go_lists, sequences):
    ann = Annotations()
    ann.go, ann.ec, ann.sequences = go_lists, [[] for _ in go_lists], sequences
    ann.ids = [f"P{i}" for i in range(len(go_lists))]
    ann.meta = [{} for _ in go_lists]
    n = len(go_lists)
    return {
        "ids": ann.ids,
        "annotations": ann,
        "sequence": vectors,
        "structure": vectors,
        "present_sequence": np.ones(n, bool),
        "present_structure": np.arange(n) > 0,  # protein 0 has no structure
    }


def test_zero_shot_recovers_labels_when_embeddings_match_prompts():
    names = ["kinase activity", "ligase activity", "isomerase activity"]
    basis = {go_prompt(n, "F"): np.eye(3, dtype=np.float32)[i] for i, n in enumerate(names)}
    terms = [{"id": f"GO:000000{i}", "aspect": "F", "name": n} for i, n in enumerate(names)]
    labels = [0, 1, 2, 1]
    test = _emb(np.eye(3, dtype=np.float32)[labels], [[terms[j]] for j in labels], ["AAA"] * 4)
    settings = FunctionSettings(methods=frozenset({"zeroshot"}))
    out = evaluate_function(None, test, {"go"}, settings, embed_text=lambda texts: np.stack([basis[t] for t in texts]))
    mf = out["GO-MF"]
    assert mf["n_test"] == 4 and mf["n_labels"] == 3
    assert mf["methods"]["zeroshot/sequence"]["fmax"] == 1.0
    # the protein without a structure gets no prediction but still counts in recall
    z = mf["methods"]["zeroshot/structure"]
    assert z["n_with_input"] == 3 and z["recall"] == pytest.approx(0.75) and z["precision"] == 1.0
    assert out["GO-BP"]["skipped"] == "no held-out protein has a label"


def test_embed_texts_on_a_tiny_model(tiny_export):
    model, cfg = load_exported(tiny_export)
    texts = ["A protein with kinase activity.", "A protein involved in DNA repair.", "x"]
    e = embed_texts(model, cfg, texts, batch_size=2)
    assert e.shape == (3, cfg.model.embed_dim) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embed_texts(model, cfg, texts[:1]), e[:1], atol=1e-5)  # padding-invariant
    assert embed_texts(model, cfg, []).shape == (0, cfg.model.embed_dim)
