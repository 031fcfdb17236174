"""The xdist work units of tests/conftest.py stay complete: Ray starters serial, reference-run users together."""

from __future__ import annotations

import ast
import re

from tests.conftest import RAY_FREE_TESTS, RAY_GROUP_MODULES, REFERENCE_GROUP_MODULES, REPO, work_unit

# A module that does any of these starts Ray directly, through launch/ray_job.py, a `ray start`
# cluster or the launcher's Ray readers (``data.loader=ray``).
STARTS_RAY = re.compile(r"ray\.init|connect_ray|ray_job\.py|RayBatchSource|\"ray\", \"start\"|data\.loader=ray")
# A module that does any of these runs the real launcher, whose default loader starts Ray readers.
LAUNCHES = re.compile(r"run_launcher\(|launcher_cmd\(|reference_run\(")
MENTIONS_RAY = re.compile(r"\bray\b", re.IGNORECASE)


def _test_modules() -> dict[str, str]:
    modules = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel != "tests/test_xdist_groups.py":
            modules[rel] = path.read_text()
    return modules


def test_every_ray_module_is_in_the_serial_ray_group():
    starts = {m for m, text in _test_modules().items() if STARTS_RAY.search(text)}
    assert starts, "the pattern no longer finds the Ray tests"
    assert starts <= RAY_GROUP_MODULES, sorted(starts - RAY_GROUP_MODULES)


def test_launcher_modules_outside_the_ray_group_keep_ray_off():
    """Outside the Ray unit a launcher module must pass data.loader=local and not touch Ray at all,
    and one that uses the per-worker reference-run cache must be in the reference unit."""
    outside = {m: t for m, t in _test_modules().items() if LAUNCHES.search(t) and m not in RAY_GROUP_MODULES}
    assert REFERENCE_GROUP_MODULES <= set(outside), sorted(REFERENCE_GROUP_MODULES - set(outside))
    for module, text in outside.items():
        assert "data.loader=local" in text and not MENTIONS_RAY.search(text), module
        if "reference_run(" in text:
            assert module in REFERENCE_GROUP_MODULES, module


def test_groups_are_listed_files_and_disjoint():
    modules = _test_modules()
    missing = [m for m in RAY_GROUP_MODULES | REFERENCE_GROUP_MODULES if m not in modules]
    assert not missing, f"listed but gone: {missing}"
    assert not RAY_GROUP_MODULES & REFERENCE_GROUP_MODULES
    assert work_unit("tests/launch/test_ray_job.py::test_x") == "ray"
    assert work_unit("tests/launch/test_multinode.py::test_x") == "reference"
    assert work_unit("tests/kernels/test_ring.py::test_x[a]") == "tests/kernels/test_ring.py::test_x[a]"


def test_tests_let_out_of_the_ray_unit_start_no_ray():
    """Every RAY_FREE_TESTS entry exists, is in a Ray-group module, and its own source neither starts Ray
    nor launches without ``data.loader=local`` (the module's helpers are checked by the module test above
    only for modules outside the Ray group, so the test body is checked here)."""
    modules = _test_modules()
    for entry in sorted(RAY_FREE_TESTS):
        module, name = entry.split("::", 1)
        assert module in RAY_GROUP_MODULES, entry
        tree = ast.parse(modules[module])
        found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
        assert found, f"{entry}: no such test"
        source = ast.get_source_segment(modules[module], found[0])
        assert not STARTS_RAY.search(source.replace("data.loader=local", "")), entry
        if LAUNCHES.search(source):
            assert "data.loader=local" in source or "data.loader=local" in modules[module], entry
    assert work_unit(f"{sorted(RAY_FREE_TESTS)[0]}[p]") == f"{sorted(RAY_FREE_TESTS)[0]}[p]"
