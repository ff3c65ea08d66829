"""The deploy files the deploy tests read (cluster.yaml, deploy/, deploy/kuberay/), parsed."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def read_cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def read_kuberay(name: str) -> dict:
    """The one document of deploy/kuberay/NAME.yaml (raycluster, rayjob)."""
    (doc,) = load_yaml_docs(DEPLOY / "kuberay" / f"{name}.yaml")
    return doc


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


def pod_specs(spec: dict) -> dict[str, dict]:
    """{group name: pod spec} of a RayCluster spec, the head as `head`."""
    groups = {"head": spec["headGroupSpec"]}
    groups |= {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {name: g["template"]["spec"] for name, g in groups.items()}
