"""cluster.yaml against the schema Ray ships: `ray up` has no dry run, so this is its check."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture()
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_rays_schema(cluster):
    jsonschema.validate(cluster, SCHEMA)
    # What `ray up` does before it calls the cloud: merge the provider defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(cluster)))


@pytest.mark.parametrize("plant", [
    lambda c: c.update(setup_comands=c.pop("setup_commands")),
    lambda c: c["available_node_types"]["gpu_worker"].update(max_worker=2),
    lambda c: c["auth"].update(ssh_usr="ubuntu"),
    lambda c: c.update(max_workers="four"),
    lambda c: c["available_node_types"]["head"].update(resources={"CPU": 0.5}),
], ids=["misspelt-top-level", "misspelt-node-type-key", "misspelt-auth-key", "wrong-type", "fractional-resource"])
def test_planted_mistakes_fail_validation(cluster, plant):
    plant(cluster)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, SCHEMA)


def test_head_and_autoscaling_gpu_workers(cluster):
    nodes = cluster["available_node_types"]
    workers = {name: node for name, node in nodes.items() if name != cluster["head_node_type"]}
    assert len(workers) == 1
    worker = next(iter(workers.values()))
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 2
    assert worker["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
    assert cluster["provider"]["type"] == "aws"
    assert any("pip install" in cmd and "~/raysegm" in cmd for cmd in cluster["setup_commands"])
    assert cluster["file_mounts"]["~/raysegm"] == "."


def test_token_auth_on_everywhere_and_dashboard_on_loopback(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    for command in (head_start, worker_start):
        assert re.search(r"RAY_AUTH_MODE=token ray start", command)
    assert "--dashboard-host=127.0.0.1" in head_start
    # The token travels from the user's own file, never from this repository.
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in CLUSTER_YAML.read_text()
