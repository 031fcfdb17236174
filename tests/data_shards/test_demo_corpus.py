"""The linked demo corpus (data_shards/demo_corpus.py): determinism, sizes, plausibility, and that
each modality alone predicts the family. ``small_demo`` (tests/conftest.py) holds 384 train and 96
held-out proteins of 32 families, seed 0."""

import collections

import numpy as np
import pytest

from data_shards.demo_corpus import build_demo_corpus, go_id
from data_shards.manifest import load_manifest
from data_shards.reader import iter_records

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def load(split_dir):
    return [r for s in load_manifest(split_dir).shards for r in iter_records(s.path)]


@pytest.fixture(scope="module")
def splits(small_demo):
    return load(small_demo / "train"), load(small_demo / "heldout")


def test_same_arguments_give_byte_identical_shards(tmp_path):
    kwargs = dict(num_train=40, num_heldout=16, samples_per_shard=16, num_families=4)
    first = build_demo_corpus(tmp_path / "a", seed=3, **kwargs)
    build_demo_corpus(tmp_path / "b", seed=3, **kwargs)
    build_demo_corpus(tmp_path / "c", seed=4, **kwargs)
    assert first["splits"]["train"]["num_shards"] == 3 and first["splits"]["heldout"]["num_samples"] == 16
    for split in ("train", "heldout"):
        a, b, c = (load_manifest(tmp_path / d / split) for d in "abc")
        assert (a.dir / "manifest.json").read_bytes() == (b.dir / "manifest.json").read_bytes()
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
        assert all(x.path.read_bytes() == y.path.read_bytes() for x, y in zip(a.shards, b.shards))
        assert not {s.sha256 for s in a.shards} & {s.sha256 for s in c.shards}
        assert a.extra == {"split": split, "seed": 3, "generator": "demo_corpus v1", "num_families": 4}
    before = (tmp_path / "a" / "train" / "manifest.json").read_bytes()
    build_demo_corpus(tmp_path / "a", seed=3, **kwargs)  # rebuilding in place replaces the shards
    assert (tmp_path / "a" / "train" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir())[-1] == "shard-000002.tar"


def test_sizes_ids_and_metadata(small_demo, splits):
    train, heldout = splits
    manifest = load_manifest(small_demo / "train")
    assert manifest.num_samples == 384 and len(manifest.shards) == 8
    assert [r.id for r in train] == [f"DEMO_TR_{i:06d}" for i in range(384)]
    assert [r.id for r in heldout] == [f"DEMO_HO_{i:06d}" for i in range(96)]
    assert set(collections.Counter(r.meta["family"] for r in train).values()) == {12}  # balanced
    assert {r.meta["family"] for r in heldout} == {f"FAM{i:03d}" for i in range(32)}
    assert not {r.sequence for r in train} & {r.sequence for r in heldout}  # distinct samples
    assert all(r.modalities() == {"sequence", "structure", "text"} for r in heldout)
    assert 0.85 < np.mean([len(r.modalities()) == 3 for r in train]) < 1.0  # ~5% miss one
    for r in train + heldout:
        assert r.meta["subfamily"].startswith(r.meta["family"] + "-")
        assert 1 <= r.meta["evidence"] <= 5 and r.meta["organism"]
        assert 60 <= len(r.sequence) <= 160
        if r.backbone is not None:
            assert (r.backbone.plddt is not None) == (r.meta["source"] == "demo-predicted")
    predicted = np.mean([r.meta["source"] == "demo-predicted" for r in train])
    assert 0.35 < predicted < 0.65
    masks = np.concatenate([r.backbone.atom_mask.all(1) for r in train if r.backbone is not None])
    assert 0.002 < 1 - masks.mean() < 0.04  # a few residues miss atoms


def test_text_fields_are_varied_but_family_specific(splits):
    train, _ = splits
    texts = [r.text for r in train if r.text is not None and r.meta["family"] == "FAM005"]
    assert len({t["name"] for t in texts}) > 1 and len({t["function"] for t in texts}) > 1
    for t in texts:
        assert all(term["id"] == go_id(term["name"]) for term in t["go"])
        assert {term["aspect"] for term in t["go"]} <= {"F", "P", "C"}
    terms = {(term["id"], term["name"]) for r in train if r.text for term in r.text["go"]}
    assert len({i for i, _ in terms}) == len(terms)  # one id per term name
    similarity = {t["similarity"].split(" family")[0].split()[-1] for t in texts}
    assert len(similarity) <= 2  # "Belongs to the <Root> family" or "... superfamily. <Root> family."


def test_backbone_geometry_is_plausible(splits):
    train, _ = splits
    n_ca, ca_c, c_o, c_n, angles, ca_ca = [], [], [], [], [], []
    for r in train[:100]:
        if r.backbone is None:
            continue
        x, ok = r.backbone.coords.astype(float), r.backbone.atom_mask.all(1)
        n, ca, c, o = x[:, 0], x[:, 1], x[:, 2], x[:, 3]
        n_ca.append(np.linalg.norm(n - ca, axis=1)[ok])
        ca_c.append(np.linalg.norm(c - ca, axis=1)[ok])
        c_o.append(np.linalg.norm(c - o, axis=1)[ok])
        pair = ok[1:] & ok[:-1]
        c_n.append(np.linalg.norm(n[1:] - c[:-1], axis=1)[pair])
        ca_ca.append(np.linalg.norm(ca[1:] - ca[:-1], axis=1)[pair])
        u, v = (n - ca)[ok], (c - ca)[ok]
        cos = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
        angles.append(np.degrees(np.arccos(cos)))
    for values, ideal, tol in [(n_ca, 1.46, 0.05), (ca_c, 1.52, 0.05), (c_o, 1.23, 0.05), (c_n, 1.33, 0.05)]:
        assert abs(np.median(np.concatenate(values)) - ideal) < tol
    assert abs(np.median(np.concatenate(ca_ca)) - 3.8) < 0.1
    assert 100 < np.percentile(np.concatenate(angles), 5) and np.percentile(np.concatenate(angles), 95) < 128


def _nearest_centroid_accuracy(train, test, feature) -> float:
    x = np.array([feature(r) for r in train])
    y = np.array([r.meta["family"] for r in train])
    families = sorted(set(y))
    centroids = np.stack([x[y == f].mean(0) for f in families])
    xt = np.array([feature(r) for r in test])
    predicted = np.array(families)[((xt[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    return float((predicted == np.array([r.meta["family"] for r in test])).mean())


def _kmers(record):
    idx = np.array([AMINO.index(a) for a in record.sequence])
    counts = np.bincount(idx[:-2] * 400 + idx[1:-1] * 20 + idx[2:], minlength=8000).astype(float)
    return counts / np.linalg.norm(counts)


def _ca_distances(record):
    ca = record.backbone.coords[:, 1].astype(float)
    dist = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
    pairs = np.histogram(dist[np.triu_indices(len(ca), 2)], bins=np.arange(0, 60, 4))[0]
    local = [np.histogram(np.diagonal(dist, k), bins=np.arange(4, 15))[0] for k in (3, 4)]
    return np.concatenate([pairs / pairs.sum()] + [h / h.sum() for h in local] + [[len(ca) / 50]])


def test_each_modality_alone_predicts_the_family(splits):
    train, heldout = splits
    chance = 1 / 32
    seq = _nearest_centroid_accuracy(train, heldout, _kmers)
    with_structure = [r for r in train if r.backbone is not None]
    structure = _nearest_centroid_accuracy(with_structure, heldout, _ca_distances)
    with_text = [r for r in train if r.text is not None]
    vocab = {w: i for i, w in enumerate(sorted({w for r in with_text for w in _words(r)}))}

    def bag(record):
        v = np.zeros(len(vocab))
        for w in _words(record):
            if w in vocab:
                v[vocab[w]] += 1
        return v / max(np.linalg.norm(v), 1e-9)

    text = _nearest_centroid_accuracy(with_text, heldout, bag)
    assert seq > 0.8 and text > 0.8 and structure > 0.5, (seq, structure, text)
    assert min(seq, structure, text) > 10 * chance


def _words(record):
    t = record.text
    return " ".join([t["name"], t["function"], t["location"], t["similarity"]]).lower().split()
