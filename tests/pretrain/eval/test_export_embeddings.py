import json

import numpy as np
import pyarrow.parquet as pq

from pretrain.engine.export import load_exported
from pretrain.eval.embed import embed_shards
from pretrain.eval.export_embeddings import main


def test_export_all_modalities_matches_embed_shards(tiny_export, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "emb"
    rc = main(
        [
            "--model",
            str(tiny_export),
            "--shards",
            str(tiny_corpus / "heldout"),
            "--modality",
            "all",
            "--out",
            str(out),
            "--batch-size",
            "20",
            "--no-progress",
        ]
    )
    assert rc == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["num_rows"] == 48 and meta["modalities"] == ["sequence", "structure", "text"]
    model, cfg = load_exported(tiny_export)
    ref = embed_shards(model, cfg, tiny_corpus / "heldout", 20)
    ids = json.loads((out / "ids.json").read_text())
    assert ids == ref["ids"]
    table = pq.read_table(out / "index.parquet")
    assert table.column("id").to_pylist() == ids and table.column("row").to_pylist() == list(range(48))
    assert table.column("text").to_pylist() == ref["annotations"].texts
    for m in ("sequence", "structure", "text"):
        arr = np.load(out / f"{m}.npy", allow_pickle=False)
        assert arr.dtype == np.float32 and arr.shape == (48, cfg.model.embed_dim)
        np.testing.assert_allclose(arr, ref[m], atol=1e-6)
        np.testing.assert_array_equal(table.column(f"present_{m}").to_numpy(), ref[f"present_{m}"])


def test_export_one_modality_and_errors(tiny_export, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "text_only"
    rc = main(
        [
            "--model",
            str(tiny_export),
            "--shards",
            str(tiny_corpus / "heldout"),
            "--modality",
            "text",
            "--out",
            str(out),
            "--max-samples",
            "10",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["ids.json", "index.parquet", "meta.json", "text.npy"]
    assert np.load(out / "text.npy").shape[0] == 10
    assert main(["--model", str(tiny_export), "--shards", str(tmp_path / "nope"), "--out", str(out)]) == 2
