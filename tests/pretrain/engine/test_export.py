"""The consolidated export (pretrain/export.py) stands on its own: no pretrained files needed to load it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from pretrain.config import load_config
from pretrain.engine.builder import build_model
from pretrain.engine.checkpoint_store import publish_export
from pretrain.engine.export import load_exported, write_export
from pretrain.models.text_encoder import DEMO_VOCAB, build_tokenizer, tokenize_texts
from pretrain.models.trimodal import TriModalModel
from tests.conftest import TINY_OVERRIDES
from tests.s3_server import s3  # noqa: F401 - the fixture

TEXTS = ["ATP binding protein kinase", "located in the mitochondrial membrane"]


def _bert_dir(directory: Path) -> None:
    """A local BERT directory of the demo recipe's text shape (weights, config, vocabulary)."""
    tok = build_tokenizer(dataclasses.replace(load_config().model.text, preset="pubmedbert-base"))
    config = BertConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    torch.manual_seed(5)
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)


def _embed_texts(model: TriModalModel, cfg) -> torch.Tensor:
    ids, mask = tokenize_texts(build_tokenizer(cfg.model.text), TEXTS, cfg.model.text.max_length)
    with torch.no_grad():
        return model.encode_text(ids, mask)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _pretrained_run(tmp_path: Path):
    """A model built from a pretrained text directory and an ESM-2 .pt, and its config."""
    bert = tmp_path / "pubmedbert"
    _bert_dir(bert)
    cfg = load_config(overrides=[*TINY_OVERRIDES, "model.text.num_layers=2", f"model.text.pretrained_dir={bert}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    esm = tmp_path / "esm2_tiny.pt"
    torch.save(model.sequence_encoder.esm.state_dict(), esm)
    cfg.model.sequence = dataclasses.replace(cfg.model.sequence, weights=str(esm))
    return model, cfg, [bert, esm]


def test_export_loads_without_the_pretrained_files_it_started_from(tmp_path, monkeypatch):
    model, cfg, sources = _pretrained_run(tmp_path)
    out = write_export(model.state_dict(), cfg, tmp_path / "export")
    names = {p.name for p in (out / "text").iterdir()}
    assert "config.json" in names and names & {"vocab.txt", "tokenizer.json"}
    assert not any("safetensors" in p.name or p.suffix == ".bin" for p in (out / "text").iterdir())
    want = _embed_texts(model, cfg)
    _remove(sources)  # another machine: neither the BERT directory nor the ESM-2 .pt is there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded, loaded_cfg = load_exported(out)
    assert Path(loaded_cfg.model.text.pretrained_dir) == (out / "text").resolve()
    torch.testing.assert_close(_embed_texts(loaded, loaded_cfg), want, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_export_carries_a_custom_vocabulary_file(tmp_path):
    vocab = tmp_path / "my_vocab.txt"
    shutil.copyfile(DEMO_VOCAB, vocab)
    cfg = load_config(overrides=[*TINY_OVERRIDES, f"model.text.vocab_file={vocab}"])
    model = build_model(cfg).eval()
    out = write_export(model.state_dict(), cfg, tmp_path / "export")
    want = _embed_texts(model, cfg)
    vocab.unlink()
    loaded, loaded_cfg = load_exported(out)
    assert loaded_cfg.model.text.vocab_file == str((out / "text" / "vocab.txt").resolve())
    torch.testing.assert_close(_embed_texts(loaded, loaded_cfg), want, rtol=0, atol=0)


def test_export_from_object_storage_brings_its_tokenizer(tmp_path, s3):  # noqa: F811
    model, cfg, sources = _pretrained_run(tmp_path)
    out = write_export(model.state_dict(), cfg, tmp_path / "export")
    url = publish_export(out, s3.url("run"))
    want = _embed_texts(model, cfg)
    _remove([*sources, out])
    loaded, loaded_cfg = load_exported(url)
    assert (Path(loaded_cfg.model.text.pretrained_dir) / "config.json").is_file()  # outlives the download
    torch.testing.assert_close(_embed_texts(loaded, loaded_cfg), want, rtol=0, atol=0)
    # another process loads it too: its tokenizer directory is gone once that process exits
    code = (
        "import sys; from pretrain.engine.export import load_exported; "
        "print(load_exported(sys.argv[1])[1].model.text.pretrained_dir)"
    )
    env = {**os.environ, **s3.env(), "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    done = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text_dir = Path(done.stdout.strip().splitlines()[-1])
    assert text_dir.name.startswith("align-pro-export-text-") and not text_dir.exists()


def _bf16_export_worker(rank: int, port: int, out: str, zero: int) -> None:
    """One gloo rank: a bf16 ZeRO engine trained 5 steps, exported, checkpointed."""
    from tests.spawn_ranks import join_group

    join_group(rank, 1, port)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.engine.export import export_engine
    from pretrain.run import close_process_group, init_process_group

    init_process_group()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
        ds = {
            "train_batch_size": 4,
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": zero},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "bf16": {"enabled": True},
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        for _ in range(5):
            engine.backward(engine(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).mean())
            engine.step()
        exported = export_engine(engine, load_config(), Path(out) / "export", step=5)
        masters = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            modules = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        torch.save({"masters": masters, "module": modules, "dir": str(exported)}, Path(out) / "rank0.pt")
    finally:
        close_process_group()


@pytest.mark.parametrize("zero", [2, 3])
def test_a_bf16_engine_exports_its_fp32_master_weights(tmp_path, zero):
    """The module of a bf16 engine holds rounded copies; the export must hold what training updates."""
    from safetensors.torch import load_file

    from pretrain.engine.export import export_step
    from tests.conftest import free_port
    from tests.spawn_ranks import run_ranks

    (result,) = run_ranks(
        _bf16_export_worker, lambda r: (r, free_port(), str(tmp_path), zero), 1, tmp_path, 300.0, "rank"
    )
    exported = load_file(str(Path(result["dir"]) / "model.safetensors"))
    assert export_step(result["dir"]) == 5
    for name, master in result["masters"].items():
        assert torch.equal(exported[name], master.reshape(exported[name].shape)), name
    assert any(not torch.equal(result["module"][n].reshape(m.shape), m) for n, m in exported.items())  # bf16 differs
