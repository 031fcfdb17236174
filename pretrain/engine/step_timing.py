"""What a training step costs: its time split, the encoders' FLOPs and MFU, the loss backend that ran.

Each logged line of ``RUN/metrics.jsonl`` carries, averaged over the steps since the previous line:

- ``time_data_s``: waiting for the next batch from the stream plus copying it to the device;
- ``time_forward_s``: the encoders and heads (under autocast), embeddings cast to fp32;
- ``time_loss_s``: the objective on the embeddings (the gathered contrastive loss);
- ``time_backward_s``: ``engine.backward``;
- ``time_optimizer_s``: ``engine.step()`` (with the finiteness check of ZeRO stage 0);
- ``time_step_s``: the wall time from the start of the data wait to the end of the step. The five
  phases are disjoint parts of it, so they sum to at most this;
- ``encoder_tflops``: the encoders' training FLOPs of the step (:class:`EncoderFlops`) over its wall
  time, in TFLOP/s per rank;
- ``mfu_encoders``: that rate over the device's peak (:func:`device_peak_flops`); None on CPU or
  when no peak is known;
- ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` since the start of the process (GB = 1e9
  bytes); None on CPU.

On CUDA every phase boundary calls ``torch.cuda.synchronize`` so that a phase's kernels are counted
in that phase; on CPU nothing is synchronised and the timer costs two ``perf_counter`` calls a phase.
In the two-pass step (:mod:`pretrain.engine.two_pass`) the embedding pass and the replay both count as
forward, the surrogate backward passes as backward, the objective as loss; the gradient of the loss
with respect to the cached embeddings is in no phase.

MFU counts model FLOPs (no recomputation under activation checkpointing): matrix products of every
token through each encoder's linear layers (2 FLOPs per weight per row), attention scores and their
product with the values (4·s²·h per layer and sequence, padding included), each GVP linear on its
rows as the GVP-GNN is published (edges for the message functions and the edge embedding, nodes
otherwise; vector channels three times: an implementation that reorganises that algebra does fewer);
3× the forward for an encoder that trains at this step, 1× for a frozen one. Projection heads and the
loss are not counted, nor the extra masked ESM-2 passes of the ProtCLIP objective (the count is that of
the Align-Pro forward: one pass per modality and per second view in the batch).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from pretrain.engine.precision import resolve_precision
from pretrain.models.structure_encoder import GVP

PHASES = ("data", "forward", "loss", "backward", "optimizer")
PEAK_ENV = "ALIGN_PRO_PEAK_TFLOPS"  # the device's peak in TFLOP/s, overriding the table below
# Dense bf16 tensor-core peaks (NVIDIA data sheets, no sparsity), in TFLOP/s, by device-name substring
# (first match wins: the specific names come first).
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def device_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's peak FLOP/s for the step's compute dtype, or None when unknown.

    ``ALIGN_PRO_PEAK_TFLOPS`` (TFLOP/s) wins when set; otherwise CUDA devices named in
    :data:`BF16_PEAK_TFLOPS` have a peak for bf16 autocast. CPU and fp32 steps have none.

    Raises:
        ValueError: ``ALIGN_PRO_PEAK_TFLOPS`` is not a positive number.
    """
    raw = os.environ.get(PEAK_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{PEAK_ENV}={raw!r}: expected a positive number of TFLOP/s")
        return value * 1e12
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def _numel(p: Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves a 0-element placeholder in the module


def _linear_weights(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Weights of the ``nn.Linear`` layers under ``module`` (names starting with ``skip`` left out)."""
    return sum(
        _numel(m.weight)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(name.startswith(s) for s in skip)
    )


class EncoderFlops:
    """Forward FLOPs of the three encoders on a collated batch, from the model's layer sizes.

    Args:
        model: a :class:`~pretrain.models.trimodal.TriModalModel` (before or after ZeRO-3 partitioning).
    """

    def __init__(self, model: nn.Module):
        esm = model.sequence_encoder.esm
        # per token: every linear of every layer, the LM head's dense layer and its vocabulary projection
        # (fair-esm computes the logits in every forward); the contact head only runs when asked for.
        self.seq_per_token = 2 * (_linear_weights(esm, skip=("contact_head",)) + _numel(esm.lm_head.weight))
        self.seq_attention = 4 * esm.num_layers * esm.embed_dim  # x s² per sequence
        bert = model.text_encoder.bert
        self.text_per_token = 2 * _linear_weights(bert)
        self.text_attention = 4 * bert.config.num_hidden_layers * bert.config.hidden_size
        self.struct_per_node, self.struct_per_edge = 0, 0
        for name, m in model.structure_encoder.named_modules():
            if isinstance(m, GVP):  # scalar linears once a row, vector linears once per axis
                weights = sum(_numel(x.weight) for x in (m.ws, m.wsv) if x is not None)
                weights += 3 * sum(_numel(x.weight) for x in (m.wh, m.wv) if x is not None)
                if name.startswith("embed_edges") or ".conv." in f".{name}.":  # message functions run per edge
                    self.struct_per_edge += 2 * weights
                else:
                    self.struct_per_node += 2 * weights

    def forward(self, batch: dict) -> dict[str, float]:
        """Forward FLOPs per encoder of one pass over ``batch`` (its second views included).

        Shapes:
            ``seq_tokens`` (B, Ls), ``text_ids`` (B, Lt), ``graph`` with ``node_s`` (N, ·) and
            ``edge_index`` (2, E); the same under ``batch["views"]`` when present.
        """
        out = {"sequence": 0.0, "structure": 0.0, "text": 0.0}
        for src in (batch, batch.get("views") or {}):
            if "seq_tokens" in src:
                b, s = src["seq_tokens"].shape
                out["sequence"] += b * s * (self.seq_per_token + self.seq_attention * s)
            if "text_ids" in src:
                b, s = src["text_ids"].shape
                out["text"] += b * s * (self.text_per_token + self.text_attention * s)
            if "graph" in src:
                g = src["graph"]
                nodes, edges = g["node_s"].shape[0], g["edge_index"].shape[1]
                out["structure"] += nodes * self.struct_per_node + edges * self.struct_per_edge
        return out

    def training(self, batch: dict, frozen: set[str] | frozenset[str] = frozenset()) -> float:
        """FLOPs of one training step's encoder work: 3× the forward of a trained encoder, 1× of a frozen one."""
        return sum(f * (1 if name in frozen else 3) for name, f in self.forward(batch).items())


class StepTimer:
    """Accumulates the phases of each step and reports their means for a metrics line.

    Args:
        device: the training device (CUDA is synchronised at phase boundaries, CPU never).
        flops: the encoders' FLOP model, or None to log no FLOP rate.
        peak_flops: the device's peak FLOP/s (:func:`device_peak_flops`), or None: no MFU.

    Example (what the trainer does)::

        for batch in timer.iterate(stream):    # the wait for the batch is "data"
            with timer.phase("forward"):
                ...
            timer.end_step(batch, frozen)
        numbers, others = timer.summary()      # means since the previous summary
    """

    def __init__(self, device: torch.device, flops: EncoderFlops | None = None, peak_flops: float | None = None):
        self.device, self.flops, self.peak_flops = device, flops, peak_flops
        self.loss_backend: str | None = None  # set by note_loss_backend, reported in the next summary
        self._backend_reported = False
        self._sync = device.type == "cuda"
        self._step_start: float | None = None
        self._current = dict.fromkeys(PHASES, 0.0)
        self._totals = dict.fromkeys((*PHASES, "step", "flops"), 0.0)
        self._steps = 0

    @classmethod
    def for_model(cls, model: nn.Module, device: torch.device, precision: str) -> StepTimer:
        """A timer with ``model``'s FLOP model and the device's peak for ``train.precision``."""
        return cls(device, EncoderFlops(model), device_peak_flops(device, resolve_precision(precision, device)))

    def note_loss_backend(self, loss_cfg, x: Tensor) -> str | None:
        """Resolve the loss backend (:func:`loss_backend`) the first time; returns it then, None afterwards."""
        if self.loss_backend is not None:
            return None
        self.loss_backend = loss_backend(loss_cfg, x)
        return self.loss_backend

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` of the current step (opened here if none is open)."""
        if name not in self._current:
            raise ValueError(f"unknown step phase {name!r}; expected one of {PHASES}")
        start = self._now()
        if self._step_start is None:
            self._step_start = start
        try:
            yield
        finally:
            self._current[name] += self._now() - start

    def timed(self, name: str, fn: Callable) -> Callable:
        """``fn`` wrapped so that each call is timed as phase ``name``."""

        def wrapper(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return wrapper

    def iterate(self, iterable: Iterable) -> Iterator:
        """The items of ``iterable``; the wait for each one opens a step and counts as its ``data`` phase."""
        it, done = iter(iterable), object()
        while True:
            with self.phase("data"):
                item = next(it, done)
            if item is done:  # no step follows this wait
                self._step_start, self._current = None, dict.fromkeys(PHASES, 0.0)
                return
            yield item

    def end_step(self, batch: dict | None = None, frozen: set[str] | frozenset[str] = frozenset()) -> None:
        """Close the current step (its wall time ends now); ``batch`` and the ``frozen`` encoders give its FLOPs."""
        flops = self.flops.training(batch, frozen) if self.flops is not None and batch is not None else 0.0
        end = self._now()
        start = self._step_start if self._step_start is not None else end
        for name in PHASES:
            self._totals[name] += self._current[name]
        self._totals["step"] += end - start
        self._totals["flops"] += flops
        self._steps += 1
        self._step_start, self._current = None, dict.fromkeys(PHASES, 0.0)

    def summary(self) -> tuple[dict[str, float], dict[str, str | None]]:
        """Means over the steps closed since the last summary (module docstring), then start afresh.

        Returns:
            ``(numbers, others)``: the figures that are numbers (to average over ranks), and those
            that are None here (MFU, peak memory on CPU) plus ``loss_backend`` in the first summary
            after :meth:`note_loss_backend`.
        """
        n = max(self._steps, 1)
        out: dict[str, float | None] = {f"time_{name}_s": self._totals[name] / n for name in PHASES}
        out["time_step_s"] = self._totals["step"] / n
        rate = self._totals["flops"] / self._totals["step"] if self.flops is not None and self._totals["step"] else None
        out["encoder_tflops"] = None if rate is None else rate / 1e12
        out["mfu_encoders"] = None if rate is None or self.peak_flops is None else rate / self.peak_flops
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9 if self._sync else None
        self._totals = dict.fromkeys(self._totals, 0.0)
        self._steps = 0
        others: dict[str, str | None] = {k: v for k, v in out.items() if v is None}
        if self.loss_backend is not None and not self._backend_reported:
            others["loss_backend"] = self.loss_backend
            self._backend_reported = True
        return {k: v for k, v in out.items() if v is not None}, others


class TimedObjective:
    """An objective whose calls are timed as the ``loss`` phase; every attribute is the objective's own."""

    def __init__(self, objective: Callable, timer: StepTimer):
        self._objective, self._timer = objective, timer

    def __call__(self, *args, **kwargs):
        with self._timer.phase("loss"):
            return self._objective(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._objective, name)


def loss_backend(loss_cfg, x: Tensor) -> str:
    """The backend the objective's loss kernels run for ``loss.backend`` on embeddings like ``x``.

    ``"auto"`` resolves as :func:`kernels.functional.resolve_backend` does inside the loss: Triton for
    CUDA tensors when the kernel module imports (the sigmoid loss: for fp32 / fp16 / bf16), else torch.

    Args:
        loss_cfg: the ``loss`` section (``backend``, ``kind``).
        x: an embedding tensor as the loss receives it (device and dtype are what count).
    """
    from kernels import functional, sigmoid, trimodal
    from kernels.functional import resolve_backend

    if getattr(loss_cfg, "kind", "infonce") == "sigmoid":
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        return resolve_backend(loss_cfg.backend, x, sigmoid.triton_available, dtypes=dtypes)
    if getattr(loss_cfg, "objective", "align_pro") == "align_pro" and getattr(loss_cfg, "fuse_terms", False):
        # Align-Pro's terms in one kernels.trimodal_infonce call
        return resolve_backend(loss_cfg.backend, x, trimodal.triton_available)
    return resolve_backend(loss_cfg.backend, x, functional.triton_available)
