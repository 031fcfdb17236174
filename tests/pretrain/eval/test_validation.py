import pytest

from data_shards import storage
from pretrain.engine.export import load_exported
from pretrain.eval import validation
from pretrain.eval.validation import validate_model
from tests.s3_server import s3  # noqa: F401 - the fixture


def test_validate_model_keys_mode_and_cache(tiny_export, tiny_corpus):
    model, cfg = load_exported(tiny_export)
    model.train()
    out = validate_model(model, cfg, tiny_corpus / "heldout", max_samples=32, batch_size=16)
    assert model.training  # mode restored
    assert out["val/num_proteins"] == 32
    for k in (1, 5, 10):
        assert 0.0 <= out[f"val/mean_R@{k}"] <= 1.0
    assert {f"val/{d}/R@10" for d in ("seq->struct", "text->seq")} <= set(out)
    assert all(isinstance(v, (int, float)) for v in out.values())
    again = validate_model(model, cfg, tiny_corpus / "heldout", max_samples=32, batch_size=16)
    # cached batches, eval mode (no dropout): identical numbers
    assert {k: v for k, v in again.items() if k != "val/time_s"} == {k: v for k, v in out.items() if k != "val/time_s"}
    model.eval()
    other = validate_model(model, cfg, tiny_corpus / "heldout", max_samples=32, batch_size=16, prefix="v_")
    assert not model.training and other["v_mean_R@1"] == pytest.approx(out["val/mean_R@1"])


def test_the_batch_cache_tells_data_settings_apart(tiny_export, tiny_corpus):
    _, cfg = load_exported(tiny_export)
    first = validation._batches(cfg, tiny_corpus / "heldout", 16, 16)
    assert validation._batches(cfg, tiny_corpus / "heldout", 16, 16) is first
    cfg.data.min_plddt = 70.0  # reshapes the structure graphs of predicted models
    assert validation._batches(cfg, tiny_corpus / "heldout", 16, 16) is not first


def test_validate_model_reads_held_out_shards_from_s3(tiny_export, tiny_corpus, s3):  # noqa: F811
    """The same numbers from an S3 copy of the held-out shards; the batch cache is keyed by the URL
    itself (a Path would fold s3:// into s3:/ and resolve it against the working directory)."""
    model, cfg = load_exported(tiny_export)
    model.eval()
    url = s3.url("validation", "heldout")
    storage.upload_dir(tiny_corpus / "heldout", url)
    local = validate_model(model, cfg, tiny_corpus / "heldout", max_samples=32, batch_size=16)
    remote = validate_model(model, cfg, url, max_samples=32, batch_size=16)
    assert {k: v for k, v in remote.items() if k != "val/time_s"} == {
        k: v for k, v in local.items() if k != "val/time_s"
    }
    assert any(key[0] == url for key in validation._CACHE)


def test_validation_zero_shot_fmax_equals_the_evaluation_commands(tiny_export, tiny_corpus, tmp_path):
    """``eval.validation_zeroshot``: the same zero-shot Fmax as ``python -m pretrain.eval --tasks zeroshot``
    on the same proteins (prompts from the proteins' own GO names and EC classes)."""
    from pretrain.eval.__main__ import evaluate_export

    model, cfg = load_exported(tiny_export)
    model.eval()
    cfg.eval.validation_zeroshot = ["ec", "go_mf"]
    out = validate_model(model, cfg, tiny_corpus / "heldout", max_samples=32, batch_size=16)
    ref = evaluate_export(
        tiny_export, str(tiny_corpus / "heldout"), 32, tasks="zeroshot", train_shards=str(tmp_path / "none")
    )["function"]
    for task, name in (("ec", "EC"), ("go_mf", "GO-MF")):
        for modality, suffix in (("sequence", ""), ("structure", "/structure")):
            want = ref[name]["methods"][f"zeroshot/{modality}"]["fmax"]
            assert out[f"val/zeroshot_fmax_{task}{suffix}"] == pytest.approx(want, abs=1e-6), (task, modality)
    assert 0.0 < out["val/zeroshot_fmax_ec"] <= 1.0
    assert "val/zeroshot_fmax_go_bp" not in out


def test_validator_notes_the_selection_metric_on_the_model(tiny_export, tiny_corpus):
    from pretrain.eval.validation import validator_for

    model, cfg = load_exported(tiny_export)
    cfg.data.eval_shards = str(tiny_corpus / "heldout")
    cfg.eval.validation_samples = 16
    cfg.eval.select_metric, cfg.eval.select_mode = "val/mean_R@5", "max"
    out = validator_for(cfg)(model)
    note = model._align_pro_validation
    assert (note["metric"], note["mode"], note["score"]) == ("val/mean_R@5", "max", out["val/mean_R@5"])
    cfg.eval.select_metric = "val/absent"
    with pytest.raises(KeyError, match="eval.select_metric='val/absent'"):
        validator_for(cfg)(model)
