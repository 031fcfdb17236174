"""pretrain.hf_export: transformers directories that compute what the project's encoders compute, the
structure folder, the model card from a run's own files, the command without DeepSpeed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertModel, EsmModel

from pretrain.api import load_structure_encoder
from pretrain.config import load_config, save_config
from pretrain.data.collate import BatchBuilder
from pretrain.engine.export import write_export
from pretrain.hf_export import INFO_FILE, default_out_dir, esm2_to_hf, export_hf, main
from pretrain.models.text_encoder import build_tokenizer, tokenize_texts
from pretrain.models.trimodal import TriModalModel
from tests.pretrain.eval.tiny import build_corpus

REPO = Path(__file__).resolve().parents[2]
SEQS = [
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVV",
    "ACDEFGHIKLMNPQRSTVWYXBZUO",
    "MSTNPKPQRK" * 23,  # 230 residues: cut to the recipe's 200 (demo) / 150 (larger)
    "G",
]
TEXTS = [
    "ATP-dependent DNA helicase involved in replication.",
    "Located in the mitochondrial inner membrane",
    "kinase " * 100,  # longer than max_length tokens: truncated
]
# the demo recipe, and a wider ESM-2 / BERT (more layers and heads, a pretrained text directory with
# mean pooling, a narrower head)
LARGER = [
    "model.sequence.num_layers=3",
    "model.sequence.embed_dim=96",
    "model.sequence.attention_heads=6",
    "model.sequence.max_length=150",
    "model.text.pooling=mean",
    *(f"model.text.{k}=null" for k in ("hidden_size", "num_layers", "attention_heads", "intermediate_size")),
    "model.embed_dim=32",
    "model.head_hidden_dim=48",
]


def _bert_dir(directory: Path) -> Path:
    tok = build_tokenizer(load_config().model.text)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=96, num_hidden_layers=3, num_attention_heads=6, intermediate_size=192
    )
    torch.manual_seed(3)
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value (norm gains 1, biases 0 would hide swapped names)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hf_corpus"))


@pytest.fixture(scope="module", params=["demo", "larger"])
def exported(request, corpus, tmp_path_factory):
    """(run dir, export dir, hf dir, model, cfg) of a perturbed random model of the recipe."""
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    overrides = [f"data.train_shards={corpus / 'train'}", f"data.eval_shards={corpus / 'heldout'}"]
    if request.param == "larger":
        overrides += [*LARGER, f"model.text.pretrained_dir={_bert_dir(root / 'bert')}"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = TriModalModel(cfg.model)
    _perturb(model, 1)
    run = root / "run"
    export = write_export(model.state_dict(), cfg, run / "export", step=150)
    save_config(cfg, run / "config.yaml")
    model.eval()
    return run, export, export_hf(export), model, cfg


def test_default_output_is_beside_the_export(exported):
    run, export, hf, _, _ = exported
    assert hf == default_out_dir(export) == run / "export_hf"
    assert {p.name for p in hf.iterdir()} == {"sequence", "text", "structure", INFO_FILE, "README.md"}


def test_sequence_directory_is_the_projects_esm2(exported):
    _, _, hf, model, cfg = exported
    tok = AutoTokenizer.from_pretrained(hf / "sequence")
    esm = AutoModel.from_pretrained(hf / "sequence").eval()
    assert isinstance(esm, EsmModel)
    batch = tok(SEQS, return_tensors="pt", padding=True, truncation=True)
    tokens = model.sequence_encoder.tokenize(SEQS)
    assert torch.equal(batch["input_ids"], tokens)  # crop included
    with torch.no_grad():
        hidden = esm(**batch).last_hidden_state
        ours, logits = model.sequence_encoder.mlm_forward(tokens)
        mlm = AutoModelForMaskedLM.from_pretrained(hf / "sequence").eval()(**batch).logits
    torch.testing.assert_close(hidden, ours, rtol=0, atol=1e-5)
    # logits are ~10x the hidden states (perturbed LM head): the same float rounding, scaled up
    torch.testing.assert_close(mlm, logits, rtol=1e-5, atol=1e-4)


def test_text_directory_is_the_projects_bert(exported):
    _, _, hf, model, cfg = exported
    tok = AutoTokenizer.from_pretrained(hf / "text")
    bert = AutoModel.from_pretrained(hf / "text").eval()
    assert isinstance(bert, BertModel)
    ids, attn = tokenize_texts(build_tokenizer(cfg.model.text), TEXTS, cfg.model.text.max_length)
    batch = tok(TEXTS, return_tensors="pt", padding=True, truncation=True, return_token_type_ids=False)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], attn)
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
        ours = model.text_encoder.token_representations(ids, attn)
    torch.testing.assert_close(hidden, ours, rtol=0, atol=1e-5)


def test_model_card_code_gives_the_projects_embeddings(exported):
    """The card's transformers-only code (run as written) equals encode_sequence / encode_text."""
    _, _, hf, model, cfg = exported
    card = (hf / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "from pretrain" not in code  # transformers, torch and safetensors only
    scope: dict = {}
    exec(compile(code, "model-card", "exec"), scope)
    ids, attn = tokenize_texts(build_tokenizer(cfg.model.text), TEXTS, cfg.model.text.max_length)
    with torch.no_grad():
        want_seq = model.encode_sequence(model.sequence_encoder.tokenize(SEQS))
        want_text = model.encode_text(ids, attn)
    torch.testing.assert_close(scope["embed_sequences"](str(hf), SEQS), want_seq, rtol=0, atol=1e-5)
    torch.testing.assert_close(scope["embed_texts"](str(hf), TEXTS), want_text, rtol=0, atol=1e-5)


def test_structure_directory_reloads_to_identical_embeddings(exported, corpus):
    _, _, hf, model, cfg = exported
    from data_shards.reader import ShardReader

    with ShardReader(sorted((corpus / "heldout").glob("*.tar"))[0]) as reader:
        records = [reader.read(i) for i in range(12)]
    graph = BatchBuilder(cfg).build(records, np.random.default_rng(0), False)["graph"]
    embedder = load_structure_encoder(hf / "structure")
    with torch.no_grad():
        torch.testing.assert_close(embedder(graph), model.encode_structure(graph), rtol=0, atol=0)


def test_logit_scale_and_step_are_recorded(exported):
    _, _, hf, model, _ = exported
    info = json.loads((hf / INFO_FILE).read_text())
    assert info["export_step"] == 150
    assert info["logit_scale"] == pytest.approx(float(model.logit_scale().detach()), rel=1e-6)
    assert info["log_logit_scale"] == pytest.approx(float(model.log_logit_scale.detach()), rel=1e-6)


def test_model_card_copies_the_runs_figures(exported, tmp_path):
    run, export, _, _, cfg = exported
    if cfg.model.text.pretrained_dir is not None:
        pytest.skip("one configuration is enough for the card's figures")
    from pretrain.eval.__main__ import evaluate_run

    evaluate_run(run, tasks=("retrieval",), device="cpu")
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 140, "loss": 11.25}) + "\n" + json.dumps({"step": 150, "val/mean_R@10": 0.0625}) + "\n"
    )
    save_config(cfg, run / "config.yaml", {"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}})
    (run / "checkpoints" / "global_step150").mkdir(parents=True)
    (run / "checkpoints" / "global_step150" / "COMPLETE").write_text(json.dumps({"step": 150, "world_size": 2}))
    (run / "checkpoints" / "latest").write_text("global_step150")
    card = (export_hf(export, tmp_path / "hf") / "README.md").read_text()
    ev = json.loads((run / "eval.json").read_text())
    for name, d in ev["retrieval"]["directions"].items():
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {d['n']} |" in row
        for k in (1, 5, 10):
            assert f"{d[f'R@{k}']:.3f}" in row
        assert f"| {d['median_rank']:g} |" in row
    assert f"{ev['num_proteins']} proteins" in card
    assert "training step: 150" in card
    assert "11.250 at step 140" in card and "val/mean_R@10 0.062" in card
    assert "**unknown**" in card and "license: unknown" in card
    assert "ZeRO stage 3, bf16 false" in card and "Ranks (latest checkpoint record): 2." in card
    assert "96 proteins in 2 shard(s)" in card  # the training manifest


def test_card_without_a_run_reports_no_figures(exported, tmp_path):
    _, export, _, _, _ = exported
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        (copy / name).write_bytes((export / name).read_bytes())
    if (export / "text").is_dir():
        (copy / "text").mkdir()
        for f in (export / "text").iterdir():
            (copy / "text" / f.name).write_bytes(f.read_bytes())
    card = (export_hf(copy) / "README.md").read_text()
    assert "no figures are reported" in card
    assert "R@" not in card


def test_command_runs_without_deepspeed(exported, tmp_path):
    """The reading side needs the export, torch and transformers: importing deepspeed would fail here."""
    run = exported[0]
    if exported[4].model.text.pretrained_dir is not None:
        pytest.skip("one configuration is enough for the subprocess check")
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "from pretrain.hf_export import main\n"
        f"sys.exit(main(['--run-dir', {str(run)!r}, '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "sequence" / "model.safetensors").is_file()
    assert "wrote" in proc.stdout


def test_command_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no export" in err and "python -m pretrain.export" in err
    assert main(["--export", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_esm_weight_is_refused():
    with pytest.raises(ValueError, match="no transformers counterpart"):
        esm2_to_hf({"embed_tokens.weight": torch.zeros(33, 4), "layers.0.adapter.weight": torch.zeros(4, 4)})


def test_which_export_of_a_run_is_converted(tmp_path, capsys):
    from pretrain.hf_export import run_exports

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.yaml").write_text("{}\n")
    assert run_exports(run) == [("last", run / "export")]  # no best: the last only
    assert main(["--run-dir", str(run), "--which", "best"]) == 2
    assert "no best export" in capsys.readouterr().err
    (run / "export" / "best").mkdir()
    (run / "export" / "best" / "config.yaml").write_text("{}\n")
    assert run_exports(run) == [("last", run / "export"), ("best", run / "export" / "best")]
    assert run_exports(run, "best") == [("best", run / "export" / "best")]
    assert default_out_dir(run / "export" / "best") == run / "export_best_hf"
    assert main(["--run-dir", str(run), "--which", "both", "--out", str(tmp_path / "o")]) == 2
    assert "--out names one directory" in capsys.readouterr().err
    assert main(["--export", str(run / "export"), "--which", "best"]) == 2
    assert "--which applies to --run-dir" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", ["per_pair", "per_term"])
def test_card_names_the_scales_and_biases_the_loss_learned(corpus, tmp_path, temperature):
    """Per-term scales and SigLIP biases are recorded by name and the card says which scale was used."""
    from pretrain.engine.builder import build_model

    overrides = [f"data.train_shards={corpus / 'train'}", f"data.eval_shards={corpus / 'heldout'}"]
    cfg = load_config(None, [*overrides, f"loss.temperature={temperature}", "loss.kind=sigmoid"])
    torch.manual_seed(0)
    model = build_model(cfg)
    _perturb(model, 2)  # every scale and bias off its init, each a different value
    export = write_export(model.state_dict(), cfg, tmp_path / "run" / "export", step=7)
    hf = export_hf(export, tmp_path / "hf")
    info = json.loads((hf / INFO_FILE).read_text())
    scales = model.term_temperature()["term_logit_scale"].detach().tolist()
    assert info["term_logit_scales"] == pytest.approx(dict(zip(model.term_temperature.names, scales)), rel=1e-6)
    assert info["term_biases"] == pytest.approx(dict(zip(model.siglip.terms, model.siglip.bias.tolist())), rel=1e-6)
    card = (hf / "README.md").read_text()
    named = ", ".join(f"{n} {s:.4g}" for n, s in info["term_logit_scales"].items())
    assert named in card
    shared = f"{info['logit_scale']:.4g}"
    if temperature == "per_term":
        assert "intra_text" in info["term_logit_scales"] and f"the shared `logit_scale` {shared} was not used" in card
    else:
        assert "intra_text" not in info["term_logit_scales"]
        assert f"intra-modal terms used the shared scale {shared}" in card
    assert "The learned logit scale is" not in card
    assert f"seq_struct {info['term_biases']['loss_seq_struct']:.4g}" in card
