"""Prometheus metrics: the driver's learning metrics, and `ray.util.metrics` for the actors.

The driver (`learner.run --metrics-port PORT`) serves its per-epoch metrics over HTTP with
prometheus-client; Prometheus scrapes it beside Ray's own per-node endpoints, which carry what the
actors record with `ray.util.metrics` (Ray prefixes those names with `ray_`).

    exporter = MetricsExporter(port=8000, run="aesthetic-1")   # port 0: any free port (.port)
    exporter.update({"epoch": 3, "reward_mean": -2.1, "reward/aesthetic/mean": 5.2, ...})
    exporter.close()

Every metric carries the label `run` (the run directory's name, `run_label`), so that two runs
scraped by one Prometheus, one after the other on the same port or side by side, never share a
series. A gauge appears with the first epoch that has its value: before that it is absent, not
0. The counters start at 0 when the run starts.

Driver metric names (the contract with deploy/grafana-dashboard.json; `record` key -> metric):

| record key                          | metric                                        |
| ----------------------------------- | --------------------------------------------- |
| epoch, policy_version               | ddpo_epoch, ddpo_policy_version               |
| reward_mean, reward_std             | ddpo_reward_mean{reward="total"}, ..._std     |
| reward/<name>/mean, .../std         | ddpo_reward_mean{reward="<name>"}, ..._std    |
| reward/<name>/busy_fraction         | ddpo_busy_fraction{role="reward_<name>"}      |
| busy/<role> (sampler, learner, ...) | ddpo_busy_fraction{role="<role>"}             |
| loss, approx_kl, clipfrac, grad_norm| ddpo_loss, ddpo_approx_kl, ...                |
| staleness, staleness_max            | ddpo_staleness, ddpo_staleness_max            |
| staleness/<k>/<stat>                | ddpo_<stat>_by_staleness{staleness="<k>"}     |
| queue_depth                         | ddpo_queue_depth                              |
| seconds, samples                    | ddpo_epoch_seconds, ddpo_samples_total (+=),  |
|                                     | ddpo_samples_per_second (samples / seconds)   |
| batches_dropped(_nonfinite, _stale) | ddpo_batches_dropped_total{reason=...} (+=)   |
| any other number                    | ddpo_metric{key="<key>"}                      |

Evaluations (`exporter.evaluation(record, start)`, records of eval.jsonl):
ddpo_eval_reward_mean{prompts="train"|"heldout"}, ddpo_eval_gain{prompts} (paired, over the
start), ddpo_eval_kl_base, ddpo_eval_guard_change{reward}.

Actor metric names (`actor_metrics()`, as Prometheus sees them through Ray):
ray_ddpo_samples_produced_total{sampler_id}, ray_ddpo_sampling_seconds_bucket{sampler_id},
ray_ddpo_reward_latency_seconds_bucket{reward}, ray_ddpo_queue_depth{queue}, each with `run`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from learner.evaluation import paired_gain

PREFIX = "ddpo_"

SCALARS = {
    "epoch": ("epoch", "Last finished epoch."),
    "policy_version": ("policy_version", "Policy version that sampled the last epoch."),
    "loss": ("loss", "Training loss of the last epoch."),
    "approx_kl": ("approx_kl", "0.5 * mean((log_prob_new - log_prob_old)^2) of the last epoch."),
    "clipfrac": ("clipfrac", "Fraction of importance ratios outside the clip range."),
    "grad_norm": ("grad_norm", "Gradient norm before clipping."),
    "staleness": ("staleness", "Mean policy versions between sampling and training a batch."),
    "staleness_mean": ("staleness", "Mean policy versions between sampling and training a batch."),
    "staleness_max": ("staleness_max", "Largest staleness trained on in the last epoch."),
    "queue_depth": ("queue_depth", "Sampled batches waiting for the learner."),
    "seconds": ("epoch_seconds", "Wall-clock seconds of the last epoch."),
}
"""record key -> (metric name without the prefix, help) for plain gauges."""

DROP_REASONS = {
    "batches_dropped": "non_finite_reward",  # sync mode
    "batches_dropped_nonfinite": "non_finite_reward",  # async mode
    "batches_dropped_stale": "stale",
}
"""Counters of dropped batches, by record key -> reason label."""

REWARD_KEY = re.compile(r"^reward/(?P<name>[^/]+)/(?P<stat>mean|std|busy_fraction)$")
BUSY_KEY = re.compile(r"^busy/(?P<role>[^/]+)$")
STALENESS_KEY = re.compile(r"^staleness/(?P<k>\d+)/(?P<stat>[a-z_]+)$")


class MetricsExporter:
    """Serves the driver's per-epoch metrics in the Prometheus text format on http://host:port/.

    Uses its own `CollectorRegistry`, so two exporters in one process (tests) do not collide.
    port: 0 picks a free port (read `.port`). host: 127.0.0.1 serves this machine only; use
    0.0.0.0 where Prometheus scrapes from another machine (a cluster, Kubernetes). run: the
    value of every metric's `run` label.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", run: str = "run"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        if not 0 <= port < 65536:
            raise ValueError(f"metrics port {port} is not a TCP port; pass 0 (any free) to 65535")
        self.registry = CollectorRegistry(auto_describe=True)
        self.run = run
        r = self.registry

        # Every metric has labels, at least `run`: a labelled gauge has no sample until a value
        # is set, where an unlabelled one would read 0 before anything happened.
        # Two record keys may feed one gauge (staleness, staleness_mean): one gauge per name.
        def gauge(name: str, help: str, *labels: str) -> Any:
            return Gauge(PREFIX + name, help, ["run", *labels], registry=r)

        self._gauges = {name: gauge(name, help) for name, help in dict(SCALARS.values()).items()}
        self.reward_mean = gauge(
            "reward_mean", "Mean reward of the last epoch (total or one term).", "reward"
        )
        self.reward_std = gauge(
            "reward_std", "Reward standard deviation of the last epoch.", "reward"
        )
        self.busy = gauge("busy_fraction", "Fraction of time a role was busy.", "role")
        self.samples_per_second = gauge(
            "samples_per_second", "Samples of the last epoch / its seconds."
        )
        self.samples = Counter(PREFIX + "samples", "Samples trained on.", ["run"], registry=r)
        self.epochs = Counter(PREFIX + "epochs", "Epochs finished.", ["run"], registry=r)
        self.dropped = Counter(
            PREFIX + "batches_dropped", "Batches not trained on.", ["run", "reason"], registry=r
        )
        # Counters count from the start of the run: 0 is their true value before any epoch.
        self.samples.labels(run=run)
        self.epochs.labels(run=run)
        for reason in sorted(set(DROP_REASONS.values())):
            self.dropped.labels(run=run, reason=reason)
        self.by_staleness: dict[str, Any] = {}
        self.other = gauge(
            "metric", "Any other numeric per-epoch metric, by its record key.", "key"
        )
        self.eval_reward = gauge(
            "eval_reward_mean",
            "Mean reward of the last evaluation's fixed samples, by prompt set.",
            "prompts",
        )
        self.eval_gain = gauge(
            "eval_gain",
            "Paired gain of the last evaluation over the start, by prompt set.",
            "prompts",
        )
        self.eval_kl = gauge(
            "eval_kl_base",
            "Per-step KL of the policy to the base model on the last evaluation's samples.",
        )
        self.eval_guard = gauge(
            "eval_guard_change",
            "Paired change of the guard reward since the start (it fires below -MAX_DROP).",
            "reward",
        )
        try:
            server, self._thread = start_http_server(port, addr=host, registry=r)
            self._server: Any = server
        except OSError as err:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({err}); pick another --metrics-port, "
                "or 0 for any free port"
            ) from err
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def update(self, record: dict[str, Any]) -> None:
        """Set the gauges from one epoch's metrics and add its counts to the counters.

        Values that are None, non-numeric or not finite are skipped (an algorithm without a
        clipfrac, a reward that produced NaN)."""
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            self._update_one(key, value)
        samples, seconds = record.get("samples"), record.get("seconds")
        if isinstance(samples, int | float) and isinstance(seconds, int | float) and seconds > 0:
            self.samples_per_second.labels(run=self.run).set(samples / seconds)
        self.epochs.labels(run=self.run).inc()

    def evaluation(self, record: dict[str, Any], start: dict[str, Any]) -> None:
        """Set the evaluation gauges from one record of eval.jsonl, paired with the start's:
        training and held-out prompts, the KL to the base model, the guard reward."""
        run = self.run
        for prompts, now, then in (
            ("train", record, start),
            ("heldout", record.get("heldout"), start.get("heldout")),
        ):
            if now:
                self.eval_reward.labels(run=run, prompts=prompts).set(now["reward_mean"])
                gain = paired_gain(then["rewards"], now["rewards"])["mean"] if then else 0.0
                self.eval_gain.labels(run=run, prompts=prompts).set(gain)
        if record.get("kl_base") is not None:
            self.eval_kl.labels(run=run).set(record["kl_base"])
        guard, then = record.get("guard"), start.get("guard")
        if guard and then:
            change = paired_gain(then["rewards"], guard["rewards"])["mean"]
            self.eval_guard.labels(run=run, reward=guard["reward"]).set(change)

    def _update_one(self, key: str, value: float) -> None:
        run = self.run
        if key in SCALARS:
            self._gauges[SCALARS[key][0]].labels(run=run).set(value)
        elif key == "reward_mean":
            self.reward_mean.labels(run=run, reward="total").set(value)
        elif key == "reward_std":
            self.reward_std.labels(run=run, reward="total").set(value)
        elif key == "samples":
            self.samples.labels(run=run).inc(max(value, 0.0))
        elif key in DROP_REASONS:
            self.dropped.labels(run=run, reason=DROP_REASONS[key]).inc(max(value, 0.0))
        elif m := REWARD_KEY.match(key):
            name, stat = m["name"], m["stat"]
            if stat == "busy_fraction":
                self.busy.labels(run=run, role=f"reward_{name}").set(value)
            else:
                gauge = self.reward_mean if stat == "mean" else self.reward_std
                gauge.labels(run=run, reward=name).set(value)
        elif m := BUSY_KEY.match(key):
            self.busy.labels(run=run, role=m["role"]).set(value)
        elif m := STALENESS_KEY.match(key):
            self._staleness_gauge(m["stat"]).labels(run=run, staleness=m["k"]).set(value)
        else:
            self.other.labels(run=run, key=key).set(value)

    def _staleness_gauge(self, stat: str) -> Any:
        from prometheus_client import Gauge

        if stat not in self.by_staleness:
            self.by_staleness[stat] = Gauge(
                f"{PREFIX}{stat}_by_staleness",
                f"{stat} of the last epoch's batches that were `staleness` versions old.",
                ["run", "staleness"],
                registry=self.registry,
            )
        return self.by_staleness[stat]

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullExporter:
    """Stands in for `MetricsExporter` when no --metrics-port is given."""

    port = None
    url = None

    def update(self, record: dict[str, Any]) -> None:
        pass

    def evaluation(self, record: dict[str, Any], start: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_exporter(
    port: int | None, host: str = "127.0.0.1", run: str = "run"
) -> MetricsExporter | NullExporter:
    """A `MetricsExporter` on `port`, or a `NullExporter` when port is None (metrics off)."""
    return NullExporter() if port is None else MetricsExporter(port, host, run)


# The actors' ray.util.metrics live with the actors (actors/metrics.py); re-exported here.
from actors.metrics import ActorMetrics, actor_metrics, run_label  # noqa: E402

__all__ = [
    "ActorMetrics",
    "MetricsExporter",
    "NullExporter",
    "actor_metrics",
    "metrics_exporter",
    "run_label",
]
