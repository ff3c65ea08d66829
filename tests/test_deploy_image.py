"""The image and the pods: the Dockerfile, the GPU driver each node boots for the CUDA of
torch, the run volume and disk of the pods, the image's layers and the pinned dependencies."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path
from types import SimpleNamespace

from deploy_files import (
    DEPLOY,
    ROOT,
    gcp_variant,
    pod_specs,
)

CUDA_MIN_DRIVER = {"11.2": 460, "12.0": 525, "12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}
"""NVIDIA's minimum Linux driver (major) for each CUDA toolkit (CUDA release notes, table 3)."""
TORCH_CUDA = re.compile(r"download\.pytorch\.org/whl/cu(\d+)(\d)$")  # cu128 -> 12.8
RAY_GID = 100  # Ray's images run as `ray`, uid 1000, in group `users`, gid 100


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
