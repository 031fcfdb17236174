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

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pretrain.config import TypedReader
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


class _SuiteReader(TypedReader):
    """:class:`pretrain.config.TypedReader` with the suite's wording; each object (a task's config, its
    nested sections) runs its own ``validate(where)`` as it is built, and nan / inf pass the type check."""

    finite_floats = False
    true_false = "true or false"

    def unknown_keys(self, where: str, unknown: list[str], known: list[str]) -> str:
        return f"{where}: unknown key(s) {unknown}; known: {known}"

    def make(self, cls: type, kwargs: dict, where: str):
        try:
            obj = cls(**kwargs)
        except TypeError as e:  # a required field missing
            raise ConfigError(f"{where}: {e}") from None
        if hasattr(obj, "validate"):
            obj.validate(where)
        return obj


_READER = _SuiteReader()


def from_dict(cls, data, where: str):
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError naming ``where``."""
    return _READER.build(cls, data, where)


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
        text_column=_READER.check(raw.get("text_column"), str | None, f"{path}: text_column"),
        bootstrap=from_dict(BootstrapConfig, raw.get("bootstrap"), f"{path}: bootstrap"),
        base=_READER.check(raw.get("base", False), bool, f"{path}: base"),
        batch_size=_READER.check(raw.get("batch_size", 16), int, f"{path}: batch_size"),
    )
    suite.proteins = suite.resolve(_READER.check(raw["proteins"], str, f"{path}: proteins"))
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
