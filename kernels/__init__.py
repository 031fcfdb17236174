"""Fused and reference contrastive-loss kernels (no ``nn.Module`` here; modules live in ``pretrain/``).

Public API:

- :func:`infonce`: InfoNCE of queries against keys, backend ``"auto" | "torch" | "triton"``.
- :func:`symmetric_infonce`: the CLIP loss ``0.5 · (infonce(a, b) + infonce(b, a))`` for paired rows.
- :func:`gather_with_grad`: all-gather along dim 0 whose backward sums gradients across ranks.
- :func:`gathered_symmetric_infonce`: this rank's share of the symmetric loss over all ranks' rows.
- :func:`rank_symmetric_infonce`: that share given the gathered keys (backend dispatch; fused on Triton).
- :func:`check_equal_rows`: the equal-local-batch check that loss runs (once per step is enough).

The Triton kernel (``kernels.infonce_triton``) and the ring strategy (``kernels.ring``) are imported lazily,
so this package imports on machines without Triton or a GPU.
"""

from kernels.distributed import check_equal_rows, gather_with_grad, gathered_symmetric_infonce
from kernels.functional import infonce, rank_symmetric_infonce, symmetric_infonce

__all__ = [
    "infonce",
    "symmetric_infonce",
    "gather_with_grad",
    "gathered_symmetric_infonce",
    "rank_symmetric_infonce",
    "check_equal_rows",
]
