"""kernels/ depends on torch, Triton and the standard library only (DESIGN.md, layer 1): no pretrain, no
data_shards, no other third-party package. Import cycles and layering: tests/test_import_layers.py."""

from __future__ import annotations

import ast
import sys

from tests.conftest import REPO


def _top_level_imports(path) -> set[str]:
    """Top-level package of every ``import`` / ``from`` statement anywhere in ``path`` (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module.split(".")[0])
    return names


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = {"torch", "triton", "kernels", *sys.stdlib_module_names}
    files = sorted((REPO / "kernels").glob("*.py"))
    assert len(files) > 5
    outside = {path.name: _top_level_imports(path) - allowed for path in files}
    assert not {name: pkgs for name, pkgs in outside.items() if pkgs}
