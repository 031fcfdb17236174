"""Every test module that starts Ray or the launcher is in the serial xdist group (tests/conftest.py)."""

from __future__ import annotations

import re

from tests.conftest import RAY_GROUP_MODULES, REPO

# A module that does any of these starts Ray (directly, through launch/ray_job.py, or through the
# launcher's Ray readers) or uses the per-worker reference-run cache.
STARTS_RAY = re.compile(
    r"run_launcher\(|reference_run|ray\.init|connect_ray|ray_job\.py|RayBatchSource|\"ray\", \"start\""
)


def test_every_ray_or_launcher_module_is_in_the_serial_group():
    found = set()
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        text = path.read_text()
        if STARTS_RAY.search(text):
            found.add(path.relative_to(REPO).as_posix())
    found.discard("tests/test_xdist_groups.py")
    assert found, "the pattern no longer finds the launcher tests"
    assert found <= RAY_GROUP_MODULES, sorted(found - RAY_GROUP_MODULES)
    missing = [m for m in RAY_GROUP_MODULES if not (REPO / m).is_file()]
    assert not missing, f"listed but gone: {missing}"
