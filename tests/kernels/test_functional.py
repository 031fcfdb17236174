"""kernels.functional: the backend dispatcher (torch / Triton / auto), the symmetric loss and a rank's share."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from kernels import functional
from kernels.functional import infonce, rank_symmetric_infonce, symmetric_infonce
from kernels.infonce_reference import infonce_torch
from tests.kernels.reference_helpers import (
    assert_close_rel,
    assert_matches_oracle,
    loss_and_grads,
    make_inputs,
    oracle_infonce,
)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_dispatcher_on_cpu(backend):
    q, k, s, targets = make_inputs(37, 53, 24, torch.float32)
    targets[3] = -1
    fn = lambda *a, **kw: infonce(*a, backend=backend, **kw)
    assert_matches_oracle(q, k, s, targets, torch.float32, fn=fn)
    with pytest.raises(ValueError, match="backend"):
        infonce(q, k, s, backend="cuda")


def test_triton_backend_routes_to_the_kernel_with_masks(monkeypatch):
    calls = []

    def fake_triton(q, k, logit_scale, targets=None, *, key_valid=None):
        calls.append((targets, key_valid))
        return infonce_torch(q, k, logit_scale, targets, key_valid=key_valid)

    monkeypatch.setattr(functional, "_load_triton", lambda: fake_triton)
    q, k, s, targets = make_inputs(37, 53, 24, torch.float32)
    key_valid = torch.rand(53, generator=torch.Generator().manual_seed(2)) > 0.25
    fn = lambda *a, **kw: infonce(*a, backend="triton", **kw)
    assert_matches_oracle(q, k, s, targets, torch.float32, key_valid=key_valid, fn=fn)
    assert len(calls) == 1 and calls[0][0] is targets and calls[0][1] is key_valid
    infonce(q, k, s, backend="auto")  # CPU tensors: "auto" never picks Triton
    assert len(calls) == 1


def test_float_logit_scale_is_accepted():
    q, k, s, targets = make_inputs(5, 7, 4, torch.float32)
    torch.testing.assert_close(infonce(q, k, 14.0, targets), infonce(q, k, s, targets))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rank_share_backends_agree_and_take_a_float_scale(backend):
    """kernels.rank_symmetric_infonce: rank 1 of 2 (offset 4), a presence mask; the Triton backend (the
    interpreter on CPU) and a float logit scale give the torch backend's share."""
    if backend == "triton":
        pytest.importorskip("triton")
    a_all, b_all, s, _ = make_inputs(8, 8, 6, torch.float32)
    valid = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    want = rank_symmetric_infonce(
        a_all[4:], b_all[4:], a_all, b_all, s, offset=4, world=2, key_valid=valid, backend="torch"
    )
    got = rank_symmetric_infonce(
        a_all[4:], b_all[4:], a_all, b_all, 14.0, offset=4, world=2, key_valid=valid, backend=backend
    )
    assert float(s) == 14.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _symmetric_oracle(a, b, s, valid):
    t = torch.where(valid, torch.arange(a.shape[0]), -1)
    return 0.5 * (oracle_infonce(a, b, s, t, valid) + oracle_infonce(b, a, s, t, valid))


@pytest.mark.parametrize("masked", [False, True])
def test_symmetric_infonce(masked):
    a, b, s, _ = make_inputs(37, 37, 24, torch.float32)
    valid = torch.arange(37) % 4 != 1 if masked else torch.ones(37, dtype=torch.bool)
    kw = {"valid": valid} if masked else {}
    got = loss_and_grads(lambda a_, b_, s_: symmetric_infonce(a_, b_, s_, backend="torch", **kw), a, b, s)
    ref = loss_and_grads(_symmetric_oracle, a.double(), b.double(), s.double(), valid)
    for x, y in zip(got, ref):
        assert_close_rel(x, y, 1e-4)


def test_package_attribute_infonce_is_the_function():
    """Importing the submodules must leave ``kernels.infonce`` bound to the contract function.

    Regression test: the Triton module used to be ``kernels/infonce.py``, and importing it replaced
    the package attribute ``kernels.infonce`` (the dispatcher) with the module.
    """
    import kernels

    names = [f"kernels.{info.name}" for info in pkgutil.iter_modules(kernels.__path__)]
    assert "kernels.infonce_triton" in names and "kernels.ring" in names
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # no triton here: the submodule cannot shadow anything
            pass

    assert kernels.infonce is functional.infonce
