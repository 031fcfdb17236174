"""Align-Pro's learned temperatures (``loss.temperature``: shared | per_pair | per_term).

Each term must be the loss of a float64 reference with that term's own scale, the gradients of the
embeddings and of every scale must match the reference's, the scales must come from a module the
objective adds (the shared model's state dict unchanged), and each term's temperature is returned.
The two-rank check (both strategies) is in test_align_pro.py's spawned workers.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from kernels.grouped import grouped_symmetric_infonce_reference
from kernels.sigmoid_reference import sigmoid_loss_reference
from pretrain.config import ConfigError, load_config
from pretrain.losses.align_pro import SCALE_NAMES, TERMS, AlignProLoss
from pretrain.models.term_bias import TermLogitScale
from tests.pretrain.losses.test_align_pro import CFG, GROUPS, PRESENT, _emb

P = PRESENT
# term -> (first embedding, second embedding, valid rows, weight attribute, contrasts texts)
SPEC = {
    "loss_seq_struct": ("sequence", "structure", P["sequence"] & P["structure"], "alpha", False),
    "loss_seq_text": ("sequence", "text", P["sequence"] & P["text"], "beta", True),
    "loss_struct_text": ("structure", "text", P["structure"] & P["text"], "gamma", True),
    "loss_intra_seq": ("sequence", "sequence_view2", P["sequence"], "intra_seq", False),
    "loss_intra_struct": ("structure", "structure_view2", P["structure"], "intra_struct", False),
    "loss_intra_text": ("text", "text_view2", P["text"], "intra_text", True),
}


def _dense_symmetric_infonce(a, b, s, valid):
    """0.5 · (InfoNCE(a→b) + InfoNCE(b→a)) over valid rows, invalid rows neither queries nor keys (float64)."""
    a, b, s = a.double()[valid], b.double()[valid], s.double().reshape(())
    logits = s * a @ b.T  # (v, v)
    idx = torch.arange(a.shape[0])
    ab = (torch.logsumexp(logits, 1) - logits[idx, idx]).mean()
    ba = (torch.logsumexp(logits.T, 1) - logits[idx, idx]).mean()
    return 0.5 * (ab + ba)


def _scale_index(mode: str, term: str) -> int | None:
    short = term.removeprefix("loss_")
    names = SCALE_NAMES.get(mode, ())
    return names.index(short) if short in names else None


def _reference_terms(emb, shared, scales, mode, cfg, bias=None):
    """Per term, the float64 reference loss with the term's scale (``scales[i]`` or the shared one)."""
    out = {}
    for name, (a, b, valid, _, text) in SPEC.items():
        i = _scale_index(mode, name)
        s = shared if i is None else scales[i : i + 1]
        if cfg.kind == "sigmoid":
            targets = torch.where(valid, torch.arange(len(valid)), torch.full((len(valid),), -1))
            j = TERMS.index(name)
            out[name] = sigmoid_loss_reference(emb[a], emb[b], s, bias[j : j + 1], targets, key_valid=valid)
        elif cfg.false_negatives != "none" and text:
            out[name] = grouped_symmetric_infonce_reference(emb[a], emb[b], s, GROUPS, valid)
        else:
            out[name] = _dense_symmetric_infonce(emb[a], emb[b], s, valid)
    return out


def _leaves(emb, n_scales):
    leaves = {k: v.clone().requires_grad_() for k, v in emb.items()}
    log_shared = torch.tensor([math.log(4.0)], dtype=torch.float64, requires_grad=True)
    # distinct log scales, one of them above the clamp (log 100) to exercise it
    log_scales = torch.tensor([1.0, 2.3, 5.0, 0.4, 3.1, 1.7][:n_scales], dtype=torch.float64, requires_grad=True)
    return leaves, log_shared, log_scales


@pytest.mark.parametrize(
    "mode, kind, fn",
    [
        ("per_term", "infonce", "none"),
        ("per_pair", "infonce", "none"),
        ("per_term", "infonce", "text"),
        ("per_term", "sigmoid", "none"),
        ("per_pair", "sigmoid", "none"),
    ],
)
def test_each_term_uses_its_own_scale_and_gradients_match_float64(mode, kind, fn):
    cfg = replace(CFG, temperature=mode, kind=kind, false_negatives=fn)
    n = len(SCALE_NAMES[mode])
    emb = _emb(5)
    module = TermLogitScale(SCALE_NAMES[mode], init_temperature=0.07, max_logit_scale=100.0).double()
    bias = torch.linspace(-3.0, 1.0, len(TERMS), dtype=torch.float64, requires_grad=True)

    def run(reference: bool):
        leaves, log_shared, log_scales = _leaves(emb, n)
        with torch.no_grad():
            module.log_logit_scale.copy_(log_scales)
        module.zero_grad()
        scales = module()["term_logit_scale"]  # through the module: exp and clamp as the model computes them
        shared = log_shared.exp()
        bias.grad = None
        if reference:
            terms = _reference_terms(leaves, shared, scales, mode, cfg, bias)
            total = sum(getattr(cfg, SPEC[k][3]) * v for k, v in terms.items())
        else:
            terms = AlignProLoss(cfg).compute(
                leaves,
                PRESENT,
                shared,
                GROUPS if fn != "none" else None,
                bias if kind == "sigmoid" else None,
                scales,
            )
            total = terms["loss"]
        (total * 1.7).backward()  # grad_output != 1
        grads = {k: v.grad.clone() for k, v in leaves.items()}
        return terms, total.detach(), grads, module.log_logit_scale.grad.clone(), log_shared.grad, bias.grad

    got, ref = run(False), run(True)
    for name in TERMS:
        torch.testing.assert_close(got[0][name], ref[0][name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-12)
    for k in emb:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-8, atol=1e-11, msg=k)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-8, atol=1e-11)  # every learned scale
    clamped = SCALE_NAMES[mode].index("struct_text")  # index 2: log scale 5.0 > log(100), clamped
    assert clamped == 2
    assert got[3][clamped] == 0  # a clamped scale gets no gradient (as the shared one)
    assert bool((got[3][[i for i in range(n) if i != clamped]] != 0).all())  # every other scale trains
    if mode == "per_term":
        assert got[4] is None or float(got[4]) == 0.0  # the shared scale serves no term
    else:
        torch.testing.assert_close(got[4], ref[4], rtol=1e-8, atol=1e-11)  # intra terms keep the shared one
        assert float(got[4]) != 0.0
    if kind == "sigmoid":
        torch.testing.assert_close(got[5], ref[5], rtol=1e-8, atol=1e-11)


def test_temperatures_and_biases_are_returned_as_detached_metrics():
    emb, s = _emb(1), torch.tensor([4.0], dtype=torch.float64)
    scales = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64, requires_grad=True)
    bias = torch.linspace(-3.0, 1.0, len(TERMS), dtype=torch.float64)
    cfg = replace(CFG, temperature="per_pair", kind="sigmoid", intra_struct=0.0)
    out = AlignProLoss(cfg).compute(emb, PRESENT, s, term_bias=bias, term_logit_scale=scales)
    want_temp = {"seq_struct": 0.1, "seq_text": 0.05, "struct_text": 0.025, "intra_seq": 0.25, "intra_text": 0.25}
    assert {k for k in out if k.startswith("temp_")} == {f"temp_{k}" for k in want_temp}  # zero weight: none
    for k, v in want_temp.items():
        assert not out[f"temp_{k}"].requires_grad
        assert float(out[f"temp_{k}"]) == pytest.approx(v, rel=1e-12)
    for name in TERMS:
        short = name.removeprefix("loss_")
        if short != "intra_struct":
            assert float(out[f"bias_{short}"]) == float(bias[TERMS.index(name)])
    # shared infonce: the output is today's, no extra keys
    plain = AlignProLoss(CFG).compute(emb, PRESENT, s)
    assert set(plain) == {"loss", *TERMS}
    with pytest.raises(KeyError, match="term_logit_scale"):
        AlignProLoss(replace(CFG, temperature="per_term")).compute(emb, PRESENT, s)


def test_term_logit_scale_init_clamp_and_shape():
    m = TermLogitScale(("a", "b"), init_temperature=0.07, max_logit_scale=100.0)
    assert m.log_logit_scale.shape == (2,)  # 1-D: deepspeed refuses 0-dim parameters
    torch.testing.assert_close(m()["term_logit_scale"], torch.full((2,), 1 / 0.07))
    with torch.no_grad():
        m.log_logit_scale.fill_(10.0)
    torch.testing.assert_close(m()["term_logit_scale"], torch.full((2,), 100.0))


def test_recipe_setting_model_parameters_and_shared_state_dict(tiny_model_cfgs):
    from pretrain.engine.builder import build_model

    with pytest.raises(ConfigError, match="loss.temperature='per_modality'"):
        load_config(overrides=["loss.temperature=per_modality"])
    with pytest.raises(ConfigError, match="loss.temperature='per_pair'.*protclip"):
        load_config(overrides=["loss.temperature=per_pair", "loss.objective=protclip"])
    shared_cfg, per_pair_cfg = tiny_model_cfgs
    torch.manual_seed(0)
    shared = build_model(shared_cfg, load_pretrained=False)
    torch.manual_seed(0)
    per_pair = build_model(per_pair_cfg, load_pretrained=False)
    plain_keys = set(shared.state_dict())
    assert not any("term_temperature" in k for k in plain_keys)  # shared: the plain model's state dict
    extra = set(per_pair.state_dict()) - plain_keys
    assert extra == {"term_temperature.log_logit_scale"}
    p = per_pair.term_temperature.log_logit_scale
    assert p.shape == (3,)
    torch.testing.assert_close(p.detach(), shared.log_logit_scale.detach().expand(3))  # same init as the shared
    groups = per_pair.parameter_groups()
    assert id(p) in {id(q) for q in groups["heads_no_decay"]}  # trained with the heads, never decayed
    from pretrain.models.trimodal import SHARED_OUTPUTS

    assert "term_logit_scale" in SHARED_OUTPUTS  # the two-pass step back-propagates it once
    # the model's module feeds the objective: the loss trains every pair scale, the intra terms the shared one
    obj = AlignProLoss(per_pair_cfg.loss)
    out = {k: F.normalize(v.float(), dim=1) for k, v in _emb(2).items()}
    out.update(per_pair.term_temperature(), logit_scale=per_pair.logit_scale())
    obj(out, {"present": PRESENT})["loss"].backward()
    assert bool((p.grad != 0).all())
    assert bool((per_pair.log_logit_scale.grad != 0).all())


@pytest.fixture
def tiny_model_cfgs():
    from tests.conftest import TINY_OVERRIDES

    return (
        load_config(overrides=TINY_OVERRIDES),
        load_config(overrides=[*TINY_OVERRIDES, "loss.temperature=per_pair"]),
    )


def test_two_pass_step_equals_one_pass_and_trains_the_term_scales(tmp_path):
    """The learned scales are shared outputs like the logit scale (cached once, back-propagated once):
    two-pass gradients, the scales', the biases' and the shared scale's included, equal the one-pass ones
    (per_pair with sigmoid: every shared output at once)."""
    import copy

    from pretrain.engine.builder import build_model
    from pretrain.engine.two_pass import two_pass_step
    from tests.pretrain.engine.two_pass_helpers import demo_batch, grads_of

    off = ["model.head_dropout=0.0", "model.text.dropout=0.0", "model.structure.drop_rate=0.0"]
    cfg = load_config(overrides=[*off, "loss.temperature=per_pair", "loss.kind=sigmoid"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = demo_batch(cfg, tmp_path, 6)
    objective = AlignProLoss(cfg.loss)
    ref_model = copy.deepcopy(model)
    ref_terms = objective(ref_model(batch), batch)
    ref_terms["loss"].backward()
    ref = grads_of(ref_model)
    terms, _ = two_pass_step(model, batch, objective, chunk_size=2)
    assert float(terms["loss"]) == pytest.approx(float(ref_terms["loss"].detach()), rel=1e-6)
    temps = {k for k in terms if k.startswith("temp_")}
    assert len(temps) == 6 and all(float(terms[k]) == pytest.approx(0.07) for k in temps)  # init T0
    for name in ("term_temperature.log_logit_scale", "siglip.bias", "log_logit_scale"):
        assert bool((ref[name] != 0).all()), name
    got = grads_of(model)
    for name in ref:
        scale = float(ref[name].abs().max())
        torch.testing.assert_close(
            got[name], ref[name], rtol=1e-4, atol=1e-4 * scale + 1e-9, msg=lambda m, n=name: f"{n}: {m}"
        )
