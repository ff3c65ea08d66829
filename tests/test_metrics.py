"""The driver's Prometheus endpoint, scraped over HTTP and read with prometheus-client's parser."""

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from learner.metrics import MetricsExporter, NullExporter, metrics_exporter


def scrape(exporter: MetricsExporter) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of everything the endpoint serves."""
    with urllib.request.urlopen(exporter.url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


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
    # Skipped values leave their gauge at its initial 0; no key for a string.
    assert got[("ddpo_grad_norm", ())] == 0
    assert not any(key == (("key", "task"),) for _, key in got)


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
