"""The driver's Prometheus endpoint, scraped over HTTP and read with prometheus-client's parser."""

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from learner.metrics import MetricsExporter, NullExporter, metrics_exporter


def scrape(exporter: MetricsExporter) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels but `run`): value} of every ddpo sample the endpoint serves;
    each must carry the exporter's `run` label."""
    with urllib.request.urlopen(exporter.url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    got = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("ddpo_") or s.name.endswith("_created"):
                continue  # prometheus-client's own metrics, and counters' creation times
            labels = dict(s.labels)
            assert labels.pop("run", None) == exporter.run, (s.name, s.labels)
            got[(s.name, tuple(sorted(labels.items())))] = s.value
    return got


RECORD = {
    "epoch": 2,
    "policy_version": 2,
    "reward_mean": -3.25,
    "reward_std": 0.5,
    "loss": 0.0125,
    "approx_kl": 1.5e-6,
    "clipfrac": 0.25,
    "grad_norm": None,  # an algorithm without it: skipped
    "samples": 32,
    "batches_dropped": 1,
    "seconds": 8.0,
    "staleness": 0.75,
    "staleness/1/clipfrac": 0.5,
    "reward/aesthetic/mean": 5.5,
    "reward/aesthetic/std": 0.25,
    "reward/aesthetic/busy_fraction": 0.125,
    "busy/sampler": 0.875,
    "queue_depth": 3,
    "lr": 3e-4,
    "task": "compressibility",  # not a number: skipped
}


def test_scrape_parses_and_carries_the_values():
    with MetricsExporter(port=0) as exporter:
        assert exporter.port > 0
        exporter.update(RECORD)
        second = dict(RECORD, epoch=3, reward_mean=-3.0, samples=16, batches_dropped=0)
        exporter.update(second)
        got = scrape(exporter)

    assert got[("ddpo_epoch", ())] == 3
    assert got[("ddpo_policy_version", ())] == 2
    assert got[("ddpo_reward_mean", (("reward", "total"),))] == -3.0
    assert got[("ddpo_reward_std", (("reward", "total"),))] == 0.5
    assert got[("ddpo_reward_mean", (("reward", "aesthetic"),))] == 5.5
    assert got[("ddpo_reward_std", (("reward", "aesthetic"),))] == 0.25
    assert got[("ddpo_loss", ())] == 0.0125
    assert got[("ddpo_approx_kl", ())] == 1.5e-6
    assert got[("ddpo_clipfrac", ())] == 0.25
    assert got[("ddpo_staleness", ())] == 0.75
    assert got[("ddpo_clipfrac_by_staleness", (("staleness", "1"),))] == 0.5
    assert got[("ddpo_busy_fraction", (("role", "reward_aesthetic"),))] == 0.125
    assert got[("ddpo_busy_fraction", (("role", "sampler"),))] == 0.875
    assert got[("ddpo_queue_depth", ())] == 3
    assert got[("ddpo_epoch_seconds", ())] == 8.0
    assert got[("ddpo_samples_per_second", ())] == 16 / 8.0
    assert got[("ddpo_metric", (("key", "lr"),))] == 3e-4
    # Counters add up over epochs.
    assert got[("ddpo_samples_total", ())] == 48
    assert got[("ddpo_epochs_total", ())] == 2
    assert got[("ddpo_batches_dropped_total", (("reason", "non_finite_reward"),))] == 1
    # A skipped value leaves its gauge absent (it was 0, as if measured); no key for a string.
    assert ("ddpo_grad_norm", ()) not in got
    assert not any(key == (("key", "task"),) for _, key in got)


def test_before_the_first_epoch_no_gauge_reads_0():
    """Issue 13, finding 11: every unlabelled gauge read 0 before anything had happened (a
    reward of 0, a loss of 0). Now only the counters are there, at their true 0."""
    with MetricsExporter(port=0, run="r1") as exporter:
        assert scrape(exporter) == {
            ("ddpo_samples_total", ()): 0,
            ("ddpo_epochs_total", ()): 0,
            ("ddpo_batches_dropped_total", (("reason", "non_finite_reward"),)): 0,
            ("ddpo_batches_dropped_total", (("reason", "stale"),)): 0,
        }
        exporter.update({"epoch": 0, "reward_mean": -1.0, "loss": None})
        got = scrape(exporter)
    assert got[("ddpo_epoch", ())] == 0 and ("ddpo_loss", ()) not in got


def test_two_runs_on_one_port_are_two_series():
    """Issue 13, finding 11: run after run on the driver's port (a RayJob retried, the next
    experiment), Prometheus saw one series per metric and drew the runs over each other. Each
    run's samples carry its own `run` label."""
    with MetricsExporter(port=0, run="first") as exporter:
        port = exporter.port
        exporter.update({"epoch": 9, "reward_mean": 1.0})
        first = urllib.request.urlopen(exporter.url, timeout=10).read().decode()
    with MetricsExporter(port=port, run="second") as exporter:
        exporter.update({"epoch": 0, "reward_mean": -1.0})
        second = urllib.request.urlopen(exporter.url, timeout=10).read().decode()
    series = [
        {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(t)
         for s in f.samples if s.name == "ddpo_epoch"}
        for t in (first, second)
    ]  # fmt: skip
    assert series == [{("ddpo_epoch", (("run", "first"),))}, {("ddpo_epoch", (("run", "second"),))}]


def test_two_exporters_do_not_share_state():
    with MetricsExporter(port=0) as a, MetricsExporter(port=0) as b:
        assert a.port != b.port
        a.update({"reward_mean": 1.0})
        b.update({"reward_mean": 2.0})
        assert scrape(a)[("ddpo_reward_mean", (("reward", "total"),))] == 1.0
        assert scrape(b)[("ddpo_reward_mean", (("reward", "total"),))] == 2.0


def test_busy_port_gives_a_clear_error_and_close_frees_the_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*--metrics-port"):
            MetricsExporter(port=port)
    exporter = MetricsExporter(port=0)
    port = exporter.port
    exporter.close()
    exporter.close()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_bad_port_and_null_exporter():
    with pytest.raises(ValueError, match="70000"):
        MetricsExporter(port=70000)
    null = metrics_exporter(None)
    assert isinstance(null, NullExporter)
    null.update(RECORD)
    null.close()


class Recorded:
    """Stands in for a ray.util.metrics object: records (value, tags) of every call."""

    def __init__(self):
        self.calls = []

    def set(self, value, tags):
        self.calls.append((value, dict(tags)))

    inc = observe = set


def test_reward_queue_depth_falls_back_to_0(monkeypatch):
    """Issue 13, finding 11: a reward actor set its queue-depth gauge when a request arrived,
    never when the model took it, so an idle actor reported its last backlog forever."""
    import numpy as np

    from actors import reward
    from actors.metrics import ActorMetrics

    runs = []
    fake = lambda run: runs.append(run) or ActorMetrics(*(Recorded() for _ in range(4)))  # noqa: E731
    monkeypatch.setattr(reward, "ray_actor_metrics", fake)
    worker = reward.RewardWorker("jpeg_compressibility", run="r1")
    batch = {"images": np.zeros((2, 8, 8, 3), np.uint8), "prompts": ["a", "b"], "batch_id": "0"}
    worker.score(batch)
    tags = {"queue": "reward_jpeg_compressibility"}
    assert worker.metrics.queue_depth.calls == [(1, tags), (0, tags)]  # queued, then taken
    assert runs == ["r1"]  # every metric of the actor carries run="r1"


def test_actor_metrics_carry_the_run():
    """Issue 13, finding 11: the actors' ray_ddpo_* metrics carried no run label either."""
    from learner.metrics import actor_metrics, run_label

    metrics = actor_metrics(run_label("/mnt/runs/alignment"))
    for metric in vars(metrics).values():
        assert "run" in metric._tag_keys and metric._default_tags == {"run": "alignment"}
    assert run_label(None) == "run"  # the driver's default run directory, runs/run


def test_evaluation_gauges_pair_with_the_start():
    start = {
        "reward_mean": 1.0,
        "rewards": [1.0, 2.0, 0.0],
        "kl_base": 0.0,
        "heldout": {"reward_mean": 0.5, "rewards": [0.5, 0.5, 0.5]},
        "guard": {"reward": "aesthetic", "rewards": [5.0, 5.0, 5.0]},
    }
    later = {
        "reward_mean": 1.5,
        "rewards": [1.5, 2.5, 0.5],
        "kl_base": 0.002,
        "heldout": {"reward_mean": 0.75, "rewards": [0.75, 0.75, 0.75]},
        "guard": {"reward": "aesthetic", "rewards": [4.0, 4.5, 4.0]},
    }
    with MetricsExporter(port=0) as exporter:
        assert not any(k[0].startswith("ddpo_eval") for k in scrape(exporter))  # absent, not 0
        exporter.evaluation(start, start)
        exporter.evaluation(later, start)
        got = scrape(exporter)
    assert got[("ddpo_eval_reward_mean", (("prompts", "train"),))] == 1.5
    assert got[("ddpo_eval_gain", (("prompts", "train"),))] == 0.5
    assert got[("ddpo_eval_reward_mean", (("prompts", "heldout"),))] == 0.75
    assert got[("ddpo_eval_gain", (("prompts", "heldout"),))] == 0.25
    assert got[("ddpo_eval_kl_base", ())] == 0.002
    assert abs(got[("ddpo_eval_guard_change", (("reward", "aesthetic"),))] + 2.5 / 3) < 1e-12
    NullExporter().evaluation(later, start)  # metrics off: nothing to do
