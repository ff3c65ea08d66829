"""Waiting for a run's actors to start, and saying what holds back those that cannot.

Ray keeps an actor that no node has room for pending, silently, for as long as it takes: on a
2-core `ray start --head` a third actor asking for a CPU waits forever, and so does one asking for
a role resource that no node offers (a typo in cluster.yaml). The driver waits here instead.
Every `report_s` it logs which actors wait, what each asks for, what the cluster has and has
free, and whether an autoscaler may still add a node. Where none can, it stops after `timeout_s`
with `ActorsPending`, one line that names the fix. An actor that has a worker and is only slow to
start (its `__init__` loading a large model) is reported, never stopped.

    wait_started(ray, {"learner": (handle, {"CPU": 1, "learner": 0.001})}, 30, 300, joined=True)

What Ray offers no public call for is read where `ray status` and `ray list actors` read it, in
the GCS: the autoscaler's node types and whether an actor has a worker yet. If a Ray version
moves them, the reports go on and the run waits instead of stopping.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from learner.errors import ActorsPending

log = logging.getLogger(__name__)

READ_ONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]+")
"""How Ray's autoscaler names the node types of a cluster it cannot grow (`ray start` by hand,
or a local `ray.init`): it runs read-only and mirrors each node as a type of its own."""


@dataclass(frozen=True)
class ClusterView:
    """What the cluster offers: each live node's resources, the totals and what is free."""

    nodes: list[dict[str, float]]
    total: dict[str, float]
    free: dict[str, float]
    autoscaling: bool  # an autoscaler may add nodes

    @classmethod
    def read(cls, ray: Any, joined: bool) -> ClusterView:
        types = autoscaler_node_types(ray)
        return cls(
            nodes=[n["Resources"] for n in ray.nodes() if n.get("Alive")],
            total=ray.cluster_resources(),
            free=ray.available_resources(),
            # Not known (no report yet, another Ray version): a cluster we joined may grow.
            autoscaling=joined
            if types is None
            else any(not READ_ONLY_NODE_TYPE.fullmatch(t) for t in types),
        )


def autoscaler_node_types(ray: Any) -> set[str] | None:
    """The node types of the cluster's autoscaler, as `ray status` reads them; None if unknown.
    A cluster made with `ray up` or KubeRay has its configured types (head, learner_gpu, ...),
    one started by hand only read-only mirrors, `node_<id>`."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):  # KubeRay's default
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address)
            nodes = status.active_nodes + status.idle_nodes + status.pending_launches
            return {n.ray_node_type_name for n in nodes} or None
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = json.loads(raw)["autoscaler_report"] if raw else {}
        types = set((report.get("node_type_mapping") or {}).values())
        types |= set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
        return types or None
    except Exception as err:  # private: a Ray version that moved it
        log.debug("autoscaler status unavailable: %s", err)
        return None


def has_worker(handle: Any) -> bool:
    """Whether Ray has given the actor a worker process (it is running its `__init__`), as
    `ray list actors` shows it (a pid); True if that cannot be read, so that the run waits."""
    try:
        from ray._private.state import actors

        info = actors(actor_id=handle._actor_id.hex())
        return bool(info.get("Pid") or info["Address"]["Port"])
    except Exception as err:  # private: a Ray version that moved it
        log.debug("actor state unavailable: %s", err)
        return True


def wait_started(
    ray: Any,
    actors: dict[str, tuple[Any, dict[str, float]]],
    report_s: float,
    timeout_s: float,
    joined: bool,
) -> None:
    """Return once every actor has started (its `__init__` ran, or failed: the caller's first
    call to it reports that). actors: {name: (handle, the resources it asks for)}. Every
    `report_s` seconds, log what the waiting ones lack; raise `ActorsPending` after `timeout_s`
    (0: never) if some still have no worker and no autoscaler can add a node."""
    ready = {handle.__ray_ready__.remote(): name for name, (handle, _) in actors.items()}
    waiting = list(ready)
    start = time.monotonic()
    next_report, deadline = report_s, None  # deadline: known once no autoscaler can add a node
    while True:
        wake = next_report if deadline is None else min(next_report, deadline)
        timeout = max(wake - (time.monotonic() - start), 0.0)
        _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=timeout)
        if not waiting:
            return
        waited = time.monotonic() - start
        if waited < wake:
            continue
        names = [ready[r] for r in waiting]
        needs = {n: actors[n][1] for n in names if not has_worker(actors[n][0])}
        starting = [n for n in names if n not in needs]
        cluster = ClusterView.read(ray, joined)
        stops = bool(timeout_s) and not cluster.autoscaling
        if stops and needs and waited >= timeout_s:
            raise ActorsPending(stop_message(needs, cluster, waited))
        deadline = timeout_s if stops and waited < timeout_s else None
        if waited >= next_report:
            stop_at = timeout_s if stops else None
            log.warning(report(needs, starting, len(actors), cluster, waited, stop_at))
            next_report += report_s


def fmt(resources: dict[str, float]) -> str:
    """{'CPU': 1.0, 'learner': 0.001} -> "{CPU: 1, learner: 0.001}"."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def keys_of(needs: dict[str, dict[str, float]]) -> list[str]:
    """The resources asked for, CPU and GPU first."""
    keys = {k for need in needs.values() for k in need}
    return sorted(keys, key=lambda k: (k not in ("CPU", "GPU"), k))


def reason(need: dict[str, float], cluster: ClusterView) -> str:
    """Why an actor asking for `need` has no worker."""
    if not any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in cluster.nodes):
        lacking = [k for k, v in need.items() if all(n.get(k, 0.0) < v for n in cluster.nodes)]
        if lacking:
            return f"no node offers {' or '.join(lacking)}"
        return "no single node offers all of it"
    taken = [k for k, v in need.items() if cluster.free.get(k, 0.0) < v]
    if taken:
        return f"its {' and '.join(taken)} {'is' if len(taken) == 1 else 'are'} taken"
    return "the cluster has room for it now"


def holdings(needs: dict[str, dict[str, float]], cluster: ClusterView) -> str:
    """What the cluster has of each resource the waiting actors ask for, and has free."""
    return ", ".join(
        f"{k} {cluster.total.get(k, 0.0):g} ({cluster.free.get(k, 0.0):g} free)"
        for k in keys_of(needs)
    )


def report(
    needs: dict[str, dict[str, float]],
    starting: list[str],
    actors: int,
    cluster: ClusterView,
    waited: float,
    deadline: float | None,
) -> str:
    """The periodic warning: one line per waiting actor, then the cluster and what comes next."""
    lines = [f"{len(needs) + len(starting)} of {actors} actors not started after {waited:.0f}s:"]
    lines += [
        f"  {name} asks for {fmt(need)}: {reason(need, cluster)}" for name, need in needs.items()
    ]
    lines += [f"  {name} is starting on its node (loading its model)" for name in starting]
    if not needs:
        return "\n".join(lines)
    lines.append(f"  the cluster has {holdings(needs, cluster)}")
    if cluster.autoscaling:
        lines.append(
            "  an autoscaler may still add a node for them: `ray status` shows whether it does "
            "(not past a node type's max_workers, nor where no node type offers what they ask)"
        )
    else:
        until = f"the run stops at {deadline:.0f}s" if deadline else "the run waits"
        lines.append(
            f"  no autoscaler can add a node to this cluster; unless other work frees room, "
            f"{until} (--pending-timeout); to fix: {fixes(needs, cluster)}"
        )
    return "\n".join(lines)


def stop_message(needs: dict[str, dict[str, float]], cluster: ClusterView, waited: float) -> str:
    """The one-line error that stops the run."""
    each = "; ".join(f"{name} asks for {fmt(need)}" for name, need in needs.items())
    return (
        f"{plural(len(needs), 'actor')} could not start in {waited:.0f}s ({each}) on a cluster "
        f"with {holdings(needs, cluster)} and no autoscaler to add a node: {fixes(needs, cluster)}"
    )


def fixes(needs: dict[str, dict[str, float]], cluster: ClusterView) -> str:
    """What would let the waiting actors start."""
    out = []
    for key in keys_of(needs):
        wanted = sum(need.get(key, 0.0) for need in needs.values())
        free = cluster.free.get(key, 0.0)
        if wanted <= free and any(n.get(key, 0.0) >= wanted for n in cluster.nodes):
            continue
        if key == "CPU" and len(cluster.nodes) == 1:
            cpus = cluster.total.get(key, 0.0) - free + wanted  # held by the run and others
            out.append(
                f"start Ray with {cpus:g} logical CPUs (ray start --head --num-cpus={cpus:g}, or "
                f"ray.init(num_cpus={cpus:g}); more than the cores is fine)"
            )
        elif key == "CPU":
            out.append(f"add a node with {wanted - free:g} CPUs")
        elif key == "GPU":
            out.append("add a node with a GPU (ray start --num-gpus=1), or run with --device cpu")
        else:
            out.append(
                f"add a node that offers {key} (ray start --resources='{{\"{key}\": 1}}'; on "
                "`ray up` or KubeRay, a node type whose resources include it)"
            )
    out.append("or run fewer actors (--num-samplers, --reward-workers)")
    return ", ".join(out)
