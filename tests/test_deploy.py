"""cluster.yaml and the KubeRay manifests: valid for Ray's own validator, and naming only what the
project has (the image and pods: test_deploy_image.py; monitoring: test_deploy_monitoring.py).

Offline: Ray's config validation (the JSON schema and checks that `ray up` runs before it talks
to a cloud), the manifests parsed, and every command, flag, resource and metric they name checked
against the code: the RayJob's entrypoint is parsed by learner.run's own CLI and its driver is run
up to actor creation with a recording stand-in for Ray, to see which resources each actor asks for.
"""

from __future__ import annotations

import copy
import json
import shlex

import pytest
from deploy_files import (
    ROOT,
    gcp_variant,
)

ROLES = {"learner", "sampler"}  # plus reward_<name> for every reward of rewards.REWARDS
STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}


def ray_validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill in defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ----- cluster.yaml -----
def test_cluster_yaml_passes_rays_validation(cluster_yaml):
    prepared = ray_validate(cluster_yaml)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    # The validator is not a no-op: an unknown field and a fractional resource are rejected.
    with pytest.raises(Exception, match="bogus"):
        ray_validate({**cluster_yaml, "bogus": 1})
    broken = copy.deepcopy(cluster_yaml)
    broken["available_node_types"]["sampler_gpu"]["resources"]["sampler"] = 0.5
    with pytest.raises(Exception, match="0.5"):
        ray_validate(broken)


def test_cluster_yaml_gcp_variant_passes_rays_validation():
    config = gcp_variant((ROOT / "cluster.yaml").read_text())
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == "gcp"
    types = prepared["available_node_types"]
    assert "machineType" in types["sampler_gpu"]["node_config"]
    assert {"preemptible": True} in types["sampler_gpu"]["node_config"]["scheduling"]
    assert "google-api-python-client" in " ".join(prepared["head_setup_commands"])


def test_cluster_yaml_roles_head_spot_image_setup_and_metrics(cluster_yaml):
    import ray

    types = cluster_yaml["available_node_types"]
    head = types[cluster_yaml["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must run no actors"
    assert {"learner_gpu", "sampler_gpu", "reward_gpu"} <= set(types)
    assert types["learner_gpu"]["resources"]["learner"] >= 1
    assert types["sampler_gpu"]["resources"]["sampler"] >= 1
    for name in ("sampler_gpu", "reward_gpu", "reward_cpu"):
        assert types[name]["min_workers"] == 0, name
        assert types[name]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
    assert "InstanceMarketOptions" not in types["learner_gpu"]["node_config"]
    for name in ("learner_gpu", "sampler_gpu", "reward_gpu"):
        assert types[name]["resources"]["GPU"] >= 1, name

    # The image is Ray's GPU image of the Ray version the project installs.
    assert cluster_yaml["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any("pip install" in c and "~/ddpo-ray" in c for c in cluster_yaml["setup_commands"])
    assert cluster_yaml["auth"]["ssh_user"] == "ubuntu"  # the Ubuntu AMI's user
    assert cluster_yaml["file_mounts"]["~/ddpo-ray"] == "."
    starts = cluster_yaml["head_start_ray_commands"] + cluster_yaml["worker_start_ray_commands"]
    assert sum("--metrics-export-port=8080" in c for c in starts) == 2
    assert sum("RAY_AUTH_MODE=token" in c for c in starts) == 2


# ----- code -> resources -----
class _Stop(Exception):
    pass


class RecordingWiring:
    """Stands in for learner.wiring.OnRay: records each actor's class and Ray options, then stops
    the driver at its first remote call."""

    def __init__(self):
        self.actors: list[tuple[str, dict]] = []
        self.placement_groups: list[tuple[list[dict], str]] = []  # (bundles, strategy)

    def placement_group(self, bundles, strategy):
        self.placement_groups.append((bundles, strategy))
        return len(self.placement_groups), [{} for _ in bundles]

    def create(self, cls, *args, options=None):
        self.actors.append((cls.__name__, dict(options or {"num_cpus": 1})))  # OnRay's default
        return cls.__name__

    def wait_started(self, actors, report_s, timeout_s):
        pass

    def call(self, *args, **kwargs):
        raise _Stop

    def get(self, refs):
        raise _Stop


def actors_of(config, tmp_path) -> list[tuple[str, dict]]:
    """The actors (class name, Ray options) that learner.run's driver creates for `config`."""
    return recorded(config, tmp_path).actors


def recorded(config, tmp_path) -> RecordingWiring:
    """What learner.run's driver asks of Ray for `config`: its actors and placement groups."""
    from ddpo.config import override
    from learner.driver import train

    wiring = RecordingWiring()
    with pytest.raises(_Stop):  # never bind a port here
        train(override(config, {"run.dir": tmp_path, "run.metrics_port": None}), wiring)
    assert wiring.actors, "the driver created no actors"
    return wiring


def all_task_actors(tmp_path) -> list[tuple[str, dict]]:
    from ddpo.config import override
    from ddpo.presets import TASKS, task_config

    actors = []
    for task in TASKS:
        config = task_config(task, "CompVis/stable-diffusion-v1-4")
        actors += actors_of(override(config, {"system.device": "cuda"}), tmp_path / task)
    return actors


def custom(resources: dict) -> set[str]:
    return {k for k in resources if k not in STANDARD}


def fits(actor: dict, node: dict) -> bool:
    """Whether one actor's request fits on an empty node offering `node` resources."""
    need = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0)}
    need.update(actor.get("resources", {}))
    return all(node.get(k, 0) >= v for k, v in need.items() if v)


def kuberay_groups(spec: dict) -> dict[str, dict]:
    """{groupName: the Ray resources a pod of that group offers} of a RayCluster spec."""
    groups = {}
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        resources = json.loads(params["resources"].strip('"').replace('\\"', '"'))
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        resources["CPU"] = int(limits["cpu"])
        resources["GPU"] = int(limits.get("nvidia.com/gpu", 0))
        groups[group["groupName"]] = resources
    return groups


def test_every_actor_of_every_task_fits_a_cluster_yaml_node_type(cluster_yaml, tmp_path):
    workers = {
        name: t["resources"]
        for name, t in cluster_yaml["available_node_types"].items()
        if name != cluster_yaml["head_node_type"]
    }
    for cls, options in all_task_actors(tmp_path):
        homes = [name for name, offer in workers.items() if fits(options, offer)]
        assert homes, f"{cls} asks for {options}: no node type of cluster.yaml can host it"


def test_actors_ask_for_their_role_resource_and_a_gpu(cluster_yaml, tmp_path):
    """The role resources of cluster.yaml are the ones the actors ask for: `sampler`, `learner`
    and `reward_<name>` for every reward (DESIGN.md, Placement); on cuda, samplers and the
    learner ask for a GPU (else Ray hides every GPU from them)."""
    from rewards import REWARDS

    offered = set().union(
        *(custom(t["resources"]) for t in cluster_yaml["available_node_types"].values())
    )
    assert offered == ROLES | {f"reward_{name}" for name in REWARDS}
    actors = all_task_actors(tmp_path)
    for cls, options in actors:
        role = {"Sampler": "sampler", "Learner": "learner"}.get(cls)
        if role:
            assert role in options.get("resources", {}), f"{cls} asks for no {role!r}: {options}"
            assert options.get("num_gpus", 0) > 0, f"{cls} on cuda asks for no GPU: {options}"
    requested = set().union(*(custom(o.get("resources", {})) for _, o in actors))
    assert requested == offered, (
        f"cluster.yaml offers {sorted(offered - requested)} nobody asks for"
    )


def group_homes(bundles: list[dict], strategy: str, nodes: dict[str, dict]) -> list[str]:
    """The node types (name -> resources, with `max_workers`) that can host a placement group
    of `bundles`: all on one node (PACK, STRICT_PACK) or one a node (SPREAD, STRICT_SPREAD)."""
    homes = []
    for name, node in nodes.items():
        offer, count = node["resources"], node["max_workers"]
        if strategy in ("PACK", "STRICT_PACK"):
            need: dict[str, float] = {}
            for bundle in bundles:
                for k, v in bundle.items():
                    need[k] = need.get(k, 0) + v
            if count >= 1 and all(offer.get(k, 0) >= v for k, v in need.items()):
                homes.append(name)
        elif count >= len(bundles) and all(
            all(offer.get(k, 0) >= v for k, v in b.items()) for b in bundles
        ):
            homes.append(name)
    return homes


@pytest.mark.parametrize(
    "strategy, home", [("STRICT_PACK", "learner_gpu_x4"), ("STRICT_SPREAD", "learner_gpu")]
)
def test_a_learner_group_of_4_fits_a_learner_node_type(
    cluster_yaml, raycluster, tmp_path, strategy, home
):
    """Issue 15: --num-learners 4 reserves 4 bundles of one GPU and the `learner` resource in a
    placement group: one 4-GPU node holds them packed, four 1-GPU nodes spread, in cluster.yaml
    and in the KubeRay worker groups alike."""
    from ddpo.config import override
    from ddpo.presets import task_config

    config = task_config("compressibility", "CompVis/stable-diffusion-v1-4")
    config = override(
        config,
        {"system": {"device": "cuda", "num_learners": 4, "learner_placement": strategy}},
    )
    wiring = recorded(config, tmp_path)
    ((bundles, used),) = wiring.placement_groups
    assert used == strategy and len(bundles) == 4
    assert all(b["GPU"] == 1 and b["learner"] > 0 for b in bundles), bundles
    ranks = [o for cls, o in wiring.actors if cls == "Learner"]
    assert len(ranks) == 4
    for options in ranks:  # each rank asks for exactly its bundle
        asked = {"CPU": options["num_cpus"], "GPU": options["num_gpus"]} | options["resources"]
        assert {k: v for k, v in asked.items() if v} == bundles[0]
    nodes = {
        name: {"resources": t["resources"], "max_workers": t.get("max_workers", 0)}
        for name, t in cluster_yaml["available_node_types"].items()
    }
    assert home in group_homes(bundles, strategy, nodes)
    pods = {
        g["groupName"]: {"resources": kuberay_groups(raycluster["spec"])[g["groupName"]],
                         "max_workers": g["maxReplicas"]}
        for g in raycluster["spec"]["workerGroupSpecs"]
    }  # fmt: skip
    assert home.replace("_", "-") in group_homes(bundles, strategy, pods)


# ----- KubeRay -----
def test_raycluster_matches_cluster_yaml(raycluster, cluster_yaml):
    import ray

    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = kuberay_groups(spec)
    workers = {
        name.replace("_", "-"): t
        for name, t in cluster_yaml["available_node_types"].items()
        if name != cluster_yaml["head_node_type"]
    }
    assert set(groups) == set(workers)
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        yaml_type = workers[name]
        assert custom(groups[name]) == custom(yaml_type["resources"]), name
        assert groups[name]["GPU"] == yaml_type["resources"].get("GPU", 0), name
        assert group["minReplicas"] == yaml_type["min_workers"], name
        assert group["maxReplicas"] == yaml_type["max_workers"], name
        assert group["rayStartParams"]["metrics-export-port"] == "8080", name
    images = {
        c["image"]
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert len(images) == 1, f"one image for every pod, got {images}"


def test_rayjob_runs_the_alignment_task_with_flags_learner_run_has(rayjob, raycluster, tmp_path):
    from learner.run import fresh, parse

    spec = rayjob["spec"]
    assert rayjob["kind"] == "RayJob"
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1
    assert spec["rayClusterSpec"] == raycluster["spec"], "rayjob.yaml's cluster != raycluster.yaml"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "learner.run"]
    command = parse(argv[3:])  # every flag must exist in learner.run's command line
    config = command.config
    assert config.task == "alignment" and config.run.address == "auto"
    assert config.system.device == "cuda"
    assert str(config.run.dir).startswith("/mnt/runs/")
    assert command.resume_or_start, "a retry must continue the run, not start it over"
    mounts = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "/mnt/runs" in [m["mountPath"] for m in mounts["volumeMounts"]]
    fresh(command)  # the flags make a valid config (e.g. samplers divide batches)

    # The driver's port is the one the head pod exposes and Prometheus scrapes.
    ports = {p["name"]: p["containerPort"] for p in mounts["ports"]}
    assert ports["driver-metrics"] == config.run.metrics_port
    assert config.run.metrics_host == "0.0.0.0"
    assert ports["metrics"] == 8080

    groups = kuberay_groups(raycluster["spec"])
    wiring = recorded(config, tmp_path)
    for cls, options in wiring.actors:
        assert any(fits(options, offer) for offer in groups.values()), (
            f"{cls} asks for {options}: no worker group of raycluster.yaml can host it"
        )
    # Its learner group: one placement group of one GPU a rank, which the learner groups hold.
    assert config.system.num_learners > 1
    ((bundles, strategy),) = wiring.placement_groups
    pods = {
        g["groupName"]: {"resources": groups[g["groupName"]], "max_workers": g["maxReplicas"]}
        for g in raycluster["spec"]["workerGroupSpecs"]
    }
    assert group_homes(bundles, strategy, pods), f"no worker group holds the learners {bundles}"
