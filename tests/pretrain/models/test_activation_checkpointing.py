"""Activation checkpointing per encoder: same outputs and gradients as the plain layers, less saved memory."""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine.builder import build_model
from pretrain.models.activation_checkpointing import is_layer_checkpointed, set_layer_checkpointing
from pretrain.models.trimodal import MODALITIES
from tests.pretrain.engine.two_pass_helpers import demo_batch, grads_of

OVERRIDES = ["model.head_dropout=0.1"]  # dropout everywhere: the recomputation must replay the masks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config(overrides=OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = demo_batch(cfg, tmp_path_factory.mktemp("ckpt_demo"), rows=6)
    return cfg, model, batch


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _loss_and_grads(model, batch, seed):
    torch.manual_seed(seed)
    out = model(batch)
    g = torch.Generator().manual_seed(1)
    # A random linear functional of every output (grad_output != 1), so each output's gradient counts.
    loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in out.values())
    loss.backward()
    return {k: v.detach() for k, v in out.items()}, grads_of(model)


@pytest.mark.parametrize("encoder", MODALITIES)
def test_checkpointed_encoder_gives_equal_outputs_and_gradients(setup, encoder):
    cfg, model, batch = setup
    plain = copy.deepcopy(model)
    ckpt = copy.deepcopy(model)
    ckpt.set_activation_checkpointing([encoder])
    enc = dict(zip(MODALITIES, ckpt.encoders()))[encoder]
    assert enc.activation_checkpointing
    assert [e.activation_checkpointing for e in ckpt.encoders()].count(True) == 1
    out_p, grads_p = _loss_and_grads(plain, batch, seed=3)
    out_c, grads_c = _loss_and_grads(ckpt, batch, seed=3)
    for k in out_p:
        torch.testing.assert_close(out_c[k], out_p[k], rtol=1e-6, atol=1e-7)
    assert grads_p.keys() == grads_c.keys()
    prefix = {"sequence": "sequence_encoder.", "structure": "structure_encoder.", "text": "text_encoder."}[encoder]
    assert any(name.startswith(prefix) for name in grads_c)
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-7, msg=name)
    # The checkpointed encoder really saves less for backward.
    assert _saved_bytes(lambda: ckpt(batch)) < _saved_bytes(lambda: plain(batch))
    # Parameter names (and so checkpoints and exports) are unchanged by checkpointing.
    assert list(ckpt.state_dict()) == list(plain.state_dict())


def test_all_encoders_from_config_and_toggle_off(tmp_path):
    cfg = load_config(overrides=["train.activation_checkpointing=[sequence, structure, text]"])
    model = build_model(cfg)
    assert all(e.activation_checkpointing for e in model.encoders())
    model.set_activation_checkpointing([])
    assert not any(e.activation_checkpointing for e in model.encoders())
    with pytest.raises(ValueError, match="unknown encoders"):
        model.set_activation_checkpointing(["esm"])


def test_checkpointing_frees_saved_activations():
    """A checkpointed stack saves only each layer's input for backward, not its intermediates."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)) for _ in range(4)]
    )
    x = torch.randn(128, 64, requires_grad=True)

    def run():
        h = x
        for layer in layers:
            h = layer(h)

    plain = _saved_bytes(run)
    set_layer_checkpointing(layers, True)
    assert all(is_layer_checkpointed(layer) for layer in layers)
    checkpointed = _saved_bytes(run)
    set_layer_checkpointing(layers, False)
    assert not any(is_layer_checkpointed(layer) for layer in layers)
    assert checkpointed < plain / 4, (checkpointed, plain)
