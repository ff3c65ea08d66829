"""Monitoring: the Prometheus scrape configs and PodMonitors, and the Grafana dashboard's queries
against the metrics the code exports."""

from __future__ import annotations

import json
import re
import shlex

import yaml
from deploy_files import (
    DEPLOY,
    ROOT,
    load_yaml_docs,
    pod_specs,
)

SCRAPE_LABELS = {"ray_io_cluster", "instance", "job"}
"""Labels Prometheus adds to every series (the scrape configs and PodMonitors here)."""


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
