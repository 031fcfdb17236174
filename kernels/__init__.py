"""Fused and reference contrastive-loss kernels (no ``nn.Module`` here; modules live in ``pretrain/``).

Public API:

- :func:`infonce`: InfoNCE of queries against keys, backend ``"auto" | "torch" | "triton"``.
- :func:`symmetric_infonce`: the CLIP loss ``0.5 · (infonce(a, b) + infonce(b, a))`` for paired rows.
- :func:`gather_with_grad`: all-gather along dim 0 whose backward sums gradients across ranks.
- :func:`gathered_symmetric_infonce`: this rank's share of the symmetric loss over all ranks' rows.
- :func:`rank_symmetric_infonce`: that share given the gathered keys (backend dispatch; fused on Triton).
- :func:`check_equal_rows`: the equal-local-batch check that loss runs (once per step is enough).
- :func:`grouped_symmetric_infonce`: the gathered loss with same-group rows deduplicated (false negatives).
- :func:`sigmoid_loss`: the SigLIP pairwise sigmoid loss with a learned bias; optional false-negative groups
  (same-group pairs excluded, or positives with ``groups_as="positive"``) (backend dispatch).
- :func:`gathered_sigmoid_loss`: this rank's share of the sigmoid loss over all ranks' rows.
- :func:`trimodal_infonce` (with :class:`Term`): every requested InfoNCE term of a step, each embedding
  gathered once (the fused tri-modal step).

Files, one job each, in layers: every file imports only files listed above it (no cycle, lazy imports
included), and nothing outside torch, Triton and the standard library.

- ``infonce_reference.py``: pure-torch chunked InfoNCE and eager baseline (CPU fallback, test oracle).
- ``triton_launch.py``: Triton plumbing: TRITON_INTERPRET on CPU, autotune configs, ``launch``, checks.
- ``infonce_tiles.py``: the ``@triton.jit`` kernels (tile helpers, forward, merges, loss, backward).
- ``infonce_blocks.py``: block primitives, block LSE / backward of one or both directions (the ring's).
- ``infonce_triton.py``: op, single InfoNCE: launchers → ``InfoNCETritonFunction`` → ``infonce_triton``.
- ``symmetric_infonce_triton.py``: op, the paired (symmetric) loss in shared launches.
- ``gathered_infonce_triton.py``: op, one rank's share of the gathered symmetric loss.
- ``functional.py``: backend dispatch, ``infonce`` / ``symmetric_infonce`` / ``rank_symmetric_infonce``.
- ``gather.py``: collectives, ``world_and_rank``, gathers with and without gradient, the row check.
- ``ring.py``: ring strategy, key blocks passed rank to rank (O(b·d) memory).
- ``distributed.py``: ``gathered_symmetric_infonce``, choosing the all-gather (here) or the ring.
- ``grouped.py``: ``grouped_symmetric_infonce``, false negatives deduplicated (one class per group).
- ``trimodal_blocks.py``: the fused tri-modal engine: terms' directions by query key, shared key blocks
  (one gathered block, or a ring of all keys stacked), torch group GEMMs or the ring's Triton block ops.
- ``trimodal_triton.py``: op, the tri-modal step's every direction in one Triton forward launch.
- ``trimodal.py``: ``trimodal_infonce`` and ``Term``: the plan (masks and group ids gathered once), every
  key gathered once (one collective), dispatch to the engine or the Triton op.
- ``sigmoid_reference.py``: SigLIP sigmoid loss in pure torch, chunked over keys, and a float64 oracle.
- ``sigmoid_triton.py``: op, the fused sigmoid loss in Triton (its kernels, launchers, autograd, wrapper).
- ``sigmoid.py``: ``sigmoid_loss``, backend dispatch of the sigmoid loss (Triton lazily, like ``functional.py``).
- ``sigmoid_ring.py``: ring strategy of the sigmoid loss on ``kernels.ring.Ring``, key blocks passed rank to rank
  (O(b·d) memory).
- ``sigmoid_distributed.py``: ``gathered_sigmoid_loss``, choosing the all-gather (here) or the ring.

Outside themselves, the Triton files (``triton_launch.py`` to ``gathered_infonce_triton.py``,
``trimodal_triton.py`` and ``sigmoid_triton.py``) are imported only by ``functional.py``, ``ring.py``,
``sigmoid.py`` and ``trimodal.py``, lazily, so
this package imports without Triton or a GPU.
"""

from kernels.distributed import gathered_symmetric_infonce
from kernels.functional import infonce, rank_symmetric_infonce, symmetric_infonce
from kernels.gather import check_equal_rows, gather_with_grad
from kernels.grouped import grouped_symmetric_infonce
from kernels.sigmoid import sigmoid_loss
from kernels.sigmoid_distributed import gathered_sigmoid_loss
from kernels.trimodal import Term, trimodal_infonce

__all__ = [
    "infonce",
    "symmetric_infonce",
    "gather_with_grad",
    "gathered_symmetric_infonce",
    "rank_symmetric_infonce",
    "check_equal_rows",
    "grouped_symmetric_infonce",
    "sigmoid_loss",
    "gathered_sigmoid_loss",
    "Term",
    "trimodal_infonce",
]
