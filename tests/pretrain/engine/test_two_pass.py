"""The two-pass (GradCache) step gives the one-pass gradients (fp32, CPU, dropout on) for every
encoder and head parameter and the logit scale; config, precision and graph slicing around it."""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.engine import two_pass
from pretrain.engine.builder import build_model
from pretrain.engine.precision import embeddings_to_fp32, resolve_precision
from pretrain.engine.two_pass import slice_graph, slice_model_batch, two_pass_step
from pretrain.losses.align_pro import AlignProLoss
from pretrain.losses.protclip import ProtCLIPLoss, ProtCLIPLossConfig
from tests.pretrain.engine.two_pass_helpers import demo_batch, grads_of

ROWS = 6
DROPOUT_ON = ["model.head_dropout=0.1"]  # text (0.1) and structure (0.1) dropout are on by default
DROPOUT_OFF = ["model.head_dropout=0.0", "model.text.dropout=0.0", "model.structure.drop_rate=0.0"]
PREFIXES = ("sequence_encoder.", "structure_encoder.", "text_encoder.", "heads.sequence.", "heads.structure.")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("two_pass_demo")


def _setup(overrides, demo_root):
    cfg = load_config(overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    return cfg, model, demo_batch(cfg, demo_root, ROWS), AlignProLoss(cfg.loss)


def _one_pass(model, batch, loss_fn, chunk=None):
    """The plain step's gradients; with ``chunk``, the forward embeds chunk by chunk (same graph)."""
    if chunk is None:
        emb = model(batch)
    else:
        parts = [model(slice_model_batch(batch, s, min(s + chunk, ROWS))) for s in range(0, ROWS, chunk)]
        emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "logit_scale"}
        emb["logit_scale"] = parts[0]["logit_scale"]
    terms = loss_fn.compute(emb, batch["present"], emb["logit_scale"])
    terms["loss"].backward()
    return float(terms["loss"].detach()), grads_of(model)


def _assert_same_grads(got, want, rel=1e-5):
    assert got.keys() == want.keys()
    for prefix in PREFIXES:  # every encoder and head takes part in the comparison
        assert any(n.startswith(prefix) for n in want), prefix
    assert "log_logit_scale" in want and "heads.text.net.0.weight" in want
    for name in want:
        assert want[name].abs().sum() > 0, f"{name} has a zero gradient: the comparison would be vacuous"
        # ``rel`` of the tensor's scale: chunks accumulate parameter gradients in another order. The
        # absolute floor covers gradients that are 0 analytically and round-off only (BERT key biases:
        # softmax ignores a per-query constant).
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=rel, atol=rel * scale + 1e-9, msg=name)


def _to_double(obj):
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_double(v) for k, v in obj.items()}
    return obj


def test_one_chunk_is_the_one_pass_step_with_dropout(demo_root):
    _, model, batch, loss_fn = _setup(DROPOUT_ON, demo_root)
    ref_model = copy.deepcopy(model)
    torch.manual_seed(7)
    ref_loss, ref = _one_pass(ref_model, batch, loss_fn)
    torch.manual_seed(7)
    terms, _ = two_pass_step(model, batch, loss_fn, chunk_size=ROWS)
    assert float(terms["loss"]) == pytest.approx(ref_loss, rel=1e-6)
    _assert_same_grads(grads_of(model), ref)


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunks_replay_dropout_masks(demo_root, chunk):
    """Several chunks: equal to a one-pass step whose forward draws the masks chunk by chunk."""
    _, model, batch, loss_fn = _setup(DROPOUT_ON, demo_root)
    ref_model = copy.deepcopy(model)
    torch.manual_seed(11)
    ref_loss, ref = _one_pass(ref_model, batch, loss_fn, chunk=chunk)
    torch.manual_seed(11)
    terms, _ = two_pass_step(model, batch, loss_fn, chunk_size=chunk)
    assert float(terms["loss"]) == pytest.approx(ref_loss, rel=1e-6)
    _assert_same_grads(grads_of(model), ref)
    # The RNG after the step is where the embedding pass left it (pass 2 is a replay).
    torch.manual_seed(11)
    _one_pass(copy.deepcopy(model), batch, loss_fn, chunk=chunk)
    after_ref = torch.rand(3)
    torch.manual_seed(11)
    two_pass_step(copy.deepcopy(model), batch, loss_fn, chunk_size=chunk)
    torch.testing.assert_close(torch.rand(3), after_ref)


def test_without_rng_replay_the_gradients_differ(demo_root, monkeypatch):
    """The comparison above is sensitive: skipping the replay changes the dropout masks of pass 2."""
    _, model, batch, loss_fn = _setup(DROPOUT_ON, demo_root)
    ref_model = copy.deepcopy(model)
    torch.manual_seed(11)
    _, ref = _one_pass(ref_model, batch, loss_fn, chunk=2)
    monkeypatch.setattr(two_pass, "_set_rng_state", lambda state, device: None)
    torch.manual_seed(11)
    two_pass_step(model, batch, loss_fn, chunk_size=2)
    got = grads_of(model)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            got["text_encoder.bert.encoder.layer.0.output.dense.weight"],
            ref["text_encoder.bert.encoder.layer.0.output.dense.weight"],
            rtol=1e-5,
            atol=1e-8,
        )


@pytest.mark.parametrize("chunk", [2, 4])
def test_chunks_equal_the_whole_batch_step_without_dropout(demo_root, chunk):
    """Chunked embedding vs the whole-batch forward, in fp64: equal to round-off (fp32 round-off of the
    GVP scatter sums reaches a few 1e-5 of some structure-encoder gradients, fp64 shows it is only that)."""
    _, model, batch, loss_fn = _setup(DROPOUT_OFF, demo_root)
    model, batch = model.double(), _to_double(batch)
    ref_model = copy.deepcopy(model)
    ref_loss, ref = _one_pass(ref_model, batch, loss_fn)
    terms, _ = two_pass_step(model, batch, loss_fn, chunk_size=chunk)
    assert terms["loss"].dtype == torch.float64
    assert float(terms["loss"]) == pytest.approx(ref_loss, rel=1e-12)
    _assert_same_grads(grads_of(model), ref, rel=1e-9)


def test_with_activation_checkpointing_too(demo_root):
    cfg, model, batch, loss_fn = _setup(DROPOUT_ON, demo_root)
    ref_model = copy.deepcopy(model)
    model.set_activation_checkpointing(["sequence", "structure", "text"])
    torch.manual_seed(5)
    _, ref = _one_pass(ref_model, batch, loss_fn, chunk=3)
    torch.manual_seed(5)
    two_pass_step(model, batch, loss_fn, chunk_size=3)
    _assert_same_grads(grads_of(model), ref)


def test_slice_graph_reindexes_nodes_edges_and_graphs(demo_root):
    cfg, model, batch, _ = _setup(DROPOUT_OFF, demo_root)
    graph = batch["graph"]
    part = slice_graph(graph, 2, 5)  # row 2 has no structure (zero nodes)
    assert int(part["num_graphs"]) == 3 and part["present"].tolist() == graph["present"][2:5].tolist()
    assert part["batch"].min() >= 0 and part["batch"].max() < 3
    n = part["node_s"].shape[0]
    assert part["edge_index"].min() >= 0 and part["edge_index"].max() < n
    model.eval()
    with torch.no_grad():
        whole = model.structure_encoder(graph)
        torch.testing.assert_close(model.structure_encoder(part), whole[2:5], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_the_loss_in_fp32(demo_root):
    _, model, batch, loss_fn = _setup(DROPOUT_OFF, demo_root)
    terms, scale = two_pass_step(model, batch, loss_fn, chunk_size=3, autocast_dtype=torch.bfloat16)
    assert terms["loss"].dtype == torch.float32 and scale.dtype == torch.float32
    assert all(torch.isfinite(g).all() for g in grads_of(model).values())
    out = embeddings_to_fp32({"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.ones(2, dtype=torch.long)})
    assert out["a"].dtype == torch.float32 and out["b"].dtype == torch.long


def test_precision_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("auto", cuda) is torch.bfloat16
    assert resolve_precision("bf16", cuda) is torch.bfloat16
    assert resolve_precision("fp32", cuda) is None
    with pytest.raises(ConfigError, match="train.precision='bf16' needs a CUDA device"):
        resolve_precision("bf16", cpu)
    assert load_config().train.precision == "auto"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.grad_cache_chunk=-1"], "train.grad_cache_chunk=-1"),
        (["train.grad_cache_chunk=8", "loss.objective=protclip"], "not supported with loss.objective='protclip'"),
        (["train.activation_checkpointing=[esm]"], "train.activation_checkpointing"),
        (["train.activation_checkpointing=[text, text]"], "train.activation_checkpointing"),
        (["train.precision=fp16"], "train.precision='fp16'"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(overrides=overrides)


def test_two_pass_refuses_protclip_batches():
    with pytest.raises(ValueError, match="needs an objective of pooled embeddings"):
        two_pass_step(lambda b: {}, {"seq_tokens": torch.zeros(2, 3), "protclip": {}}, None, chunk_size=1)


def test_two_pass_refuses_an_objective_of_token_states():
    """ProtCLIP's MLM / BSR / PDA read per-token states: the cached pooled embeddings cannot give them."""
    with pytest.raises(ValueError, match="ProtCLIPLoss reads per-token states"):
        two_pass_step(lambda b: {}, {"seq_tokens": torch.zeros(2, 3)}, ProtCLIPLoss(ProtCLIPLossConfig()), chunk_size=1)


@pytest.mark.parametrize("chunk", [2, ROWS])
def test_sigmoid_loss_two_pass_equals_one_pass_and_trains_the_term_biases(demo_root, chunk):
    """loss.kind=sigmoid: the learned term biases are shared outputs like the logit scale (cached once,
    back-propagated once), so the two-pass gradients, the biases' included, equal the one-pass ones."""
    cfg, model, batch, _ = _setup([*DROPOUT_OFF, "loss.kind=sigmoid"], demo_root)
    objective = AlignProLoss(cfg.loss)
    assert model.siglip.bias.shape == (6,)
    ref_model = copy.deepcopy(model)
    out = ref_model(batch)
    ref_terms = objective(out, batch)
    ref_terms["loss"].backward()
    ref = grads_of(ref_model)
    terms, _ = two_pass_step(model, batch, objective, chunk_size=chunk)
    assert float(terms["loss"]) == pytest.approx(float(ref_terms["loss"]), rel=1e-6)
    got = grads_of(model)
    assert ref["siglip.bias"].abs().sum() > 0
    for name in ref:
        scale = float(ref[name].abs().max())
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5 * scale + 1e-9, msg=name)
