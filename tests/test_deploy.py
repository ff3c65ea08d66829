"""cluster.yaml and deploy/: valid for Ray's own validator, and naming only what the project has.

Offline: Ray's config validation (the JSON schema and checks that `ray up` runs before it talks
to a cloud), the manifests parsed, and every command, flag, resource and metric they name checked
against the code: the RayJob's entrypoint is parsed by learner.run's own CLI and its driver is run
up to actor creation with a recording stand-in for Ray, to see which resources each actor asks for.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ROLES = {"learner", "sampler"}  # plus reward_<name> for every reward of rewards.REWARDS
STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (doc,) = load_yaml_docs(DEPLOY / "kuberay" / "raycluster.yaml")
    return doc


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (doc,) = load_yaml_docs(DEPLOY / "kuberay" / "rayjob.yaml")
    return doc


def ray_validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill in defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def gcp_variant(text: str) -> dict:
    """cluster.yaml with every `# GCP <dotted.path>:` comment block put in place of that path."""
    config = yaml.safe_load(text)
    lines = text.splitlines()
    blocks = 0
    for i, line in enumerate(lines):
        m = re.fullmatch(r"(\s*)# GCP ([\w.]+):\s*", line)
        if not m:
            continue
        indent, path = m.groups()
        body = []
        for nxt in lines[i + 1 :]:
            if not nxt.startswith(f"{indent}#   "):
                break
            body.append(nxt[len(indent) + 1 :])  # drop the '#', keep the relative indentation
        value = yaml.safe_load(textwrap.dedent("\n".join(body)))
        *parents, key = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[key] = value
        blocks += 1
    assert blocks >= 7, (
        f"expected GCP blocks for the provider, 5 node types and setup, got {blocks}"
    )
    return config


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
    from learner.driver import train

    changes = {"run_dir": tmp_path}
    if hasattr(config, "metrics_port"):  # never bind a port here
        changes["metrics_port"] = None
    wiring = RecordingWiring()
    with pytest.raises(_Stop):
        train(dataclasses.replace(config, **changes), wiring)
    assert wiring.actors, "the driver created no actors"
    return wiring.actors


def all_task_actors(tmp_path) -> list[tuple[str, dict]]:
    from ddpo.config import TASKS, task_config

    actors = []
    for task in TASKS:
        config = task_config(task, "CompVis/stable-diffusion-v1-4")
        actors += actors_of(dataclasses.replace(config, device="cuda"), tmp_path / task)
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
    import tyro

    from learner.run import Args, build_config

    spec = rayjob["spec"]
    assert rayjob["kind"] == "RayJob"
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1
    assert spec["rayClusterSpec"] == raycluster["spec"], "rayjob.yaml's cluster != raycluster.yaml"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "learner.run"]
    args = tyro.cli(Args, args=argv[3:])  # every flag must exist in learner.run.Args
    assert args.task == "alignment" and args.address == "auto" and args.device == "cuda"
    assert str(args.run_dir).startswith("/mnt/runs/")
    assert args.resume_or_start, "a retry must continue the run, not start it over"
    mounts = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "/mnt/runs" in [m["mountPath"] for m in mounts["volumeMounts"]]
    config = build_config(args)  # the flags make a valid config (e.g. samplers divide batches)

    # The driver's port is the one the head pod exposes and Prometheus scrapes.
    ports = {p["name"]: p["containerPort"] for p in mounts["ports"]}
    assert ports["driver-metrics"] == args.metrics_port and args.metrics_host == "0.0.0.0"
    assert ports["metrics"] == 8080

    groups = kuberay_groups(raycluster["spec"])
    for cls, options in actors_of(config, tmp_path):
        assert any(fits(options, offer) for offer in groups.values()), (
            f"{cls} asks for {options}: no worker group of raycluster.yaml can host it"
        )


# ----- image, monitoring -----
def test_dockerfile_builds_on_rays_gpu_image_and_copies_what_exists():
    import ray

    text = (DEPLOY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert "pip install --no-cache-dir ." in text
    for module in re.search(r'python -c "import ([^"]+)"', text)[1].split(", "):
        __import__(module)


def test_prometheus_configs_point_at_ray_and_the_driver(rayjob):
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    (path,) = jobs["ray"]["file_sd_configs"][0]["files"]
    assert path == f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"
    port = shlex.split(rayjob["spec"]["entrypoint"])
    port = port[port.index("--metrics-port") + 1]
    assert jobs["ddpo-driver"]["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]

    monitors = load_yaml_docs(DEPLOY / "kuberay" / "podmonitor.yaml")
    assert {m["kind"] for m in monitors} == {"PodMonitor"}
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    port_names = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    for monitor in monitors:
        labels = monitor["spec"]["selector"]["matchLabels"]
        assert (
            labels["app.kubernetes.io/part-of"]
            == head["metadata"]["labels"]["app.kubernetes.io/part-of"]
        )
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in port_names


FULL_RECORD = {
    "epoch": 1, "policy_version": 1, "reward_mean": 1.0, "reward_std": 0.1, "loss": 0.1,
    "approx_kl": 0.1, "clipfrac": 0.1, "grad_norm": 1.0, "samples": 8, "seconds": 1.0,
    "batches_dropped": 1, "batches_dropped_stale": 1, "staleness": 1.0, "staleness_max": 2,
    "staleness/1/clipfrac": 0.1, "staleness/1/approx_kl": 0.1, "queue_depth": 2,
    "reward/aesthetic/mean": 1.0, "reward/aesthetic/std": 0.1,
    "reward/aesthetic/busy_fraction": 0.5, "busy/sampler": 0.5,
}  # fmt: skip
ACTOR_METRICS = {  # ray.util.metrics name -> what Prometheus sees through Ray (checked live in
    # tests/test_job_submission.py)
    "Counter": ["_total"],
    "Histogram": ["_bucket", "_sum", "_count"],
    "Gauge": [""],
}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    return [t["expr"] for p in panels for t in p["targets"]]


def test_grafana_dashboard_queries_metrics_the_code_exports():
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from learner.metrics import MetricsExporter, actor_metrics

    with MetricsExporter(port=0) as exporter:
        exporter.update(FULL_RECORD)
        text = urllib.request.urlopen(exporter.url, timeout=10).read().decode()
    driver = {
        s.name: set(s.labels) for f in text_string_to_metric_families(text) for s in f.samples
    }
    actors = {}
    for metric in vars(actor_metrics()).values():
        for suffix in ACTOR_METRICS[type(metric).__name__]:
            actors[f"ray_{metric._name}{suffix}"] = set(metric._tag_keys) | {"le"}

    exprs = dashboard_exprs()
    used = {n for e in exprs for n in re.findall(r"\b(?:ray_)?ddpo_\w+", e)}
    assert used, "the dashboard queries no ddpo metric"
    unknown = used - set(driver) - set(actors)
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
    # Every family the code exports is on the board (reward curves, throughput, staleness, busy
    # fractions, queue depth, reward latency).
    families = {
        re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in set(driver) | set(actors)
    }
    shown = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in used}
    assert families - shown <= {"ddpo_epochs", "ddpo_metric"}, sorted(families - shown)
    # Labels in selectors and `by (...)` exist on the metrics they are used with.
    labels = set().union(*driver.values(), *actors.values())
    for expr in exprs:
        named = re.findall(r"(\w+)\s*!?=~?\s*\"", expr) + [
            label.strip()
            for group in re.findall(r"by \(([^)]*)\)", expr)
            for label in group.split(",")
        ]
        assert set(named) <= labels, f"{expr}: unknown labels {set(named) - labels}"
