"""pretrain.benchmark.retrieval_task: R@k and median rank with intervals, against hand-computed ranks."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.benchmark.retrieval_task import RetrievalTaskConfig, run
from pretrain.benchmark.suite import from_dict
from pretrain.errors import ConfigError
from tests.pretrain.benchmark.helpers import make_context


def _unit(deg):
    return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


def test_ranks_recall_and_median_by_hand(tmp_path):
    seq = np.array([_unit(d) for d in (0, 90, 180, 270)])
    # structure of protein 1 sits next to sequence 0; the others next to their own sequence
    struct = np.array([_unit(d) for d in (40, 5, 180, 270)])
    ctx = make_context(tmp_path, list("ABCD"), ["MKT"] * 4, {"sequence": seq, "structure": struct})
    cfg = from_dict(RetrievalTaskConfig, {"ks": [1, 2]}, "task")
    out = run(ctx, "retrieval", cfg)
    got = {(r["method"], r["metric"]): r for r in out["rows"]}
    # seq->struct: query 0 (0 deg): structs at 5 (B) > 40 (A): rank 2; query 1 (90): A at 40 (cos .77) > B at 5
    # (cos .09): rank 2; C, D rank 1 -> R@1 = 1/2, R@2 = 1, ranks [2, 2, 1, 1] -> median 1.5
    assert got[("seq->struct", "R@1")]["value"] == pytest.approx(0.5)
    assert got[("seq->struct", "R@2")]["value"] == pytest.approx(1.0)
    assert got[("seq->struct", "median_rank")]["value"] == pytest.approx(1.5)
    assert got[("seq->struct", "R@1")]["n"] == 4 and got[("seq->struct", "R@1")]["chance"] == 0.25
    assert ("seq->text", "R@1") not in got  # no text embedded


def test_base_row_is_not_applicable_and_bad_directions(tmp_path):
    ctx = make_context(tmp_path, ["A"], ["MKT"], {"sequence": np.array([[1.0, 0.0]])}, shared_space=False)
    out = run(ctx, "retrieval", RetrievalTaskConfig())
    assert out["rows"] == [] and "not_applicable" in out["info"]
    with pytest.raises(ConfigError, match="directions"):
        from_dict(RetrievalTaskConfig, {"directions": ["seq->dna"]}, "task")
