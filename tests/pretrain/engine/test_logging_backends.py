import json
import sys
import types

import pytest

from pretrain.engine.logging_backends import MetricsLogger


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log({"step": 1, "loss": 2.5, "lr": 1e-3, "stage": 1})
        logger.log({"step": 2, "loss": float("nan"), "val/mean_R@10": 0.25, "note": "text"})
        with pytest.raises(ValueError, match="step"):
            logger.log({"loss": 1.0})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "loss": 2.5, "lr": 1e-3, "stage": 1},
        {"step": 2, "loss": None, "val/mean_R@10": 0.25, "note": "text"},  # strict JSON: NaN -> null
    ]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", rank=1)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_wandb_mirror_and_resume_id(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb=True, config={"a": 1})
    logger.log({"step": 5, "loss": 1.5, "val/mean_R@1": 0.1})
    logger.close()
    init = calls[0][1]
    assert init["id"] == "abc123" and init["resume"] == "allow" and init["config"] == {"a": 1}
    assert calls[1] == ("log", {"train/loss": 1.5, "val/mean_R@1": 0.1}, 5)
    assert calls[2] == ("finish",)
    assert (tmp_path / "wandb_id.txt").read_text().strip() == "abc123"
    fake.util.generate_id = lambda: "other"
    MetricsLogger(tmp_path, tensorboard=False, wandb=True).close()
    assert calls[3][1]["id"] == "abc123"  # a resumed run continues the same W&B run


def test_wandb_missing_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb=True)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert (tmp_path / "metrics.jsonl").is_file()
