"""One fp32 state dict from a DeepSpeed ZeRO checkpoint, read without DeepSpeed and without unpickling.

A ZeRO checkpoint directory (``RUN/checkpoints/<tag>``) holds, for ``W`` data-parallel ranks::

    zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's fp32 master partition of every param group
    zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: the parameter names and shapes, the buffers,
                                                  rank r's fragments of the frozen parameters
    mp_rank_00_model_states.pt                    ZeRO-1/2: the same, written once (frozen params whole)

(``bf16_`` prefixes the optimizer files of a bf16 run). The layout, as DeepSpeed 0.19 writes it and its
``zero_to_fp32`` reads it:

* ZeRO-1/2: group ``g``'s flat fp32 vector is the concatenation of every rank's
  ``single_partition_of_fp32_groups[g]``; its parameters lie in it in ``param_shapes[g]`` order,
  each followed by its ``param_alignment_paddings`` (when recorded), the whole padded to
  ``2 * W`` elements.
* ZeRO-3: each parameter of ``n`` elements is split into ``W`` pieces of ``ceil(n / W)`` (the last
  zero-padded); rank r's ``fp32_flat_groups`` concatenated hold its pieces of all parameters in
  ``param_shapes`` order (all groups merged). Frozen parameters are split the same way in the
  model-state files.

Every file is read with ``torch.load(weights_only=True)``. The only non-tensor objects DeepSpeed
pickles into these files (its loss scaler, the ZeRO stage enum, ZeRO-1/2 fragment addresses) are
admitted under their DeepSpeed names as inert stand-ins defined here, so DeepSpeed need not be
installed; any other object makes the read fail with :class:`UnsafeCheckpointError` naming the file.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path

import torch

__all__ = ["UnsafeCheckpointError", "ZeroCheckpointError", "consolidate_zero_checkpoint", "load_checkpoint_file"]

_RANK_FILE = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt$")


class ZeroCheckpointError(ValueError):
    """A checkpoint directory that is not a complete ZeRO checkpoint; the message names the file."""


class UnsafeCheckpointError(ZeroCheckpointError):
    """A checkpoint file that would need arbitrary unpickling (an object outside DeepSpeed's allowlist)."""


class _DeepSpeedRecord:
    """Inert stand-in for a DeepSpeed state holder (loss scaler, fragment address): keeps its fields."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _LossScaler(_DeepSpeedRecord):
    pass


class _FragmentAddress(_DeepSpeedRecord):
    pass


def _zero_stage(value) -> int:
    """``ZeroStageEnum(value)`` read back as the plain int it is."""
    return int(value)


# DeepSpeed's fully qualified names -> what is built in their place. The names are what pickle
# records; nothing from DeepSpeed is imported.
DEEPSPEED_GLOBALS = [
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def load_checkpoint_file(path: Path, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` admitting only DeepSpeed's state holders (as stand-ins).

    Raises:
        UnsafeCheckpointError: the file needs any other object unpickled (a crafted file, another
            DeepSpeed version's new class), or is not a torch checkpoint; names the file.
    """
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - an UnpicklingError, a zip error: refuse either way
        detail = " ".join(str(e).split())[:400]
        raise UnsafeCheckpointError(
            f"refusing checkpoint file {path}: it cannot be read as tensors and plain data ({detail})"
        ) from None
    if not isinstance(obj, dict):
        raise ZeroCheckpointError(f"{path}: expected a dict of states, found {type(obj).__name__}")
    return obj


def _rank_files(tag_dir: Path, kind: str) -> list[Path]:
    """``*zero_pp_rank_<r>_mp_rank_00_<kind>_states.pt`` in rank order (r = 0 .. W-1, none missing)."""
    found: dict[int, Path] = {}
    for p in tag_dir.iterdir():
        m = _RANK_FILE.match(p.name)
        if m and m.group(3) == kind:
            if int(m.group(2)) != 0:
                raise ZeroCheckpointError(f"{p}: model-parallel checkpoints (mp_rank > 0) are not supported")
            found[int(m.group(1))] = p
    if sorted(found) != list(range(len(found))):
        raise ZeroCheckpointError(
            f"{tag_dir}: {kind} state files of ranks {sorted(found)}: some rank's file is missing"
        )
    return [found[r] for r in range(len(found))]


def _require(state: dict, key: str, path: Path):
    if key not in state:
        raise ZeroCheckpointError(f"{path}: no {key!r}; not a DeepSpeed ZeRO checkpoint file")
    return state[key]


def _numel(shape) -> int:
    return math.prod(shape)


def _model_state(path: Path) -> dict:
    """The parts of a model-state file the consolidation needs (the module's own params are not read:
    under ZeRO they are empty placeholders or rounded copies)."""
    state = load_checkpoint_file(path)
    module = _require(state, "module", path)
    buffer_names = set(_require(state, "buffer_names", path))
    return {
        "buffers": {k: v.float() if v.is_floating_point() else v for k, v in module.items() if k in buffer_names},
        "param_shapes": _require(state, "param_shapes", path),  # list (one per group) of {name: shape}
        "frozen_shapes": state.get("frozen_param_shapes") or {},
        "frozen_fragments": state.get("frozen_param_fragments") or {},
        "shared": dict(state.get("shared_params") or {}),  # tied name -> name it shares storage with
    }


def _optim_states(files: list[Path]) -> tuple[int, list[list[torch.Tensor]], list | None]:
    """(zero stage, each rank's fp32 flat partitions, ZeRO-1/2 alignment paddings) of the optimizer files."""
    stage, flats, paddings = None, [], None
    for r, path in enumerate(files):
        osd = _require(load_checkpoint_file(path, mmap=True), "optimizer_state_dict", path)
        this_stage = int(_require(osd, "zero_stage", path))
        count = _require(osd, "partition_count", path)
        world = max(count) if isinstance(count, list) else int(count)
        if world != len(files):
            raise ZeroCheckpointError(
                f"{path}: written by {world} ranks but {len(files)} optimizer state files are in {path.parent}"
            )
        if stage is not None and this_stage != stage:
            raise ZeroCheckpointError(f"{path}: ZeRO stage {this_stage}, rank 0's file says {stage}")
        stage = this_stage
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        flats.append([t.float() for t in _require(osd, key, path)])
        if r == 0:
            paddings = osd.get("param_alignment_paddings")
    if stage not in (1, 2, 3):
        raise ZeroCheckpointError(f"{files[0]}: ZeRO stage {stage}; expected 1, 2 or 3")
    return stage, flats, paddings


def _merge_zero12(states: dict, model: dict, flats: list[list[torch.Tensor]], paddings, path: Path) -> None:
    """Slice each group's concatenated partitions into its parameters (ZeRO-1/2)."""
    world = len(flats)
    for g, shapes in enumerate(model["param_shapes"]):
        full = torch.cat([rank_groups[g] for rank_groups in flats])  # (sum of partitions,)
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        if len(pads) != len(shapes):
            raise ZeroCheckpointError(f"{path}: {len(pads)} alignment paddings for {len(shapes)} params of group {g}")
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads):
            n = _numel(shape)
            if offset + n > full.numel():
                raise ZeroCheckpointError(f"{path}: group {g} holds {full.numel()} values, {name} needs more")
            states[name] = full.narrow(0, offset, n).view(tuple(shape)).clone()
            offset += n + pad
        align = 2 * world
        if align * math.ceil(offset / align) != align * math.ceil(full.numel() / align):
            raise ZeroCheckpointError(
                f"{path}: group {g} used {offset} of {full.numel()} values: layout not understood"
            )


def _merge_zero3(states: dict, model: dict, flats: list[list[torch.Tensor]], path: Path) -> None:
    """Zip every rank's piece of each parameter back together, dropping the padding (ZeRO-3)."""
    world = len(flats)
    rank_flat = [torch.cat(groups) if groups else torch.empty(0) for groups in flats]  # (P,) per rank
    shapes = {k: v for group in model["param_shapes"] for k, v in group.items()}
    offset = 0
    for name, shape in shapes.items():
        n = _numel(shape)
        piece = math.ceil(n / world)
        if offset + piece > rank_flat[0].numel():
            raise ZeroCheckpointError(f"{path}: the fp32 partitions end before parameter {name}")
        whole = torch.cat([flat.narrow(0, offset, piece) for flat in rank_flat])  # (W * piece,)
        states[name] = whole[:n].view(tuple(shape)).clone()
        offset += piece
    if offset * world != sum(f.numel() for f in rank_flat):
        raise ZeroCheckpointError(
            f"{path}: consumed {offset * world} of {sum(f.numel() for f in rank_flat)} values: layout not understood"
        )


def _merge_frozen(states: dict, models: list[dict], stage: int) -> None:
    """Parameters that were frozen when the checkpoint was written (not in the fp32 partitions'
    shapes, or overwritten by them when they are: the order DeepSpeed's own consolidation uses)."""
    for name, shape in models[0]["frozen_shapes"].items():
        n = _numel(shape)
        if stage == 3:
            pieces = [m["frozen_fragments"][name].reshape(-1) for m in models]
            states[name] = torch.cat(pieces)[:n].view(tuple(shape)).float().clone()
        else:
            states[name] = models[0]["frozen_fragments"][name].reshape(tuple(shape)).float().clone()


def consolidate_zero_checkpoint(tag_dir: Path | str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (parameters, buffers, tied names) of the ZeRO checkpoint in ``tag_dir``.

    Equal, tensor for tensor, to DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` on the
    same directory; needs neither DeepSpeed nor a process group.

    Raises:
        ZeroCheckpointError: a missing rank file, a file of another stage or world size, a layout
            that does not add up (names the file).
        UnsafeCheckpointError: a file that would need arbitrary unpickling.
        FileNotFoundError: ``tag_dir`` or its optimizer / model state files are missing.
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {tag_dir} does not exist")
    optim_files = _rank_files(tag_dir, "optim")
    if not optim_files:
        raise FileNotFoundError(
            f"no *zero_pp_rank_<r>_mp_rank_00_optim_states.pt in {tag_dir}: not a ZeRO (stage 1-3) checkpoint"
        )
    stage, flats, paddings = _optim_states(optim_files)
    if stage == 3:
        model_files = _rank_files(tag_dir, "model")
        if len(model_files) != len(optim_files):
            raise ZeroCheckpointError(f"{tag_dir}: {len(model_files)} model state files, {len(optim_files)} ranks")
    else:
        model_files = [tag_dir / "mp_rank_00_model_states.pt"]
        if not model_files[0].is_file():
            raise FileNotFoundError(f"{model_files[0]} is missing")
    models = [_model_state(p) for p in model_files]
    states: dict[str, torch.Tensor] = OrderedDict(models[0]["buffers"])
    _merge_frozen(states, models, stage)
    if stage == 3:
        _merge_zero3(states, models[0], flats, optim_files[0])
    else:
        _merge_zero12(states, models[0], flats, paddings, optim_files[0])
    for tied, source in models[0]["shared"].items():
        if source in states:
            states[tied] = states[source]
    return states
