import numpy as np
import pytest

from pretrain.eval.probes import ProbeConfig, load_probe, predict, save_probe, train_probe


def _clusters(n=60, seed=0):
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % 3
    centers = np.eye(3, 8) * 4.0
    x = (centers[cls] + rng.normal(size=(n, 8))).astype(np.float32)
    return x, cls


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_fits_separable_data_and_roundtrips(kind, tmp_path):
    x, cls = _clusters()
    cfg = ProbeConfig(kind=kind, steps=150, hidden=16)
    y = np.stack([cls == 0, cls != 0], 1)  # multi-label: "class 0" and "not class 0"
    probe = train_probe(x, y, cfg)
    scores = predict(probe, x)
    assert scores.shape == (60, 2) and ((scores > 0.5) == y).mean() > 0.95
    single = train_probe(x, cls, cfg, num_classes=3)
    assert (predict(single, x, multilabel=False).argmax(1) == cls).mean() > 0.95
    path = save_probe(tmp_path, "sequence", single, n_train=60)
    again, meta = load_probe(path)
    assert meta == {"n_train": 60}
    np.testing.assert_allclose(predict(again, x, multilabel=False), predict(single, x, multilabel=False), atol=1e-6)


def test_probe_training_is_deterministic():
    x, cls = _clusters(seed=1)
    cfg = ProbeConfig(kind="mlp", steps=20, hidden=8)
    a = predict(train_probe(x, cls, cfg, num_classes=3), x, multilabel=False)
    b = predict(train_probe(x, cls, cfg, num_classes=3), x, multilabel=False)
    np.testing.assert_array_equal(a, b)


def test_probe_rejects_unknown_kind():
    with pytest.raises(ValueError, match="probe kind"):
        train_probe(np.zeros((2, 2), np.float32), np.zeros((2, 1), bool), ProbeConfig(kind="svm"))
