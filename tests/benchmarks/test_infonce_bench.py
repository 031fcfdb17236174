"""benchmarks/infonce.py on CPU: the torch paths, the gathered-loss shape (--world) and its table."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import infonce as bench


def test_rank_share_is_the_gathered_loss_of_the_local_rows():
    """--world W times local rows 0..b-1 against all W·b keys, positives on the diagonal."""
    b, world, d = 6, 3, 8
    a, bb, s = bench._inputs(world * b, d, torch.float32, torch.device("cpu"))
    got = bench._loss_fn("eager", local_rows=b)(a, bb, s)
    z = s * a[:b] @ bb.T  # (b, W·b)
    z_t = s * bb[:b] @ a.T
    t = torch.arange(b)
    want = 0.5 * (torch.nn.functional.cross_entropy(z, t) + torch.nn.functional.cross_entropy(z_t, t))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("path", ["triton", "triton-unpaired"])
def test_triton_rank_share_equals_eager_with_gradients(path):
    """The fused rank share ("triton") and the two unpaired calls time the same loss (Triton interpreter)."""
    pytest.importorskip("triton")
    b, world, d = 6, 3, 8
    results = []
    for name in ("eager", path):
        leaves = bench._inputs(world * b, d, torch.float32, torch.device("cpu"))
        loss = bench._loss_fn(name, local_rows=b)(*leaves)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_cpu_run_writes_one_row_per_torch_path_and_counts_the_gathered_flops(tmp_path):
    out = tmp_path / "BENCH.md"
    argv = ["--sizes", "32", "--dims", "16", "--dtypes", "fp32", "--paths", "eager,chunked,triton-gemm"]
    bench.main([*argv, "--world", "4", "--repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert "b local rows against n = 4·b keys per direction" in text
    rows = [ln for ln in text.splitlines() if re.match(r"\| (eager|chunked|triton)", ln)]
    assert [r.split(" | ")[0] for r in rows] == ["| eager", "| chunked"]  # triton is not timed on CPU
    assert float(rows[0].split(" | ")[4]) > 0 and rows[0].split(" | ")[7] == "1.00×"  # eager: the ratio base
    assert bench.counted_flops(32, 16, world=4) == 8 * 32 * 128 * 16
    assert bench.counted_flops(32, 16) == 8 * 32**2 * 16


def test_unknown_path_is_refused():
    with pytest.raises(SystemExit, match="unknown paths"):
        bench.main(["--paths", "eager,cublas", "--no-write"])
