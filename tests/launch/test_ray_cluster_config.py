"""launch/ray_cluster_aws.yaml is a valid Ray autoscaler config with the node groups the README promises."""

from __future__ import annotations

import yaml

from tests.conftest import REPO


def test_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "launch" / "ray_cluster_aws.yaml").read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)  # raises on anything the autoscaler would refuse
    types = cfg["available_node_types"]
    gpu, readers = types["gpu_8x"], types["cpu_readers"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]  # autoscaling GPU worker group
    assert readers["min_workers"] == 0 < readers["max_workers"]
    assert readers["node_config"]["InstanceType"].startswith("c")  # CPU-only
    assert readers["resources"].get("reader_slot", 0) > 0 and "reader_slot" not in gpu["resources"]
    assert not types["head"]["resources"]
    assert all(
        "RAY_AUTH_MODE=token" in " ".join(cfg[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands")
    )
    assert "/home/ubuntu/.ray/auth_token" in cfg["file_mounts"]
