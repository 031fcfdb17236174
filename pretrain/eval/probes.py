"""Probes on frozen embeddings: a linear layer (or a small MLP) trained full-batch.

Multi-label tasks (GO, EC) use a sigmoid per label and binary cross-entropy; single-label tasks
(fold / family) a softmax and cross-entropy. Inputs are standardised with the training set's
mean and std, stored in the probe so that a saved probe is self-contained. Training is
deterministic (seeded init, full batch, fixed number of steps).

Saved layout (``save_probe``): ``<dir>/<name>.safetensors`` (weights + ``mean`` / ``std``) with
the probe config in the safetensors metadata; the label order lives in ``<dir>/labels.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class ProbeConfig:
    kind: str = "linear"  # "linear" or "mlp" (one hidden layer, ReLU, dropout)
    hidden: int = 256  # MLP hidden width
    dropout: float = 0.1  # MLP dropout
    steps: int = 300  # full-batch AdamW steps
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


class Probe(nn.Module):
    """Standardise, then linear or MLP; returns logits (B, L)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: ProbeConfig):
        super().__init__()
        if cfg.kind not in ("linear", "mlp"):
            raise ValueError(f"probe kind {cfg.kind!r}: expected 'linear' or 'mlp'")
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if cfg.kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, out_dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def train_probe(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig, num_classes: int | None = None) -> Probe:
    """Fit a probe.

    Args:
        x: (N, E) features.
        y: (N, L) bool for multi-label, or (N,) int class indices with ``num_classes`` set.
        cfg: probe settings.
        num_classes: number of classes of a single-label task (None: multi-label).
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    multilabel = num_classes is None
    out_dim = y.shape[1] if multilabel else num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = Probe(xt.shape[1], out_dim, cfg)
        probe.mean.copy_(xt.mean(0))
        probe.std.copy_(xt.std(0, unbiased=False).clamp_min(1e-6))
        if multilabel:
            target = torch.from_numpy(np.asarray(y, dtype=np.float32))
            loss_fn = nn.BCEWithLogitsLoss()
        else:
            target = torch.from_numpy(np.asarray(y, dtype=np.int64))
            loss_fn = nn.CrossEntropyLoss()
        opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        probe.train()
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(probe(xt), target)
            loss.backward()
            opt.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: Probe, x: np.ndarray, multilabel: bool = True) -> np.ndarray:
    """Scores in [0, 1]: sigmoid per label (multi-label) or softmax over classes.

    Shapes:
        x (N, E) -> (N, L) float32
    """
    probe.eval()
    logits = probe(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).numpy()


def save_probe(directory: Path, name: str, probe: Probe, **meta) -> Path:
    """Write ``<directory>/<name>.safetensors`` with the probe config (+ ``meta``) as metadata."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in probe.state_dict().items()}
    info = {
        "config": json.dumps(asdict(probe.cfg)),
        "in_dim": str(probe.mean.numel()),
        **{k: json.dumps(v) for k, v in meta.items()},
    }
    save_file(state, str(path), metadata=info)
    return path


def load_probe(path: Path) -> tuple[Probe, dict]:
    """Rebuild a probe written by :func:`save_probe`; returns (probe, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    cfg = ProbeConfig(**json.loads(meta["config"]))
    state = load_file(str(path))
    last = "net.weight" if cfg.kind == "linear" else "net.3.weight"
    probe = Probe(int(meta["in_dim"]), state[last].shape[0], cfg)
    probe.load_state_dict(state)
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("config", "in_dim")}
    return probe.eval(), extra
