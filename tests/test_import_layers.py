"""Every import points down one stack, and no two modules import each other (README "What is inside").

The import graph is read from the source with ``ast`` (nothing is imported or executed), counting
every ``import`` statement of a module, those inside functions and ``if TYPE_CHECKING:`` blocks too:
a lazy import is still a dependency. A failure names the file, the line and the rule it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("kernels", "data_shards", "pretrain", "launch")

# The stack, bottom first. A module belongs to the layer of the longest prefix that names it and
# may import modules of its own layer or of layers below. ``<component>/config.py`` files are the
# recipe sections of components above the config layer: they sit in it, so pretrain/config.py can
# compose them while the component's code imports the composed config.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernels", ("kernels",)),
    ("data_shards", ("data_shards",)),
    ("errors", ("pretrain.errors",)),
    ("models", ("pretrain.models",)),
    ("losses", ("pretrain.losses",)),
    ("config", ("pretrain.config", "pretrain.data.config", "pretrain.engine.config", "pretrain.eval.config")),
    ("data", ("pretrain.data",)),
    ("engine", ("pretrain.engine",)),
    (
        "eval and tools",
        (
            "pretrain.eval",
            "pretrain.search",
            "pretrain.report",
            "pretrain.summary",
            "pretrain.ablate",
            "pretrain.readme_section",
            "pretrain.export",
            "pretrain.convert_checkpoint",
            "pretrain.hf_export",
            "pretrain.model_card",
            "pretrain.api",
            "pretrain.cli_types",
            "pretrain.benchmark",
        ),
    ),
    ("run", ("pretrain.run", "launch")),
)
# Package ``__init__`` files that name no layer by prefix (they hold no code): the lowest of theirs.
PACKAGES = {"pretrain": "errors"}
# The two bottom packages are independent of each other: the kernels know no shard format and
# the shard tools no training code.
INDEPENDENT = (("kernels", "data_shards"), ("data_shards", "kernels"))


def module_files(repo: Path, roots=ROOTS) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``roots`` (a package is its ``__init__``)."""
    out = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            parts = path.relative_to(repo).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported project module) for every import statement of ``path``, once per pair."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a name inside a module
                target = target.rpartition(".")[0]
            if target:
                found[(node.lineno, target)] = None
    return sorted(found)


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the longest prefix naming ``module``."""
    if module in PACKAGES:
        return [name for name, _ in LAYERS].index(PACKAGES[module])
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer of LAYERS; add it")
    return best


def layer_violations(repo: Path, roots=ROOTS) -> list[str]:
    """Every import that points up the stack or between the independent bottom packages."""
    modules = module_files(repo, roots)
    problems = []
    for name, path in modules.items():
        here = layer_of(name)
        for line, target in imports_of(name, path, modules):
            there = layer_of(target)
            where = f"{path.relative_to(repo)}:{line}"
            if there > here:
                problems.append(
                    f"{where}: {name} (layer {LAYERS[here][0]}) imports {target} (layer {LAYERS[there][0]}), "
                    "which is above it"
                )
            elif (LAYERS[here][0], LAYERS[there][0]) in INDEPENDENT:
                problems.append(f"{where}: {name} imports {target}; {LAYERS[here][0]} must not depend on it")
    return problems


def import_cycles(repo: Path, roots=ROOTS) -> list[str]:
    """One description per import cycle among the modules (strongly connected components > 1 module)."""
    modules = module_files(repo, roots)
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        for line, target in imports_of(name, path, modules):
            if target != name:
                edges.setdefault(name, {}).setdefault(target, line)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                members = set(component)
                links = [
                    f"{modules[a].relative_to(repo)}:{line} imports {b}"
                    for a in sorted(members)
                    for b, line in sorted(edges.get(a, {}).items())
                    if b in members
                ]
                cycles.append("import cycle: " + "; ".join(links))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return cycles


def test_every_import_points_down_the_stack():
    problems = layer_violations(REPO)
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(REPO)
    assert not cycles, "\n".join(cycles)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The checker itself: a model that imports the trainer, and two kernels that import each other."""
    files = {
        "kernels/__init__.py": "",
        "kernels/a.py": "from kernels import b\n",
        "kernels/b.py": "def f():\n    import kernels.a\n",
        "data_shards/__init__.py": "",
        "pretrain/__init__.py": "",
        "pretrain/models/__init__.py": "",
        "pretrain/models/net.py": "import torch\n\nfrom pretrain.engine.trainer import Trainer\n",
        "pretrain/engine/__init__.py": "",
        "pretrain/engine/trainer.py": "from pretrain.models.net import x\nfrom ..models import net\n",
        "launch/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = layer_violations(tmp_path)
    assert problems == [
        "pretrain/models/net.py:3: pretrain.models.net (layer models) imports pretrain.engine.trainer "
        "(layer engine), which is above it"
    ]
    cycles = import_cycles(tmp_path)
    assert len(cycles) == 2
    assert "import cycle: kernels/a.py:1 imports kernels.b; kernels/b.py:2 imports kernels.a" in cycles
    assert any("pretrain/engine/trainer.py:1 imports pretrain.models.net" in c for c in cycles)
