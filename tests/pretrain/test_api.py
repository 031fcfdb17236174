"""pretrain.api: the embedding API gives the rows pretrain.eval.export_embeddings writes (the space
pretrain.search searches), for sequences, texts and real PDB / mmCIF files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.readers.structures import StructureError
from pretrain.api import load_model, load_structure_encoder
from pretrain.eval.embed import read_annotations
from pretrain.eval.export_embeddings import main as export_embeddings_main
from tests.conftest import SHARED_DATA
from tests.pretrain.eval.tiny import build_corpus, build_export

STRUCTURES = SHARED_DATA / "structures"
# mmCIF (1 chain), gzipped PDB with 2 chains of 247 residues (cut to the recipe's 200), a foldseek
# SCOP domain without extension, an AlphaFold model (pLDDT: data.min_plddt=70 drops residues)
REAL_FILES = ("biopython/1A8O.cif.gz", "foldseek/1tim.pdb.gz", "foldseek/d1itha_.gz")
ATOL = 1e-5  # other batch compositions (padding) change float rounding, nothing else


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("api_corpus"))


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("api_run")
    build_export(corpus, run / "export", seed=2)
    return run


def _export_embeddings(model: Path, shards: Path, out: Path, modality: str = "all") -> dict:
    args = ["--model", str(model), "--shards", str(shards), "--out", str(out), "--no-progress"]
    assert export_embeddings_main([*args, "--modality", modality, "--batch-size", "16", "--device", "cpu"]) == 0
    return {m: np.load(out / f"{m}.npy") for m in ("sequence", "structure", "text") if (out / f"{m}.npy").is_file()}


def test_api_reproduces_export_embeddings_rows(run_dir, corpus, tmp_path):
    rows = _export_embeddings(run_dir / "export", corpus / "heldout", tmp_path / "emb")
    ann = read_annotations(corpus / "heldout")
    model = load_model(run_dir)  # the run directory stands for its export
    seq_rows = [i for i, s in enumerate(ann.sequences) if s]
    text_rows = [i for i, t in enumerate(ann.texts) if t]
    assert len(seq_rows) > 40 and len(text_rows) > 40
    seqs = model.embed_sequences([ann.sequences[i] for i in seq_rows], batch_size=7)
    texts = model.embed_texts([ann.texts[i] for i in text_rows], batch_size=5)
    assert seqs.dtype == np.float32 and seqs.shape == (len(seq_rows), model.embed_dim)
    np.testing.assert_allclose(seqs, rows["sequence"][seq_rows], rtol=0, atol=ATOL)
    np.testing.assert_allclose(texts, rows["text"][text_rows], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(seqs, axis=1), 1.0, atol=1e-5)
    # input order is kept whatever the batching: the same inputs reversed give the rows reversed
    np.testing.assert_allclose(
        model.embed_sequences([ann.sequences[i] for i in seq_rows[::-1]], batch_size=64), seqs[::-1], atol=ATOL
    )


def test_load_model_accepts_export_and_run_directories(run_dir, tmp_path):
    a, b = load_model(run_dir), load_model(run_dir / "export", device="auto")
    seqs = ["mktayiakqr", "MSTNPKPQRK"]  # case is ignored, as in the shards
    np.testing.assert_array_equal(a.embed_sequences(seqs), b.embed_sequences([s.upper() for s in seqs]))
    assert a.embed_texts([]).shape == (0, a.embed_dim)
    assert a.logit_scale == pytest.approx(float(a.model.logit_scale().detach()))
    assert a.temperatures == {"shared": pytest.approx(1.0 / a.logit_scale)}  # loss.temperature: shared
    with pytest.raises(ValueError, match="empty"):
        a.embed_sequences(["MKT", " "])
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="CUDA device"):
        load_model(run_dir, device="cuda:7")


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    """A few real structure files and the shards the builder makes of them."""
    if not all((STRUCTURES / f).is_file() for f in REAL_FILES):
        pytest.skip(f"shared structures not present under {STRUCTURES}")
    from data_shards.build import BuildConfig, build_shards

    root = tmp_path_factory.mktemp("api_real")
    files = root / "files"
    files.mkdir()
    for src in [STRUCTURES / f for f in REAL_FILES] + sorted((SHARED_DATA / "alphafold").glob("AF-*.pdb.gz"))[:1]:
        shutil.copyfile(src, files / src.name)
    summary = build_shards(BuildConfig(out=root / "shards", structures=[str(files)], workers=1))
    assert summary["ok"], summary
    return files, root / "shards"


@pytest.fixture(scope="module")
def plddt_export(corpus, tmp_path_factory):
    """The tiny export with data.min_plddt=70, so the AlphaFold model loses residues as in training."""
    from pretrain.config import load_config
    from pretrain.engine.export import write_export
    from pretrain.models.trimodal import TriModalModel
    from tests.pretrain.eval.tiny import TINY_MODEL

    cfg = load_config(None, [*TINY_MODEL, "data.min_plddt=70", f"data.train_shards={corpus / 'train'}"])
    torch.manual_seed(4)
    return write_export(TriModalModel(cfg.model).state_dict(), cfg, tmp_path_factory.mktemp("api_plddt") / "export")


def test_embed_structures_matches_the_shard_path(real_shards, plddt_export, tmp_path):
    files, shards = real_shards
    rows = _export_embeddings(plddt_export, shards, tmp_path / "emb")
    ann = read_annotations(shards)
    items = [(files / Path(meta["structure_file"]).name, meta["chain"]) for meta in ann.meta]
    assert len(items) >= 5 and any(m["source"] == "alphafold" for m in ann.meta)
    model = load_model(plddt_export)
    structs = model.embed_structures(items, batch_size=2)
    np.testing.assert_allclose(structs, rows["structure"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(model.embed_sequences(ann.sequences), rows["sequence"], rtol=0, atol=ATOL)
    # the hf_export structure folder embeds files the same way
    from pretrain.hf_export import export_hf

    embedder = load_structure_encoder(export_hf(plddt_export, tmp_path / "hf") / "structure")
    np.testing.assert_allclose(embedder.embed_structures(items, batch_size=3), structs, rtol=0, atol=ATOL)
    # a file with one protein chain needs no chain id
    single = next(p for p in files.iterdir() if p.name.startswith("1A8O"))
    np.testing.assert_allclose(model.embed_structures([single]), model.embed_structures([(single, "A")]), atol=0)


def test_embed_structures_refuses_what_it_cannot_pick(real_shards, run_dir, tmp_path):
    files, _ = real_shards
    model = load_model(run_dir)
    two_chains = files / "1tim.pdb.gz"
    with pytest.raises(ValueError, match="protein chains A, B"):
        model.embed_structures([two_chains])
    with pytest.raises(ValueError, match="no protein chain 'Q'"):
        model.embed_structures([(two_chains, "Q")])
    junk = tmp_path / "junk.pdb"
    junk.write_text("<html>not a structure</html>\n")
    with pytest.raises(StructureError, match="junk.pdb"):
        model.embed_structures([junk])


def test_load_structure_encoder_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_structure_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not an align-pro GVP-GNN"):
        load_structure_encoder(tmp_path)


@pytest.mark.parametrize("mode", ["per_term", "per_pair"])
def test_reports_the_temperatures_the_loss_used(corpus, tmp_path, mode):
    """Under loss.temperature per_term / per_pair the terms' own learned scales are reported (the shared
    scale, which per_term never trains, only where some term used it)."""
    from pretrain.config import load_config
    from pretrain.engine.builder import build_model
    from pretrain.engine.export import write_export
    from pretrain.losses.align_pro import SCALE_NAMES
    from tests.pretrain.eval.tiny import TINY_MODEL

    cfg = load_config(None, [*TINY_MODEL, f"loss.temperature={mode}", f"data.train_shards={corpus / 'train'}"])
    torch.manual_seed(5)
    model = build_model(cfg, load_pretrained=False)
    names = SCALE_NAMES[mode]
    trained = torch.linspace(0.02, 0.09, len(names), dtype=torch.float64)  # each term's learned temperature
    with torch.no_grad():
        model.term_temperature.log_logit_scale.copy_(torch.log(1.0 / trained))
    api = load_model(write_export(model.state_dict(), cfg, tmp_path / "export"))
    want = dict(zip(names, trained.tolist()))
    if mode == "per_pair":  # the intra-modal terms keep the shared scale
        want["shared"] = cfg.model.init_temperature
    assert api.temperatures == pytest.approx(want, rel=1e-6)
    assert api.logit_scale == pytest.approx(1.0 / cfg.model.init_temperature, rel=1e-6)  # the shared one, untrained
