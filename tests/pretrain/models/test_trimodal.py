"""TriModalModel's parameter groups (pretrain/models/trimodal.py): the two-stage schedule and weight decay."""

from pretrain.config import load_config
from pretrain.engine.builder import build_model
from pretrain.models.trimodal import NO_DECAY
from tests.conftest import TINY_OVERRIDES


def test_every_parameter_is_in_one_group_and_only_matrices_decay():
    model = build_model(load_config(overrides=TINY_OVERRIDES))
    groups = model.parameter_groups()
    assert set(groups) == {
        f"{part}{suffix}"
        for part in ("encoder_sequence", "encoder_structure", "encoder_text", "heads")
        for suffix in ("", NO_DECAY)
    }
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    for name, params in groups.items():
        assert all((p.ndim < 2) == name.endswith(NO_DECAY) for p in params), name
    named = dict(model.named_parameters())
    no_decay = {id(p) for name, ps in groups.items() if name.endswith(NO_DECAY) for p in ps}
    assert id(model.log_logit_scale) in {id(p) for p in groups["heads" + NO_DECAY]}
    layer_norms = [n for n in named if "layer_norm" in n.lower() or "LayerNorm" in n]
    assert layer_norms and all(id(named[n]) in no_decay for n in layer_norms)
    assert all(id(named[n]) in no_decay for n in named if n.endswith(".bias"))
