"""A tiny run submitted with `ray job submit` to a separate `ray start --head`, as deploy/README.md
tells users to; token authentication on, as on every cluster we deploy.

Also checks what the monitoring relies on: the dashboard refuses requests without the token,
the actor metrics reach the node's Prometheus endpoint under the names the Grafana dashboard
queries, and Ray's service-discovery file (deploy/prometheus.yml) lists that endpoint.

The head is started with `--block` in its own process group, and stopped by signalling that
group: `ray stop` would stop every Ray instance on the machine, other people's included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ddpo.config import task_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`
pytestmark = pytest.mark.slow  # about 75 s on 2 cores

PROBE = """
import time
import ray
from learner.metrics import actor_metrics

ray.init(address="auto")

@ray.remote(num_cpus=0)
class Probe:
    def __init__(self):
        self.m = actor_metrics()

    def record(self):
        self.m.samples_produced.inc(8, tags={"sampler_id": "probe"})
        self.m.sampling_seconds.observe(1.5, tags={"sampler_id": "probe"})
        self.m.reward_latency.observe(0.2, tags={"reward": "jpeg_compressibility"})
        self.m.queue_depth.set(3, tags={"queue": "probe"})

probe = Probe.remote()
ray.get(probe.record.remote())
time.sleep(40)  # keep the actor alive while the test scrapes
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def stop_head(proc: subprocess.Popen, temp: Path) -> None:
    """Stop this head and only it: its process group, then any process of its session (Ray
    workers run in their own process groups) found by the temp dir on its command line."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(temp).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def head():
    """A local head with token auth, the role resources of cluster.yaml and a metrics port."""
    temp = Path(tempfile.mkdtemp(prefix="ddpo-ray-", dir="/tmp"))  # short: unix socket paths
    gcs, dashboard, metrics = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    resources = {"sampler": 1, "learner": 1, "reward_jpeg_compressibility": 1}
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--port={gcs}", "--node-ip-address=127.0.0.1",
            "--num-cpus=4",  # logical: sampler, reward worker and learner take one each
            f"--resources={json.dumps(resources)}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}",
            f"--temp-dir={temp}", "--disable-usage-stats",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while ray_cli("job", "list", "--address", address, env=env).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start:\n{(temp / 'head.log').read_text()}")
            time.sleep(2)
        yield {"address": address, "env": env, "metrics_port": metrics, "temp": temp}
    finally:
        stop_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_dashboard_and_job_api_need_the_token(head):
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{head['address']}/api/version", timeout=10)
    token = head["env"]["RAY_AUTH_TOKEN"]
    request = urllib.request.Request(
        f"{head['address']}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    assert json.load(urllib.request.urlopen(request, timeout=10))["ray_version"]
    without = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")}
    without["HOME"] = str(head["temp"])  # no ~/.ray/auth_token to fall back on
    refused = ray_cli("job", "list", "--address", head["address"], env=without)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()


def test_tiny_run_submitted_with_ray_job_submit(head, tmp_path):
    run_dir = tmp_path / "run"
    start = time.time()
    job = ray_cli(
        "job", "submit", "--address", head["address"], "--",
        "python", "-m", "learner.run", "--task", "compressibility", "--model", "tiny",
        "--epochs", "1", "--run-dir", str(run_dir), "--address", "auto",
        env=head["env"], timeout=540,
    )  # fmt: skip
    seconds = time.time() - start
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert re.search(r"Job '\S+' succeeded", job.stdout + job.stderr)
    print(f"tiny 1-epoch run through `ray job submit`: {seconds:.0f}s")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    preset = task_config("compressibility", "tiny")
    assert record["epoch"] == 0 and record["samples"] == preset.samples_per_epoch
    assert -10 < record["reward_mean"] < 0  # -JPEG kB of 32x32 images
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["task"], config["model"], config["epochs"]) == ("compressibility", "tiny", 1)
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # What a user does next: the report and the export for plain diffusers.
    from learner.export import export_lora
    from learner.report import write_report

    assert "reward_curve.png" in write_report(run_dir).read_text()
    export_lora(run_dir, tmp_path / "export")
    assert "# DDPO LoRA: compressibility on tiny" in (tmp_path / "export" / "README.md").read_text()


def test_actor_metrics_reach_prometheus_under_the_dashboards_names(head, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    submitted = ray_cli(
        "job",
        "submit",
        "--no-wait",
        "--address",
        head["address"],
        "--",
        "python",
        str(probe),
        env=head["env"],
    )
    assert submitted.returncode == 0, submitted.stderr[-2000:]

    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    wanted = {n for e in exprs for n in re.findall(r"\bray_ddpo_\w+", e)}
    assert wanted
    url = f"http://127.0.0.1:{head['metrics_port']}/metrics"
    deadline, names, text = time.time() + 90, set(), ""
    while time.time() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        names = set(re.findall(r"^(ray_ddpo_\w+)\{", text, re.M))
        if wanted <= names and 'sampler_id="probe"' in text:  # the probe's own series
            break
        time.sleep(3)
    assert wanted <= names, f"missing {sorted(wanted - names)}; exported {sorted(names)}"
    sample = re.search(
        r'^ray_ddpo_samples_produced_total\{[^}]*sampler_id="probe"[^}]*\} (\S+)', text, re.M
    )
    assert sample and float(sample[1]) == 8.0
    depth = re.search(r'^ray_ddpo_queue_depth\{[^}]*queue="probe"[^}]*\} (\S+)', text, re.M)
    assert depth and float(depth[1]) == 3.0

    # deploy/prometheus.yml finds the nodes through Ray's service-discovery file.
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    discovery = json.loads((head["temp"] / PROMETHEUS_SERVICE_DISCOVERY_FILE).read_text())
    ports = {t.rpartition(":")[2] for group in discovery for t in group["targets"]}
    assert str(head["metrics_port"]) in ports  # listed under the node's IP
