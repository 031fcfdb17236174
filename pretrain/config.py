"""Typed configuration: the sections composed into one :class:`Config`, a YAML recipe, dotted overrides.

Each section's dataclass lives beside the code it configures and checks its own values:
``model`` (:mod:`pretrain.models.trimodal`), ``loss`` (:mod:`pretrain.losses.config`, plus the
selected objective's checks), ``data`` (:mod:`pretrain.data.config`), ``optim`` and ``train``
(:mod:`pretrain.engine.config`), ``eval`` (:mod:`pretrain.eval.config`). This module composes them,
reads recipes and overrides, and runs the checks that span sections.

A recipe is a YAML file whose top-level keys are the sections of :class:`Config`
(``model``, ``data``, ``loss``, ``optim``, ``train``, ``eval``). Every key is checked
against the dataclasses: an unknown key or a value of the wrong type is an error that
names the field, so a typo never silently falls back to a default. No float field accepts
``.nan`` / ``.inf`` (checked here for every field); each section's ``validate()`` checks ranges.

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
from pretrain.data.config import DataConfig
from pretrain.engine.config import OptimConfig, TrainConfig
from pretrain.errors import ConfigError
from pretrain.eval.config import EvalConfig
from pretrain.losses.config import LossConfig
from pretrain.losses.registry import objective_class, validate_loss
from pretrain.models.trimodal import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DEFAULT_RECIPE = CONFIGS_DIR / "recipes" / "demo.yaml"


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` / ``5E3`` (no dot: YAML 1.1 leaves them strings) as floats."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


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
        """sha256 of the sections that must match for a checkpoint to be resumable.

        Fields that change how a result is computed but not the weights or their meaning
        (:data:`NOT_FINGERPRINTED`) are left out, so toggling them (or adding them: an older run's
        config.yaml lacks them) keeps a run resumable.
        """
        payload = {k: dataclasses.asdict(getattr(self, k)) for k in keys}
        if "model" in keys:  # loss settings that add parameters or buffers to the model's state dict
            if self.loss.kind != "infonce":  # SigLIP's term biases
                payload["loss.kind"] = self.loss.kind
            if self.loss.temperature != "shared":  # the per-pair / per-term scales
                payload["loss.temperature"] = self.loss.temperature
            if self.loss.objective == "protclip" and self.loss.protclip.pda_assign != "vq":  # the Gumbel step
                payload["loss.protclip.pda_assign"] = self.loss.protclip.pda_assign
        for path in NOT_FINGERPRINTED:
            node = payload
            for key in path[:-1]:
                node = node.get(key, {})
            node.pop(path[-1], None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# Recipe fields outside the fingerprint: same weights, same outputs within rounding.
NOT_FINGERPRINTED = (("model", "sequence", "attention"),)  # fused or reference ESM-2 attention


# --------------------------------------------------------------------------- building


class TypedReader:
    """Builds a typed dataclass from a YAML mapping: unknown keys refused, every value checked against its
    field's annotation (ConfigError naming the field), int -> float the only coercion.

    Annotations read: ``int``, ``float`` (nan / +-inf refused while :attr:`finite_floats`), ``bool``,
    ``str``, ``X | None`` and other unions (the first member that accepts the value), ``list[X]``,
    ``tuple[X, ...]`` / ``tuple[X, Y]``, ``dict[...]`` (a mapping, values unchecked), ``Any`` and nested
    dataclasses (built by :meth:`build`); any other annotation is a ConfigError. This class reads the
    recipes; ``pretrain.benchmark.suite`` subclasses it for its own wording (:meth:`unknown_keys`,
    :attr:`true_false`) and to validate each object as it is built (:meth:`make`).
    """

    finite_floats = True  # refuse nan / +-inf in every float field
    true_false = "true/false"  # how a bool field's error names the two values

    def unknown_keys(self, where: str, unknown: list[str], known: list[str]) -> str:
        """The error message for keys of ``where``'s mapping that ``known`` (the fields) lacks."""
        prefix = f"{where}." if where else ""
        return f"unknown config key '{prefix}{unknown[0]}' (valid keys of '{where or 'recipe'}': {known})"

    def make(self, cls: type, kwargs: dict[str, Any], where: str) -> Any:
        """The dataclass from its checked field values."""
        return cls(**kwargs)

    def check(self, value: Any, tp: Any, where: str) -> Any:
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
                    return self.check(value, arg, where)
                except ConfigError as e:
                    errors.append(str(e))
            raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
        if origin is list:
            if not isinstance(value, list):
                raise ConfigError(f"{where}: expected a list, got {value!r}")
            (item,) = typing.get_args(tp) or (Any,)
            return [self.check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list of {len(typing.get_args(tp))}, got {value!r}")
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(self.check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        if origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r}")
            return value
        if tp is Any:
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: expected a number, got {value!r}")
            if not self.finite_floats:
                return float(value)
            # No float field of any section means anything by nan or +-inf (a timeout, a clamp, a weight):
            # refused here once for all of them, so a field added later is covered without its own check.
            try:
                number = float(value)
            except OverflowError:  # an integer literal beyond the float range
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{where}={number}: must be a finite number")
            return number
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return value
        if tp is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected {self.true_false}, got {value!r}")
            return value
        if tp is str:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: expected a string, got {value!r}")
            return value
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, where)
        raise ConfigError(f"{where}: unsupported annotation {tp!r}")

    def build(self, cls: type, data: Any, where: str) -> Any:
        """Dataclass ``cls`` from mapping ``data`` (``None``: all defaults); ``where`` names it in errors."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(self.unknown_keys(where, unknown, sorted(names)))
        kwargs = {
            name: self.check(value, hints[name], f"{where}.{name}" if where else name) for name, value in data.items()
        }
        return self.make(cls, kwargs, where)


_RECIPES = TypedReader()


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
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    except OSError as e:  # unreadable (permissions, a directory on some file systems)
        raise ConfigError(f"recipe {path} cannot be read: {e}") from None
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
        cfg = _RECIPES.build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. a run's config.yaml)."""
    cfg = _RECIPES.build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every section's own checks, then the checks across sections; none needs a process group or data."""
    cfg.model.validate()
    cfg.data.validate()
    validate_loss(cfg.loss)  # the section's own checks, then the selected objective's
    cfg.optim.validate()
    cfg.train.validate()
    cfg.eval.validate()
    objective = cfg.loss.objective
    if cfg.train.grad_cache_chunk > 0 and not objective_class(objective).two_pass:
        # e.g. ProtCLIP's MLM / BSR / PDA terms read per-token states, not only the pooled embeddings
        # that the two-pass step caches; their gradients would be wrong, so refuse instead.
        raise ConfigError(
            f"train.grad_cache_chunk > 0 (two-pass step) is not supported with loss.objective={objective!r}; "
            "set train.grad_cache_chunk=0"
        )


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
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML (a damaged run record?): {e}") from None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    ds = raw.pop("deepspeed", None)
    try:
        return config_from_dict(raw), ds
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
