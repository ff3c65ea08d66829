"""cluster.yaml and deploy/: valid for Ray's own validator, and naming only what the project has.

Offline: Ray's config validation (the JSON schema and checks that `ray up` runs before it talks
to a cloud), the manifests parsed, and every command, flag, resource and metric they name checked
against the code: the RayJob's entrypoint is parsed by learner.run's own CLI and its driver is run
up to actor creation with a recording stand-in for Ray, to see which resources each actor asks for.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import textwrap
from pathlib import Path
from types import SimpleNamespace

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


# ----- image, monitoring -----
def test_dockerfile_builds_on_rays_gpu_image_and_copies_what_exists():
    import ray

    text = (DEPLOY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert "pip install --no-cache-dir --no-deps ." in text
    for module in re.findall(r'python -c "import ([^";]+)"', text)[-1].split(", "):
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
        evaluation = {
            "reward_mean": 1.0,
            "rewards": [1.0, 2.0],
            "kl_base": 0.0,
            "heldout": {"reward_mean": 1.0, "rewards": [1.0, 2.0]},
            "guard": {"reward": "aesthetic", "rewards": [5.0, 6.0]},
        }
        exporter.evaluation(evaluation, evaluation)
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
    # Labels in selectors and `by (...)` exist on the metrics they are used with, or are the
    # ones Prometheus adds (deploy/prometheus.yml, deploy/kuberay/podmonitor.yaml).
    labels = set().union(*driver.values(), *actors.values()) | SCRAPE_LABELS
    for expr in exprs:
        named = re.findall(r"(\w+)\s*!?=~?\s*\"", expr) + [
            label.strip()
            for group in re.findall(r"by \(([^)]*)\)", expr)
            for label in group.split(",")
        ]
        assert set(named) <= labels, f"{expr}: unknown labels {set(named) - labels}"


# ----- issue 13, findings 8-11: drivers, volumes, image layers, monitoring -----
CUDA_MIN_DRIVER = {"11.2": 460, "12.0": 525, "12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}
"""NVIDIA's minimum Linux driver (major) for each CUDA toolkit (CUDA release notes, table 3)."""
TORCH_CUDA = re.compile(r"download\.pytorch\.org/whl/cu(\d+)(\d)$")  # cu128 -> 12.8
RAY_GID = 100  # Ray's images run as `ray`, uid 1000, in group `users`, gid 100


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", dockerfile(), re.M)
    return value


def rays_ami_defaults() -> SimpleNamespace:
    """Ray's `_check_ami` (what `ray up` does to a node type without an ImageId) with its
    DEFAULT_AMI and DEFAULT_AMI_NAME, taken from Ray's source: the module imports boto3, which
    the tests do without."""
    import importlib.util

    path = importlib.util.find_spec("ray.autoscaler._private.aws.config").origin
    namespace = {"_set_config_info": lambda **info: None, "cli_logger": None}
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, ast.Assign) and node.targets[0].id in (
            "DEFAULT_AMI",
            "DEFAULT_AMI_NAME",
        ):
            namespace[node.targets[0].id] = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef) and node.name == "_check_ami":
            exec(compile(ast.Module([node], []), path, "exec"), namespace)
    return SimpleNamespace(**namespace)


def test_gpu_nodes_have_a_driver_for_the_cuda_of_torch(cluster_yaml):
    """Finding 8: `torch>=2.4` resolved to PyPI's CUDA 13 build (driver >= 580), and cluster.yaml
    set no ImageId, so Ray booted its default AMI, the Ubuntu 18.04 DLAMI V71 with CUDA 11.2's
    driver. Now torch is the CUDA 12.8 build and every node boots an image whose driver runs it."""
    aws = rays_ami_defaults()
    # The mistake, replayed with Ray's own code: no ImageId -> the CUDA 11.2 DLAMI.
    without = copy.deepcopy(cluster_yaml)
    for node_type in without["available_node_types"].values():
        node_type["node_config"].pop("ImageId", None)
    aws._check_ami(without)
    region = without["provider"]["region"]
    for node_type in without["available_node_types"].values():
        assert node_type["node_config"]["ImageId"] == aws.DEFAULT_AMI[region]
    assert "18.04" in aws.DEFAULT_AMI_NAME and CUDA_MIN_DRIVER["11.2"] < CUDA_MIN_DRIVER["12.8"]

    # The fix: the image's torch is a CUDA 12 build, the same in cluster.yaml's setup.
    cuda = ".".join(TORCH_CUDA.search(dockerfile_arg("TORCH_INDEX")).groups())
    assert cuda.startswith("12."), f"torch for CUDA {cuda}: PyPI's default is CUDA 13"
    setup = " ".join(cluster_yaml["setup_commands"])
    torch_pin = (
        f"torch=={dockerfile_arg('TORCH_VERSION')} --index-url {dockerfile_arg('TORCH_INDEX')}"
    )
    assert torch_pin in setup
    assert setup.index(torch_pin) < setup.index("-e ~/ddpo-ray"), "torch first, then the project"
    # ... and every node type names an image with an NVIDIA driver new enough for it.
    checked = copy.deepcopy(cluster_yaml)
    aws._check_ami(checked)
    for name, node_type in checked["available_node_types"].items():
        ami = node_type["node_config"]["ImageId"]
        assert ami not in aws.DEFAULT_AMI.values(), name
        assert ami.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia")
    gcp = gcp_variant((ROOT / "cluster.yaml").read_text())["available_node_types"]
    for name, node_type in gcp.items():
        for disk in node_type["node_config"].get("disks", []):
            image = disk["initializeParams"]["sourceImage"]
            driver = int(re.search(r"nvidia-(\d+)$", image)[1])
            assert driver >= CUDA_MIN_DRIVER[cuda], f"{name}: {image} for CUDA {cuda}"
    readme = (DEPLOY / "README.md").read_text()
    assert "## GPU drivers" in readme and f"{CUDA_MIN_DRIVER[cuda]} or newer" in readme


def pod_specs(spec: dict) -> dict[str, dict]:
    """{group name: pod spec} of a RayCluster spec, the head as `head`."""
    groups = {"head": spec["headGroupSpec"]}
    groups |= {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {name: g["template"]["spec"] for name, g in groups.items()}


def writable_by_ray(pod: dict) -> bool:
    """Whether a volume Kubernetes mounts into `pod` (owned by root) is writable by Ray's user:
    only when the pod runs as root, or hands volumes to Ray's group with fsGroup."""
    context = pod.get("securityContext", {})
    return context.get("runAsUser") == 0 or context.get("fsGroup") == RAY_GID


def gibibytes(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_pods_can_write_the_run_volume_and_have_disk_for_their_models(raycluster):
    """Finding 9: the pods run as uid 1000 and set no fsGroup, so the run volume (root's) was
    not writable; nothing asked for disk for the model cache. Now fsGroup hands volumes to Ray's
    group, and each model cache has a size limit that the pod's ephemeral-storage request covers."""
    assert "--chown=ray:users" in dockerfile()  # the image's files: Ray's user and group
    pods = pod_specs(raycluster["spec"])
    head = pods["head"]
    claims = [v for v in head["volumes"] if "persistentVolumeClaim" in v]
    assert claims, "the head mounts the run volume"
    assert not writable_by_ray({k: v for k, v in head.items() if k != "securityContext"})
    model_gib = {"learner-gpu": 5, "sampler-gpu": 5, "reward-gpu": 14 + 3 + 2}  # SD; LLaVA...
    for name, pod in pods.items():
        assert writable_by_ray(pod), f"{name}: volumes are root's, the pod runs as uid 1000"
        assert pod["securityContext"]["runAsUser"] == 1000
        (container,) = pod["containers"]
        request = container["resources"]["requests"].get("ephemeral-storage")
        assert request, f"{name} asks for no ephemeral storage"
        for volume in pod.get("volumes", []):
            if volume["name"] == "hf-cache":
                limit = gibibytes(volume["emptyDir"]["sizeLimit"])
                assert gibibytes(request) >= limit, name
                assert limit >= model_gib.get(name, 0) * 1.2, f"{name}: the models do not fit"


def rebuilt_by(text: str, changed: str) -> list[str]:
    """The RUN lines Docker's cache rebuilds when file `changed` changes: every RUN after the
    first COPY whose sources hold it (COPY's cache key is the content it copies)."""
    lines = re.findall(r"^(COPY|RUN) (.+?)(?<!\\)$", text.replace("\\\n", " "), re.M)
    for i, (op, args) in enumerate(lines):
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        if op == "COPY" and any(
            changed == s or changed.startswith(s.rstrip("/") + "/") for s in sources
        ):
            return [a for o, a in lines[i:] if o == "RUN"]
    return []


def test_a_code_change_rebuilds_only_the_project_layer():
    """Finding 10: the source was copied before `pip install .`, so every code change rebuilt
    the 4 GB torch layer; nothing pinned the dependencies. Now torch, then the dependencies
    (pinned by deploy/constraints.txt), then the source, installed without dependencies."""
    before = (
        "FROM rayproject/ray:2.60.0-py311-gpu\n"
        "COPY --chown=ray:users pyproject.toml README.md ./\n"
        "COPY --chown=ray:users learner ./learner\n"
        "RUN pip install --no-cache-dir .\n"
    )
    assert rebuilt_by(before, "learner/driver.py") == ["pip install --no-cache-dir ."]
    text = dockerfile()
    (last,) = rebuilt_by(text, "learner/driver.py")
    assert last.startswith("pip install --no-cache-dir --no-deps .")
    assert rebuilt_by(text, "ddpo/policy.py") == [last]
    assert rebuilt_by(text, "deploy/constraints.txt")[-1] == last
    assert not any("torch" in run for run in rebuilt_by(text, "deploy/constraints.txt"))
    assert "-c deploy/constraints.txt" in rebuilt_by(text, "pyproject.toml")[0]


def test_constraints_pin_every_dependency_at_a_version_pyproject_allows():
    import tomllib

    import ray
    import torch
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (DEPLOY / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    pins = {canonicalize_name(k): v for k, v in pins.items()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"deploy/constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {spec}"
    # torch and Ray: the versions the tests run, the image's and the cluster's.
    assert pins["torch"] == torch.__version__.split("+")[0] == dockerfile_arg("TORCH_VERSION")
    assert pins["ray"] == ray.__version__
    ray_spec = next(Requirement(s) for s in project["dependencies"] if s.startswith("ray"))
    assert not ray_spec.specifier.contains("2.61.0"), "the driver's Ray must be the cluster's"


SCRAPE_LABELS = {"ray_io_cluster", "instance", "job"}
"""Labels Prometheus adds to every series (the scrape configs and PodMonitors here)."""


def test_podmonitors_label_the_cluster_and_scrape_the_heads_autoscaler_and_dashboard(raycluster):
    """Finding 11: the PodMonitor lacked KubeRay's `ray_io_cluster` relabelling and the head's
    autoscaler and dashboard metrics ports. `ray up`'s Prometheus labels the cluster alike."""
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    head = pod_specs(raycluster["spec"])["head"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["as-metrics"] == AUTOSCALER_METRIC_PORT
    assert ports["dash-metrics"] == DASHBOARD_METRIC_PORT
    monitors = {
        m["metadata"]["name"]: m for m in load_yaml_docs(DEPLOY / "kuberay" / "podmonitor.yaml")
    }
    scraped = {}
    for monitor in monitors.values():
        node_type = monitor["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            scraped.setdefault(node_type, set()).add(endpoint["port"])
            assert {
                "action": "replace",
                "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                "targetLabel": "ray_io_cluster",
            } in endpoint["relabelings"], endpoint["port"]
    assert scraped == {
        "head": {"metrics", "as-metrics", "dash-metrics", "driver-metrics"},
        "worker": {"metrics"},
    }
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())["cluster_name"]
    assert {"target_label": "ray_io_cluster", "replacement": cluster} in jobs["ray"][
        "relabel_configs"
    ]
    assert jobs["ddpo-driver"]["static_configs"][0]["labels"] == {"ray_io_cluster": cluster}


def test_grafana_board_selects_cluster_run_and_node():
    """Finding 11: with no variables, the board drew every cluster's and every run's series on
    top of each other. Every query now selects the chosen clusters and runs (the actors' also
    the nodes) and keeps runs apart in its sums."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name, label in (("cluster", "ray_io_cluster"), ("run", "run"), ("instance", "instance")):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"]
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["definition"].endswith(f"{label})") or name == "cluster"
    assert variables["cluster"]["definition"] == "label_values(ray_io_cluster)"
    for expr in dashboard_exprs():
        for metric, selector in re.findall(r"\b((?:ray_)?ddpo_\w+)\{([^}]*)\}", expr):
            assert 'ray_io_cluster=~"$cluster"' in selector and 'run=~"$run"' in selector, expr
            assert ('instance=~"$instance"' in selector) == metric.startswith("ray_"), expr
        assert not re.search(r"\b(?:ray_)?ddpo_\w+(?![\w{])", expr), f"a bare metric: {expr}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            assert "run" in [g.strip() for g in group.split(",")], expr
