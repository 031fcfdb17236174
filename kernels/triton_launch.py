"""Launch plumbing shared by the Triton ops: interpreter on CPU, autotuned compiled kernels on CUDA.

CPU: kernels run under the Triton interpreter, which Triton only enables when TRITON_INTERPRET=1 is set
before triton is imported (its own ``tl.max`` / ``tl.sum`` are decorated at import). This module sets it
when it is the first to import triton on a machine without CUDA; if triton came first without it, CPU
launches raise a clear error. The interpreter gets one fixed config and upcasts dot operands to fp32
(its bf16 ``tl.dot`` is wrong). On CUDA the kernels are autotuned over a few Hopper-sized configs
(H100 figures in BENCHMARKS.md).

Every Triton module of ``kernels/`` takes ``triton`` and ``tl`` from here (``from kernels.triton_launch
import tl, triton``), so that the environment is set before triton's first import whichever module
loads first. Also here: every kernel's autotune configs, ``launch`` (interpreter, autotuner, the cache of
best configs) and the argument checks and conversions that all launchers share.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

# Triton reads TRITON_INTERPRET when functions are decorated (its own tl.* helpers at import), so it
# must be set before triton is first imported. Without CUDA the interpreter is the only way to run.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = [
    "BWD_CONFIGS",
    "FWD_CONFIGS",
    "GRAD_CONFIGS",
    "INTERPRET_META",
    "PAIRED_FWD_CONFIGS",
    "PAIRED_GROUP_UNIT",
    "check_operands",
    "dot_precision",
    "interpreted",
    "interpreting",
    "kernel_args",
    "kernel_interpreted",
    "launch",
    "mask_bytes",
    "prune_bwd",
    "sm_count",
    "tl",
    "triton",
]

INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "BLOCK_OUT": 32}


def _gpu_configs(shapes):
    return [
        triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_OUT"), blocks)), num_warps=w, num_stages=st)
        for *blocks, w, st in shapes
    ]


# fmt: off
# Forward: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). Backward: (BLOCK_M, BLOCK_N, BLOCK_D,
# BLOCK_OUT, num_warps, num_stages), BLOCK_OUT the gradient columns a program keeps on chip.
FWD_CONFIGS = _gpu_configs([(128, 64, 64, 8, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4),
                            (64, 128, 64, 4, 3), (128, 128, 64, 8, 3)])
# The paired one-pass forward (groups are multiples of its widest block, so every block divides them).
PAIRED_FWD_CONFIGS = _gpu_configs([(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 3),
                                   (64, 64, 64, 4, 4), (128, 128, 32, 8, 3)])
PAIRED_GROUP_UNIT = max(c.kwargs[key] for c in PAIRED_FWD_CONFIGS for key in ("BLOCK_M", "BLOCK_N"))
BWD_CONFIGS = _gpu_configs([(64, 64, 64, 64, 4, 3), (128, 64, 64, 128, 8, 3), (64, 64, 64, 256, 8, 3),
                            (128, 128, 64, 128, 8, 2)])
# Gradient chunks (GEMM-shaped tiles): (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).
GRAD_CONFIGS = _gpu_configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                             (64, 128, 64, 4, 4)])
# fmt: on


def prune_bwd(configs, named_args, **kwargs):
    """Drop gradient-column blocks wider than d needs (they would only compute masked zeros)."""
    widest = max(64, triton.next_power_of_2(named_args["d"]))
    return [c for c in configs if c.kwargs["BLOCK_OUT"] <= widest]


# ---------------------------------------------------------------------------------------------------------
# Launch plumbing: interpreter on CPU, autotuned compiled kernels on CUDA.


def kernel_interpreted(kernel) -> bool:
    """Whether ``kernel`` can run on CPU: Triton was imported with TRITON_INTERPRET=1 (tl.* interpreted)
    and ``kernel`` was decorated under it."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction) and isinstance(kernel, InterpretedFunction)


def interpreting(t: torch.Tensor, kernel) -> bool:
    """Whether a launch of ``kernel`` on ``t``'s device runs in the interpreter (not CUDA, or Triton
    decorated ``kernel`` under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return t.device.type != "cuda" or isinstance(kernel, InterpretedFunction)


def interpreted(kernel):
    """``kernel``, or a clear error when it cannot run in the interpreter."""
    if not kernel_interpreted(kernel):
        raise RuntimeError(
            "infonce_triton got non-CUDA tensors but Triton was imported without TRITON_INTERPRET=1; "
            "set TRITON_INTERPRET=1 before anything imports triton (or use backend='torch')"
        )
    return kernel


@functools.cache
def _autotuned(kernel, configs, prune, reset):
    prune_by = {"early_config_prune": prune} if prune else None
    # reset: accumulated outputs, zeroed before each timed config and before the chosen config's run
    return triton.autotune(
        configs=list(configs), key=["m", "n", "d"], prune_configs_by=prune_by, reset_to_zero=list(reset) or None
    )(kernel)


# Best config per (kernel, meta, launch arguments with tensors reduced to their dtype): later launches
# call the JIT kernel directly with it. Triton's autotuner wrapper costs ~25 us of host time per
# launch (H200 host, triton 3.6), which is a tenth of a whole small-batch step.
_BEST_CONFIGS: dict = {}


def launch(kernel, grid, ref, args, meta, configs=(), prune=None, reset=()):
    """Run ``kernel`` on ``grid(meta)`` programs: the interpreter unless on CUDA, else autotuned
    (``reset``: names of arguments the kernel accumulates into, zeroed around the autotuner's timing runs)."""
    if interpreting(ref, kernel):
        meta = {**meta, **INTERPRET_META, "UPCAST": True}
        meta = {key: value for key, value in meta.items() if key in kernel.arg_names}
        interpreted(kernel)[grid(meta)](*args, **meta)
        return
    key = (kernel, *meta.items(), *(a.dtype if isinstance(a, torch.Tensor) else a for a in args))
    best = _BEST_CONFIGS.get(key)
    if best is not None:
        kernel[grid](*args, **meta, UPCAST=False, **best)
        return
    tuner = _autotuned(kernel, tuple(configs), prune, tuple(reset))
    tuner[grid](*args, **meta, UPCAST=False)
    _BEST_CONFIGS[key] = tuner.best_config.all_kwargs()


def dot_precision(x: torch.Tensor) -> str:
    """fp32 dots: tf32 when torch allows it; else ieee in the interpreter and, on CUDA, 3×tf32 (split
    operands on the tensor cores, about fp32 accuracy; plain ieee dots run on the FMA units, 8.6× eager's
    time on an H100). Other dtypes ignore it."""
    if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3" if x.is_cuda else "ieee"
    return "tf32"  # Triton's default


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once: the forward runs on a hot path); 4
    pretend SMs in the interpreter, so that the CPU tests see several programs per grid axis."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------------------
# Argument checks and conversions shared by every launcher.


def check_operands(q, k, logit_scale, targets, key_valid):
    """Shapes and dtypes of queries ``q`` (m, d), keys ``k`` (n, d), the scale, ``targets`` (m,) and
    ``key_valid`` (n,); raises ValueError / TypeError (no host sync on values)."""
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q (m, d) and k (n, d) must share d; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q and k must share a dtype in fp32/fp16/bf16; got {q.dtype}, {k.dtype}")
    if max(q.numel(), k.numel()) >= 2**31:
        # Offsets inside the kernels are 32-bit; the ring strategy keeps every block at b_local rows.
        raise ValueError(
            f"q {tuple(q.shape)} / k {tuple(k.shape)}: 2^31 elements or more per operand are not supported by the "
            "Triton kernels (32-bit offsets); use loss.strategy=ring or a smaller per-call batch"
        )
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must have one element; got shape {tuple(logit_scale.shape)}")
    if targets is not None and targets.shape != (q.shape[0],):
        raise ValueError(f"targets must have shape ({q.shape[0]},); got {tuple(targets.shape)}")
    if key_valid is not None and key_valid.shape != (k.shape[0],):
        raise ValueError(f"key_valid must have shape ({k.shape[0]},); got {tuple(key_valid.shape)}")


def kernel_args(q, logit_scale, targets, key_valid, diag=False):
    """(scale, targets, key mask) as the kernels take them, with as few torch ops as possible (each costs
    host time that small batches feel): the kernels read the scale's one element in its own dtype,
    int64 targets (−1 when absent; ``diag``: never read), the mask's bytes; ``q`` is the dummy pointer
    for whatever a kernel will not read."""
    if diag:
        targets = q
    elif targets is None:
        targets = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)
    elif targets.dtype != torch.int64:
        targets = targets.to(torch.int64)
    return logit_scale, targets, mask_bytes(key_valid, q)


def mask_bytes(key_valid, dummy):
    """A bool mask as int8 (a view: same bytes), or ``dummy`` when there is none."""
    if key_valid is None:
        return dummy
    key_valid = key_valid.contiguous()
    return key_valid.view(torch.int8) if key_valid.dtype == torch.bool else key_valid.to(torch.int8)
