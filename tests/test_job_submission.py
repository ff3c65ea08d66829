"""A tiny run submitted with `ray job submit` to a separate `ray start --head`, as deploy/README.md
tells users to; token authentication on, as on every cluster we deploy.

Also checks what the monitoring relies on: the dashboard refuses requests without the token,
the actor metrics reach the node's Prometheus endpoint under the names the Grafana dashboard
queries, and Ray's service-discovery file (deploy/prometheus.yml) lists that endpoint.

The head is started with `--block` in its own process group, and stopped by signalling that
group: `ray stop` would stop every Ray instance on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ddpo.presets import task_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`
pytestmark = pytest.mark.slow  # about 2 minutes on 2 cores

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
    # `ray start --block` took over 10 s to end on SIGTERM here (the suite's teardowns): give it
    # 2 s, then kill; the scan below ends whatever of the session is left.
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
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


def documented_commands() -> tuple[list[str], list[str]]:
    """The `ray start` and `ray job submit` command lines of deploy/README.md, "On one machine",
    without their leading VAR=value (the environment here sets them)."""
    section = (ROOT / "deploy" / "README.md").read_text().split("## On one machine", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "deploy/README.md: no bash block under 'On one machine'"
    lines = block[1].replace("\\\n", " ").splitlines()
    found = []
    for command in ("ray start", "ray job submit"):
        words = shlex.split(next(line for line in lines if command in line))
        assert all(w == "RAY_AUTH_MODE=token" for w in words[: words.index("ray")])
        found.append(words[words.index("ray") + 1 :])
    return found[0], found[1]


def with_value(words: list[str], flag: str, value: str) -> list[str]:
    """words with `flag`'s value replaced (`--flag=v` or `--flag v`)."""
    out = list(words)
    for i, word in enumerate(out):
        if word.startswith(f"{flag}="):
            out[i] = f"{flag}={value}"
            return out
        if word == flag:
            out[i + 1] = value
            return out
    raise AssertionError(f"the documented command has no {flag}: {words}")


@contextlib.contextmanager
def started_head(extra: tuple[str, ...] = ()):
    """The documented head, with token auth: its flags as deploy/README.md gives them, but free
    ports, its own temp dir and the loopback address (so that it leaves other Ray instances on
    this machine alone), plus `extra`."""
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
    start, _ = documented_commands()
    start = with_value(start, "--dashboard-port", str(dashboard))
    start = with_value(start, "--metrics-export-port", str(metrics))
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"), *start, "--block", f"--port={gcs}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
            # Ray's agents default to fixed ports that another local instance (the suite's own,
            # conftest.ray_instance) already holds.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", *extra,
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
        yield {
            "address": address,
            "gcs": f"127.0.0.1:{gcs}",
            "env": env,
            "metrics_port": metrics,
            "temp": temp,
        }
    finally:
        stop_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    """The head of deploy/README.md's "On one machine", as a user starts it: as many logical
    CPUs as the machine has cores (2 in CI), the role resources, a metrics port."""
    with started_head() as started:
        yield started


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
    """deploy/README.md's `ray job submit`, word for word but for the address and run dir."""
    run_dir = tmp_path / "run"
    _, submit = documented_commands()
    submit = with_value(submit, "--address", head["address"])
    submit = with_value(submit, "--run-dir", str(run_dir))
    start = time.time()
    job = ray_cli(*submit, env=head["env"], timeout=540)
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
    assert (config["task"], config["model"], config["run"]["epochs"]) == (
        "compressibility",
        "tiny",
        1,
    )
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


def test_a_head_too_small_for_the_run_says_what_is_missing_and_stops(tmp_path):
    """An async run needs a logical CPU for each of its sampler, reward actor and learner: on a
    head with 2, one of them cannot start. The driver says so at its first report and, with no
    autoscaler to add a node, stops after --pending-timeout with one line naming the fix (the
    intervals shortened from the defaults, 30 s and 300 s, for the test's sake)."""
    with started_head(extra=("--num-cpus=2",)) as small:
        start = time.time()
        driver = subprocess.Popen(
            [
                sys.executable, "-m", "learner.run", "--task", "compressibility", "--model",
                "tiny", "--mode", "async", "--run-dir", str(tmp_path / "run"),
                "--address", small["gcs"], "--pending-timeout", "8", "--run.pending-report-s", "4",
            ],
            env=small["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        lines: list[tuple[float, str]] = []  # (seconds since the start, line)
        reader = threading.Thread(
            target=lambda: lines.extend((time.time() - start, x.rstrip()) for x in driver.stdout)
        )
        reader.start()
        try:
            status = driver.wait(timeout=150)
        finally:
            driver.kill()
            reader.join(timeout=10)
    output = "\n".join(line for _, line in lines)
    reported = next((t for t, line in lines if "actors not started after" in line), None)
    assert reported is not None and reported < 60, output
    assert re.search(
        r"asks for \{CPU: 1, (learner|sampler|reward_\w+): 0.001\}: its CPU is taken", output
    )
    assert "the cluster has CPU 2 (0 free)" in output
    assert "no autoscaler can add a node to this cluster" in output
    assert status == 2, output
    last = lines[-1][1]
    assert re.match(r"error: 1 actor could not start in (8|9|10)s", last), output
    assert "start Ray with 3 logical CPUs (ray start --head --num-cpus=3" in last
    print(f"pending report after {reported:.0f}s, stopped after {time.time() - start:.0f}s")
