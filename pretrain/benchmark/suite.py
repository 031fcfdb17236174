"""Benchmark suites: a YAML file naming the proteins table and the tasks to run on its embeddings.

    name: shared_data
    data_root: ../../../shared/data      # relative paths below are taken from here (default: the YAML's folder)
    proteins: annotations/pdb_chains.tsv  # id / sequence / structure_file / chain table (pretrain.benchmark.data)
    text_column: protein_name             # optional: texts for cross-modal tasks
    bootstrap: {resamples: 1000, level: 0.95, seed: 0}
    base: false                           # also run the encoders before alignment (the CLI's --base)
    tasks:
      - name: EC                          # a name for the results (unique)
        type: function                    # a key of pretrain.benchmark.registry.TASKS
        annotations: annotations/nrPDB-EC_2020.04_annot.tsv
        split: {method: cluster, identity: 0.3, test_fraction: 0.3}

Every key is checked: an unknown key, a missing file or a bad value is a :class:`ConfigError` that
names the suite file and the key. Task options are validated by the task's own config dataclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pretrain.errors import ConfigError


@dataclass
class BootstrapConfig:
    resamples: int = 1000  # bootstrap redraws of the test items
    level: float = 0.95  # interval coverage
    seed: int = 0  # the same seed draws the same items for every method (paired intervals)

    def validate(self, where: str) -> None:
        if self.resamples < 0:
            raise ConfigError(f"{where}: bootstrap.resamples must be >= 0, got {self.resamples}")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"{where}: bootstrap.level must lie in (0, 1), got {self.level}")


@dataclass
class TaskSpec:
    name: str
    type: str
    options: dict  # the task's own keys, validated by its config class


@dataclass
class Suite:
    name: str
    path: Path  # the suite file
    data_root: Path
    proteins: Path
    text_column: str | None = None
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    base: bool = False
    batch_size: int = 16
    tasks: list[TaskSpec] = field(default_factory=list)

    def resolve(self, value: str | Path) -> Path:
        """A suite path: absolute as is, else under ``data_root``."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.data_root / p)


_SUITE_KEYS = {"name", "data_root", "proteins", "text_column", "bootstrap", "base", "batch_size", "tasks"}


def _check_type(value, annotation, where: str):
    """Coerce / check a YAML value against a dataclass field annotation (basic types only)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        errors = []
        for a in others:
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    return value


def from_dict(cls, data, where: str):
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError naming ``where``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def load_suite(path: str | Path, known_types: set[str] | None = None, data_root: str | Path | None = None) -> Suite:
    """Read and check a suite YAML (see the module docstring); ``data_root`` overrides the suite's.

    Raises:
        ConfigError: unreadable YAML, unknown keys, missing files, unknown task types (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(raw) - _SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(_SUITE_KEYS)}")
    for key in ("proteins", "tasks"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    if data_root is not None:
        root = Path(data_root).expanduser()
    else:
        root = Path(str(raw.get("data_root", "."))).expanduser()
        root = root if root.is_absolute() else (path.parent / root)
    if not root.is_dir():
        raise ConfigError(f"{path}: data_root {root} is not a directory")
    suite = Suite(
        name=str(raw.get("name", path.stem)),
        path=path,
        data_root=root,
        proteins=Path(),
        text_column=_check_type(raw.get("text_column"), str | None, f"{path}: text_column"),
        bootstrap=from_dict(BootstrapConfig, raw.get("bootstrap"), f"{path}: bootstrap"),
        base=_check_type(raw.get("base", False), bool, f"{path}: base"),
        batch_size=_check_type(raw.get("batch_size", 16), int, f"{path}: batch_size"),
    )
    suite.proteins = suite.resolve(_check_type(raw["proteins"], str, f"{path}: proteins"))
    if not suite.proteins.is_file():
        raise ConfigError(f"{path}: proteins file {suite.proteins} not found")
    tasks = raw["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{path}: tasks must be a non-empty list")
    names = set()
    for i, t in enumerate(tasks):
        where = f"{path}: tasks[{i}]"
        if not isinstance(t, dict) or "type" not in t or "name" not in t:
            raise ConfigError(f"{where}: each task needs 'name' and 'type'")
        name, kind = str(t["name"]), str(t["type"])
        if name in names:
            raise ConfigError(f"{where}: task name {name!r} is used twice")
        names.add(name)
        if known_types is not None and kind not in known_types:
            raise ConfigError(f"{where}: unknown task type {kind!r}; known: {sorted(known_types)}")
        options = {k: v for k, v in t.items() if k not in ("name", "type")}
        suite.tasks.append(TaskSpec(name, kind, options))
    return suite


def check_file(suite: Suite, value: str, where: str) -> Path:
    """Resolve a task's data file; a missing one is a ConfigError naming the suite and key."""
    p = suite.resolve(value)
    if not p.is_file():
        raise ConfigError(f"{suite.path}: {where}: file {p} not found")
    return p
