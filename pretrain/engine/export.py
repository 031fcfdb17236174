"""Consolidated export: one safetensors file + the recipe, usable without DeepSpeed.

``RUN/export/model.safetensors`` holds the full fp32 state dict (ZeRO-3 partitions are
gathered first), ``RUN/export/config.yaml`` the run's full recipe, and ``RUN/export/text/`` the
text encoder's tokenizer and ``config.json`` when the run used a pretrained text directory or a
vocabulary file of its own (never their weights). :func:`load_exported` rebuilds the
:class:`TriModalModel` from the export alone (with the ProtCLIP heads when the recipe's
``loss.objective`` is protclip): the pretrained ESM-2 ``.pt`` and BERT weights the run started from
are not read again (they may be gigabytes, on another machine), and the returned config points
the text encoder at ``text/``, so the tokenizer comes from the export too. With
``train.remote_dir`` set the export is also uploaded to ``<remote_dir>/export`` (config.yaml
last), and :func:`load_exported` accepts such a URL (weights go to a temporary directory, the
few kilobytes of ``text/`` to a directory that outlives the call, for the tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pretrain.config import Config, load_run_config, save_config
from pretrain.engine.builder import build_model
from pretrain.models.trimodal import TriModalModel

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
TEXT_DIR = "text"  # the text encoder's tokenizer files and config.json, never its weights
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_engine(engine, cfg: Config, out_dir: Path, step: int | None = None) -> Path | None:
    """Gather the (possibly ZeRO-3 partitioned) parameters and write the export on rank 0.

    Collective: call on every rank. Returns the directory on rank 0, None elsewhere. ``step`` (the
    training step the weights are from) is recorded in the safetensors metadata (:func:`export_step`).
    ``out_dir`` is ``RUN/export``: a best checkpoint the run pinned is written to ``out_dir/best`` too
    (:func:`export_best`, from its checkpoint files on rank 0 while the other ranks go on).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    params = list(module.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    # A bf16/fp16 engine trains fp32 master weights and keeps a rounded copy in the module: export the
    # masters (what zero_to_fp32 and a resume read). Collective under ZeRO: every rank, same order.
    masters: dict[str, torch.Tensor] = {}
    if any(p.dtype != torch.float32 for p in params):
        tied: dict[int, tuple] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            tied.setdefault(id(p), (p, []))[1].append(name)
        for p, names in tied.values():
            full = safe_get_full_fp32_param(p)
            if full is not None and rank == 0:
                for name in names:
                    masters[name] = full.detach().to("cpu", torch.float32)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            state = {
                k: (masters[k].reshape(v.shape) if k in masters else v.detach())
                .to("cpu", torch.float32)
                .clone()
                .contiguous()
                for k, v in module.state_dict().items()
            }
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    out = write_export(state, cfg, out_dir, step=step)
    try:
        export_best(Path(out_dir).parent, out, last_state=state, last_step=step)  # RUN/export -> RUN
    except (OSError, ValueError) as e:  # the last export is written; the run is not failed for the best's
        log.error("the best checkpoint was not exported to %s: %s", out / "best", e)
    if cfg.train.remote_dir:
        from pretrain.engine.checkpoint_store import publish_export

        publish_export(out, cfg.train.remote_dir)
    return out


def write_export(
    state: dict[str, torch.Tensor], cfg: Config, out_dir: Path, step: int | None = None, extra: dict | None = None
) -> Path:
    """Write ``state`` (as fp32 copies) and ``cfg`` to ``out_dir`` atomically (temp dir, then rename).

    Copies also untie shared tensors (ESM-2's lm_head shares the token embedding), which
    safetensors refuses to store twice; loading re-ties them through the module. ``extra``: more
    string metadata for the safetensors header.
    """
    state = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in state.items()}
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "producer": "align-pro"}
    if step is not None:
        metadata["step"] = str(int(step))
    metadata.update(extra or {})
    save_file(state, str(tmp / MODEL_FILE), metadata=metadata)
    _copy_text_files(cfg, tmp / TEXT_DIR)
    save_config(cfg, tmp / "config.yaml")
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def export_step(export_dir: Path | str) -> int | None:
    """The training step a complete export (directory or URL) holds, from its safetensors header.

    None when there is no complete export (``config.yaml`` is written last) or it records no step
    (exports written before steps were recorded). Storage errors other than absence propagate.
    """
    from data_shards import storage

    if not storage.exists(storage.join(export_dir, "config.yaml")):
        return None
    try:
        with storage.open_read(storage.join(export_dir, MODEL_FILE)) as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(size))
        step = header.get("__metadata__", {}).get("step")
        return int(step) if step is not None else None
    except (FileNotFoundError, ValueError, struct.error, AttributeError):  # absent or not a safetensors file
        return None


def _copy_text_files(cfg: Config, dest: Path) -> None:
    """Copy the text encoder's tokenizer files (and config.json) into the export, if it has any."""
    text = cfg.model.text
    if text.pretrained_dir is not None:
        sources = [Path(text.pretrained_dir) / name for name in TEXT_FILES]
        sources = [p for p in sources if p.is_file()]
        required = Path(text.pretrained_dir) / "config.json"
    elif text.vocab_file is not None:
        required = Path(text.vocab_file)
        sources = [required]
    else:
        return  # the bundled demo vocabulary ships with the package
    if not required.is_file():
        raise FileNotFoundError(f"{required} is missing: the export needs the text encoder's config and vocabulary")
    dest.mkdir()
    for src in sources:
        shutil.copyfile(src, dest / ("vocab.txt" if text.pretrained_dir is None else src.name))


def _with_export_text(cfg: Config, export_dir: Path) -> Config:
    """``cfg`` with the text encoder's directory / vocabulary taken from the export's ``text/``."""
    text_dir = (export_dir / TEXT_DIR).resolve()  # past the link a downloaded export has
    if not text_dir.is_dir():
        return cfg
    text = cfg.model.text
    if text.pretrained_dir is not None:
        cfg.model.text = dataclasses.replace(text, pretrained_dir=str(text_dir))
    elif text.vocab_file is not None:
        cfg.model.text = dataclasses.replace(text, vocab_file=str(text_dir / "vocab.txt"))
    return cfg


def _download_export(url: str, tmp: Path) -> Path:
    """Fetch an exported model to ``tmp``; ``text/`` goes to a directory that outlives ``tmp`` (the
    loaded config points its tokenizer there) and is removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    from data_shards import storage

    for name in (MODEL_FILE, "config.yaml"):
        storage.download_file(storage.join(url, name), tmp / name)
    remote_text = storage.join(url, TEXT_DIR)
    if storage.exists(remote_text):  # remotely: any object under the prefix
        kept = Path(tempfile.mkdtemp(prefix="align-pro-export-text-"))
        atexit.register(shutil.rmtree, kept, True)  # one per remote load: never left behind in /tmp
        storage.download_dir(remote_text, kept)
        os.symlink(kept, tmp / TEXT_DIR)
    return tmp


class ExportError(ValueError, RuntimeError):
    """An export that cannot be loaded: damaged, incomplete or not matching its config; names the file.

    A ValueError (bad input: the command-line tools report it in one line and exit 2) and a
    RuntimeError (what a weights / config mismatch raised before this class existed).
    """


def _read_weights(weights: Path, device: str) -> dict[str, torch.Tensor]:
    """``model.safetensors`` as a state dict; :class:`ExportError` naming the file when it is not one."""
    from safetensors import SafetensorError

    try:
        return load_file(str(weights), device=device)
    except SafetensorError as e:  # truncated, empty, another format (a pickle, a text file)
        raise ExportError(
            f"{weights}: not a complete safetensors file ({e}); the export is damaged or was not fully "
            "copied: export it again (python -m pretrain.export --run-dir RUN)"
        ) from None


def check_device(device: str) -> None:
    """ValueError naming ``device`` when torch cannot place tensors there (a typo, CUDA absent)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(f"device {device!r}: {count} CUDA device(s) visible")


def load_exported(export_dir: Path | str, device: str = "cpu") -> tuple[TriModalModel, Config]:
    """Rebuild the model from an export directory or URL (safetensors only: nothing is unpickled).

    Returns the model in eval mode and the run's config, whose text encoder points at the
    export's own tokenizer files (see the module docstring).

    Raises:
        FileNotFoundError: the directory, its ``model.safetensors`` or its ``config.yaml`` is missing.
        ConfigError: ``config.yaml`` is not YAML or not a valid recipe (the message names the file).
        ExportError: ``model.safetensors`` is not a complete safetensors file, or the model that
            ``config.yaml`` describes cannot be built or does not match the weights.
        ValueError: ``device`` is not usable here.
        Each is an OSError or a ValueError: a tool reports it in one line.
    """
    from data_shards import storage

    check_device(device)
    if storage.is_url(export_dir):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="align-pro-export-") as tmp:
            return load_exported(_download_export(str(export_dir), Path(tmp)), device)
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"export directory {export_dir} does not exist (or is not a directory)")
    weights = export_dir / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in export directory {export_dir}")
    if not (export_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"no config.yaml in export directory {export_dir} (it is written last: incomplete?)")
    cfg, _ = load_run_config(export_dir)
    cfg = _with_export_text(cfg, export_dir)
    state = _read_weights(weights, device)  # before the model: a damaged file fails fast
    # Every weight comes from model.safetensors: the pretrained ESM-2 .pt / BERT weights the run
    # started from are not read again (relative paths, up to 30 GB for esm2_t48_15B).
    try:
        model = build_model(cfg, load_pretrained=False)
    except (OSError, ValueError) as e:  # e.g. a text/ directory without a usable config.json
        raise ExportError(f"{export_dir / 'config.yaml'}: cannot build the model it describes: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of the wrong shape
        detail = " ".join(str(e).split())[:500]
        raise ExportError(f"{weights}: does not match the model in config.yaml: {detail}") from None
    if missing or unexpected:
        raise ExportError(f"{weights}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(device).eval(), cfg


def export_checkpoint(run_dir: Path, tag: str | None = None, out_dir: Path | None = None) -> Path:
    """Consolidate a (ZeRO-sharded) checkpoint of ``run_dir`` into an export, without DeepSpeed.

    The sharded fp32 partitions are read and zipped back together by
    :func:`pretrain.engine.zero_consolidate.consolidate_zero_checkpoint` (``weights_only`` loads,
    DeepSpeed need not be installed). When the run pinned a best checkpoint
    (:mod:`pretrain.engine.best_checkpoint`) and ``out_dir`` is the default, it is exported too, as
    ``RUN/export/best/`` (:func:`export_best`).

    Raises:
        FileNotFoundError: no complete checkpoint (or not ``tag``) in ``RUN/checkpoints``.
        ZeroCheckpointError: a checkpoint file is missing, refused (it needs unpickling) or not
            understood; the message names it.
    """
    from pretrain.engine.checkpoint_tags import COMPLETE, complete_record, latest_tag

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    cfg, _ = load_run_config(run_dir)
    state = consolidate_checkpoint(ckpt_dir / tag)
    step = int(complete_record(ckpt_dir / tag)["step"]) if (ckpt_dir / tag / COMPLETE).is_file() else None
    out = write_export(state, cfg, Path(out_dir) if out_dir else run_dir / "export", step=step)
    if out_dir is None:
        export_best(run_dir, out, last_state=state, last_step=step)
    return out


def consolidate_checkpoint(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict of checkpoint ``tag_dir``: ZeRO 1-3 partitions zipped together, or the
    whole module of a ZeRO-0 (plain data parallel) fp32 checkpoint. No DeepSpeed needed.

    Raises:
        ZeroCheckpointError: see :func:`consolidate_zero_checkpoint`; also a ZeRO-0 checkpoint whose
            module is not fp32 (its masters live in DeepSpeed's optimizer state: not supported here).
    """
    from pretrain.engine.zero_consolidate import ZeroCheckpointError, consolidate_zero_checkpoint, load_checkpoint_file

    tag_dir = Path(tag_dir)
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        return consolidate_zero_checkpoint(tag_dir)
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{tag_dir}: neither ZeRO optimizer partitions nor {path.name}: not a checkpoint")
    module = load_checkpoint_file(path).get("module")
    if not isinstance(module, dict) or not module:
        raise ZeroCheckpointError(f"{path}: no module state")
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in module.values()):
        raise ZeroCheckpointError(
            f"{path}: a ZeRO-0 checkpoint of a bf16/fp16 run holds rounded weights; export it from the engine"
        )
    return dict(module)


def export_best(run_dir: Path, export_dir: Path, last_state: dict | None = None, last_step: int | None = None):
    """Write the run's pinned best checkpoint (RUN/best_checkpoint.json, or an older run's RUN/best.json:
    :func:`pretrain.engine.best_checkpoint.read`) as ``export_dir/best``.

    Rank 0 only; reads the checkpoint's files (no process group, no DeepSpeed). When the best is
    the step just exported (``last_step``), ``last_state`` is written again instead. The step and the
    score are in the safetensors metadata (``step``, ``select_metric``, ``select_score``) and in
    ``best/best.json``. Returns the directory, or None when no best is pinned or its checkpoint is gone
    (logged).
    """
    from pretrain.engine import best_checkpoint

    record = best_checkpoint.read(run_dir)
    if record is None:
        return None
    ckpt = Path(run_dir) / "checkpoints" / record["tag"]
    if last_state is not None and last_step == record["step"]:
        state = last_state
    elif (ckpt / "COMPLETE").is_file():
        state = consolidate_checkpoint(ckpt)
    else:
        log.warning("best checkpoint %s (step %d) is gone; no export/best written", ckpt, record["step"])
        return None
    cfg, _ = load_run_config(run_dir)
    extra = {"select_metric": record["metric"], "select_score": repr(float(record["score"]))}
    out = write_export(state, cfg, Path(export_dir) / best_checkpoint.EXPORT_SUBDIR, step=record["step"], extra=extra)
    best_checkpoint.write_json(out / best_checkpoint.RECORD_IN_EXPORT, record)
    return out
