"""Typed configuration: one dataclass per section, a YAML recipe, dotted overrides.

A recipe is a YAML file whose top-level keys are the sections of :class:`Config`
(``model``, ``data``, ``loss``, ``optim``, ``train``, ``eval``). Every key is checked
against the dataclasses: an unknown key or a value of the wrong type is an error that
names the field, so a typo never silently falls back to a default.

Overrides use dotted paths, e.g. ``--set train.max_steps=50 --set model.text.num_layers=2``;
the value is parsed as YAML (``true``, ``3``, ``1e-4``, ``[1, 5]``, ``null``).

A recipe may start from another one with a top-level ``base: other.yaml`` (a path relative to the
recipe's own file): the base is read first (it may have a base of its own) and the recipe's
sections are merged into it key by key, so an overlay lists only what it changes (mappings merge,
any other value, lists included, replaces). Ablation recipes are such overlays. The resolved
recipe written to ``RUN/config.yaml`` has no ``base``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_shards import storage
from pretrain.losses.false_negatives import GROUP_MODES
from pretrain.losses.protclip import ProtCLIPLossConfig, validate_protclip_config
from pretrain.models.sequence_encoder import SequenceEncoderConfig
from pretrain.models.structure_encoder import StructureEncoderConfig
from pretrain.models.text_encoder import TextEncoderConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DEFAULT_RECIPE = CONFIGS_DIR / "recipes" / "demo.yaml"
CHECKPOINTABLE_ENCODERS = ("sequence", "structure", "text")  # names accepted by train.activation_checkpointing


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` / ``5E3`` (no dot: YAML 1.1 leaves them strings) as floats."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A recipe, override or DeepSpeed config is invalid; the message names the field or file."""


@dataclass
class ModelConfig:
    sequence: SequenceEncoderConfig = field(default_factory=SequenceEncoderConfig)
    structure: StructureEncoderConfig = field(default_factory=StructureEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 256  # shared embedding dimension of the three projection heads
    head_hidden_dim: int | None = None  # hidden width of each 2-layer head (None: the encoder width)
    head_dropout: float = 0.0  # dropout between the two head layers
    init_temperature: float = 0.07  # CLIP's initial softmax temperature; logit scale = 1 / T
    max_logit_scale: float = 100.0  # clamp of the learned logit scale (CLIP)


@dataclass
class DataConfig:
    train_shards: str = "data/demo/train"  # directory with WebDataset shards + manifest.json
    eval_shards: str = "data/demo/heldout"  # held-out shard directory used by evaluation
    batch_size: int = 32  # per-rank micro batch; the global batch is batch_size x world size
    loader: str = "ray"  # "ray" (reader actors) or "local" (same code, in-process; tests, eval)
    readers_per_rank: int = 2  # Ray reader actors owned by each training rank
    prefetch_batches: int = 4  # batches kept in flight per rank
    text_augment: bool = True  # varied descriptions of the annotations (train; protclip uses its own text)
    text_rewrite_prob: float = 0.5  # with text_augment: chance of a stored LLM rewrite (text.rewrites) when present
    text_definition_prob: float = 0.3  # with text_augment: chance per GO term with a stored definition of using it
    property_sampling: bool = False  # ProtCLIP property-driven sampling from the shards' sample_props
    seq_mask_prob: float = 0.15  # token masking of the second sequence view (intra-modal loss)
    coord_noise: float = 0.5  # Gaussian noise (angstrom) on the second structure view
    residue_drop_prob: float = 0.1  # residues dropped from the second structure view
    # Predicted models (AlphaFold): residues whose pLDDT is below this leave the structure graph
    # (SaProt masks below 70); None keeps every residue. Experimental structures carry no pLDDT.
    min_plddt: float | None = None
    max_bad_sample_ratio: float = 0.05  # stop the run when more samples than this were unreadable
    bad_ratio_min_samples: int = 1000  # the ratio is of at least this many samples (early batches)
    ray_timeout_s: float = 300.0  # hard timeout on any wait for a reader actor
    reader_resource: str | None = None  # custom Ray resource each reader actor needs 1 of (e.g. "reader_slot"):
    # advertised only by CPU reader nodes, it keeps readers off the GPU nodes (launch/ray_cluster_aws.yaml)


@dataclass
class LossConfig:
    alpha: float = 1.0  # weight of L(seq, struct)
    beta: float = 1.0  # weight of L(seq, text)
    gamma: float = 1.0  # weight of L(struct, text)
    intra_seq: float = 0.1  # intra-modal auxiliary contrastive weight, sequence views
    intra_struct: float = 0.1  # ... structure views
    intra_text: float = 0.1  # ... text views
    backend: str = "auto"  # kernels.infonce backend: "auto", "torch" or "triton"
    strategy: str = "allgather"  # negatives across ranks: "allgather" or "ring"
    objective: str = "align_pro"  # "align_pro" (the weights above) or "protclip" (GC + MLM + BSR + PDA, below)
    # Align-Pro false negatives: "none", "text" (proteins with identical canonical function text are one
    # class) or "go" (identical GO-id set); applies to the text terms (seq-text, struct-text, intra-text)
    false_negatives: str = "none"
    protclip: ProtCLIPLossConfig = field(default_factory=ProtCLIPLossConfig)  # ProtCLIP terms (objective protclip)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate of the projection heads and logit scale
    encoder_lr: float = 3e-4  # peak learning rate of the encoders in stage 2
    weight_decay: float = 0.01  # AdamW decay of weight matrices; biases, norm gains and the logit scale get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 10  # linear warm-up from 0, then cosine decay to min_lr_ratio x peak
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient norm clip (DeepSpeed gradient_clipping)


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps in total (both stages)
    stage1_steps: int = 40  # steps with encoders frozen (heads + temperature only); 0 skips stage 1
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # complete checkpoints kept on disk (and in remote_dir)
    remote_dir: str | None = None  # s3://bucket/runs/x (any fsspec URL) or a shared-FS path: checkpoints + export
    # are published there after each save and resumed from it; RUN/checkpoints is then local staging
    seed: int = 0  # model init, data order and augmentation
    eval_at_end: bool = True  # run retrieval on data.eval_shards after the last step
    max_nonfinite_steps: int = 5  # stop after this many consecutive steps with non-finite loss/gradients
    max_failed_checkpoints: int = 2  # stop after this many consecutive checkpoint saves failed (disk full, I/O)
    validate_every: int = 0  # steps between validation retrievals on data.eval_shards (0: off)
    tensorboard: bool = True  # mirror metrics to RUN/tensorboard (when a writer library is installed)
    wandb: bool = False  # mirror metrics to Weights & Biases (when wandb is installed)
    wandb_project: str = "align-pro"  # W&B project name
    # Large-batch engine (pretrain/two_pass.py, pretrain/precision.py). These live in ``train``, not
    # ``model``: they change how a step is computed, not the weights, so toggling them keeps the
    # model fingerprint (and resuming) intact.
    grad_cache_chunk: int = 0  # rows per chunk of the two-pass (GradCache) step; 0: plain one-pass step
    # Encoders whose layers recompute their activations in backward (torch.utils.checkpoint):
    # any of "sequence" (ESM-2 layers), "structure" (GVP layers), "text" (BERT layers).
    activation_checkpointing: list[str] = field(default_factory=list)
    # Encoders frozen for the whole run, stage 2 included (e.g. [text]: ProtCLIP's frozen
    # PubMedBERT): same names as activation_checkpointing.
    frozen_encoders: list[str] = field(default_factory=list)
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16" (CUDA only); "fp32"


@dataclass
class EvalConfig:
    batch_size: int = 64  # embedding batch size of evaluation
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # recall@k cut-offs
    max_samples: int | None = None  # cap of held-out proteins (None: all)
    validation_samples: int = 256  # proteins used by validation during training (train.validate_every)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, keys: tuple[str, ...] = ("model",)) -> str:
        """sha256 of the sections that must match for a checkpoint to be resumable."""
        payload = {k: dataclasses.asdict(getattr(self, k)) for k in keys}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- building


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce int -> float) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {len(typing.get_args(tp))}, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys of '{where or 'recipe'}': {sorted(names)})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_type(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _merge(base: dict, key_path: str, value: Any) -> None:
    keys = key_path.split(".")
    node = base
    for k in keys[:-1]:
        if node.get(k) is None:  # absent, or an empty section (``train:`` with nothing under it)
            node[k] = {}
        nxt = node[k]
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key_path}': '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b.c=value`` and parse the value as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""  # "1e-4" is a float, here as in recipe files
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return key, value


def _overlay(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay`` merged in: mappings recursively, any other value replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section (every key commented out) changes nothing; it must not wipe the base's
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a plain mapping, with its ``base`` chain resolved (module docstring).

    Raises:
        ConfigError: a file is missing or not a YAML mapping, ``base`` is not a string, or the
            ``base`` chain loops.
    """
    path = Path(path)
    if not path.is_file():
        via = f" (base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"recipe file not found: {path}{via}")
    if path.resolve() in _chain:
        raise ConfigError(f"recipe {path}: 'base' chain loops ({' -> '.join(str(p) for p in (*_chain, path))})")
    try:
        raw = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"recipe {path}: 'base' must be the path of another recipe, got {base!r}")
    return _overlay(read_recipe(path.parent / base, (*_chain, path.resolve())), raw)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe YAML (default: the demo recipe), apply dotted overrides, validate.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, a value has the wrong type,
            or the values are inconsistent (see :func:`validate`).
    """
    path = Path(recipe) if recipe else DEFAULT_RECIPE
    raw = read_recipe(path)
    for item in overrides or []:
        key, value = parse_override(item)
        _merge(raw, key, value)
    try:
        cfg = _build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. a run's config.yaml)."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that need no process group and no data."""
    d, t, lo = cfg.data, cfg.train, cfg.loss
    if d.batch_size < 2:
        raise ConfigError(f"data.batch_size={d.batch_size}: contrastive training needs at least 2 per rank")
    if d.loader not in ("ray", "local"):
        raise ConfigError(f"data.loader={d.loader!r}: expected 'ray' or 'local'")
    if d.readers_per_rank < 1 or d.prefetch_batches < 1:
        raise ConfigError("data.readers_per_rank and data.prefetch_batches must be >= 1")
    if d.reader_resource is not None and not d.reader_resource.strip():
        raise ConfigError("data.reader_resource: expected a Ray resource name or null")
    if not 0.0 <= d.max_bad_sample_ratio <= 1.0:
        raise ConfigError(f"data.max_bad_sample_ratio={d.max_bad_sample_ratio}: expected a value in [0, 1]")
    for name in ("text_rewrite_prob", "text_definition_prob"):
        if not 0.0 <= getattr(d, name) <= 1.0:
            raise ConfigError(f"data.{name}={getattr(d, name)}: expected a value in [0, 1]")
    if lo.backend not in ("auto", "torch", "triton"):
        raise ConfigError(f"loss.backend={lo.backend!r}: expected 'auto', 'torch' or 'triton'")
    if lo.strategy not in ("allgather", "ring"):
        raise ConfigError(f"loss.strategy={lo.strategy!r}: expected 'allgather' or 'ring'")
    if lo.objective not in ("align_pro", "protclip"):
        raise ConfigError(f"loss.objective={lo.objective!r}: expected 'align_pro' or 'protclip'")
    if lo.false_negatives not in ("none", *GROUP_MODES):
        raise ConfigError(f"loss.false_negatives={lo.false_negatives!r}: expected 'none', 'text' or 'go'")
    if lo.false_negatives != "none" and lo.objective != "align_pro":
        raise ConfigError("loss.false_negatives is the align_pro objective's switch; use loss.protclip.false_negatives")
    weights = [lo.alpha, lo.beta, lo.gamma, lo.intra_seq, lo.intra_struct, lo.intra_text]
    if any(w < 0 for w in weights) or (lo.objective == "align_pro" and not any(w > 0 for w in weights)):
        raise ConfigError("loss weights must be >= 0 and at least one must be > 0")
    if lo.objective == "protclip":
        try:
            validate_protclip_config(lo.protclip)
        except ValueError as e:
            raise ConfigError(f"loss.protclip: {e}") from None
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps}: must be >= 1")
    if not 0 <= t.stage1_steps <= t.max_steps:
        raise ConfigError(f"train.stage1_steps={t.stage1_steps}: must be in [0, train.max_steps]")
    if t.grad_cache_chunk < 0:
        raise ConfigError(f"train.grad_cache_chunk={t.grad_cache_chunk}: must be >= 0 (0 is the one-pass step)")
    if t.grad_cache_chunk > 0 and lo.objective == "protclip":
        # ProtCLIP's MLM / BSR / PDA terms read per-token states, not only the pooled embeddings that
        # the two-pass step caches; their gradients would be wrong, so refuse instead.
        raise ConfigError(
            "train.grad_cache_chunk > 0 (two-pass step) is not supported with loss.objective='protclip'; "
            "set train.grad_cache_chunk=0"
        )
    for key in ("activation_checkpointing", "frozen_encoders"):
        names = getattr(t, key)
        if set(names) - set(CHECKPOINTABLE_ENCODERS) or len(set(names)) != len(names):
            raise ConfigError(f"train.{key}={names}: expected distinct names from {list(CHECKPOINTABLE_ENCODERS)}")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r}: expected 'auto', 'bf16' or 'fp32'")
    if t.validate_every < 0:
        raise ConfigError(f"train.validate_every={t.validate_every}: must be >= 0 (0 turns validation off)")
    if t.log_every < 1 or t.checkpoint_every < 1 or t.keep_checkpoints < 1:
        raise ConfigError("train.log_every, train.checkpoint_every and train.keep_checkpoints must be >= 1")
    if t.remote_dir is not None and (not t.remote_dir.strip() or t.remote_dir.startswith("pipe:")):
        raise ConfigError(f"train.remote_dir={t.remote_dir!r}: expected a writable URL or path (pipe: is read-only)")
    if t.max_nonfinite_steps < 1 or t.max_failed_checkpoints < 1:
        raise ConfigError("train.max_nonfinite_steps and train.max_failed_checkpoints must be >= 1")
    o, m, e = cfg.optim, cfg.model, cfg.eval
    for name in ("lr", "eps"):
        if not (math.isfinite(getattr(o, name)) and getattr(o, name) > 0):
            raise ConfigError(f"optim.{name}={getattr(o, name)}: must be a finite number > 0")
    for name in ("encoder_lr", "weight_decay"):  # encoder_lr 0: encoders stay frozen in stage 2
        if not (math.isfinite(getattr(o, name)) and getattr(o, name) >= 0):
            raise ConfigError(f"optim.{name}={getattr(o, name)}: must be a finite number >= 0")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas}: expected two values in [0, 1)")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio}: expected a value in [0, 1]")
    if not (math.isfinite(o.grad_clip) and o.grad_clip >= 0):
        raise ConfigError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 turns clipping off)")
    for name in ("seq_mask_prob", "residue_drop_prob"):
        if not 0.0 <= getattr(d, name) <= 1.0:
            raise ConfigError(f"data.{name}={getattr(d, name)}: expected a value in [0, 1]")
    if d.min_plddt is not None and not 0.0 <= d.min_plddt <= 100.0:
        raise ConfigError(f"data.min_plddt={d.min_plddt}: expected a pLDDT in [0, 100] or null")
    if d.coord_noise < 0 or d.ray_timeout_s <= 0:
        raise ConfigError("data.coord_noise must be >= 0 and data.ray_timeout_s > 0")
    if not 0.0 <= m.head_dropout < 1.0:
        raise ConfigError(f"model.head_dropout={m.head_dropout}: expected a value in [0, 1)")
    if m.init_temperature <= 0 or m.max_logit_scale <= 0:
        raise ConfigError("model.init_temperature and model.max_logit_scale must be > 0")
    if e.batch_size < 1 or e.validation_samples < 1 or (e.max_samples is not None and e.max_samples < 1):
        raise ConfigError("eval.batch_size, eval.validation_samples and eval.max_samples (when set) must be >= 1")
    if cfg.model.embed_dim < 1:
        raise ConfigError(f"model.embed_dim={cfg.model.embed_dim}: must be >= 1")
    if not cfg.eval.ks or any(k < 1 for k in cfg.eval.ks):
        raise ConfigError(f"eval.ks={cfg.eval.ks}: expected positive integers")


def save_config(cfg: Config, path: Path, deepspeed_config: dict | None = None) -> None:
    """Write the resolved recipe (and the DeepSpeed config used) as YAML.

    Atomically (``data_shards.storage.write_text``: a temporary file, then a rename): on a relaunch,
    rank 0 rewrites ``RUN/config.yaml`` while the other ranks may be reading it in ``prepare``, and a
    truncated file read back as a different model stopped them with a config error.
    """
    payload = cfg.to_dict()
    if deepspeed_config is not None:
        payload = {**payload, "deepspeed": deepspeed_config}
    storage.write_text(path, yaml.safe_dump(_plain(payload), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_run_config(run_dir: Path) -> tuple[Config, dict | None]:
    """Read ``RUN/config.yaml`` back into a :class:`Config` and the DeepSpeed dict."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"no config.yaml in run directory {run_dir}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML (a damaged run record?): {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    ds = raw.pop("deepspeed", None)
    try:
        return config_from_dict(raw), ds
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
