"""Reward faults: a reward service that hangs, answers 5xx or 4xx, or is not there; a reward that
returns the wrong count; a reward actor that dies mid-call. Each is retried, answered with NaN
rewards and a reason (the driver drops and counts the batch), or raised, as it deserves."""

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest

import rewards.client
from actors.reward import RewardWorker
from learner.fleet import reward_actor_options
from rewards.client import RemoteReward, RewardServiceError, RewardUnavailable
from rewards.serve import Limits, parse_request

HANG = "hang"  # read the request, never answer
OK = "ok"  # reward = image mean


class ScriptedService(ThreadingHTTPServer):
    """A reward service whose k-th POST gets `script[k]` (HANG, OK or an error status; the last
    entry repeats). Counts the attempts it sees."""

    daemon_threads = True

    def __init__(self, script: list[str | int]):
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script, self.attempts = script, 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at teardown: hanging handlers return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_action(self) -> str | int:
        with self.lock:
            action = self.script[min(self.attempts, len(self.script) - 1)]
            self.attempts += 1
            return action


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedService

    def do_POST(self) -> None:
        action = self.server.next_action()
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if action == HANG:
            self.server.release.wait(timeout=60)
            return
        if action == OK:
            images, prompts, batch_id = parse_request(body, Limits())
            rewards = images.mean(axis=(1, 2, 3)).tolist()
            self._send(200, {"rewards": rewards, "info": {"prompt": prompts}, "batch_id": batch_id})
        else:
            self._send(int(action), {"error": f"scripted {action}"})

    def _send(self, status: int, payload: dict) -> None:
        body = msgpack.packb(payload, use_bin_type=True)
        self.send_response(status)
        self.send_header("Content-Type", "application/msgpack")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def service():
    """service(script) -> a running ScriptedService; all are shut down after the test."""
    started = []

    def start(script: list[str | int]) -> ScriptedService:
        server = ScriptedService(script)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.release.set()
        server.shutdown()
        server.server_close()


def batch(n: int = 3, seed: int = 0) -> dict:
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return {"images": images, "prompts": [f"p{i}" for i in range(n)], "batch_id": f"b{seed}"}


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    """Poll until condition() holds (a request may reach a handler thread after the client has
    given up on it); the caller asserts the exact value afterwards."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def unused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed: connections are refused


FAST = {"retries": 2, "backoff": 0.01, "max_backoff": 0.02}


def test_timeouts_are_retried_then_unavailable(service, caplog):
    server = service([HANG])
    remote = RemoteReward(server.url, "token", timeout=0.2, **FAST)
    b = batch()
    with caplog.at_level(logging.WARNING, logger="rewards.client"):
        with pytest.raises(
            RewardUnavailable, match="failed 3 attempts.*last error.*timed out"
        ) as e:
            remote(b["images"], b["prompts"])
    assert server.url in str(e.value)
    wait_for(lambda: server.attempts >= 3)
    assert server.attempts == 3  # retries + 1
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2


@pytest.mark.parametrize("status", [503, 500, 408])
def test_a_5xx_or_408_is_retried_and_the_next_answer_used(service, caplog, status):
    server = service([status, OK])
    remote = RemoteReward(server.url, "token", timeout=30, **FAST)
    b = batch()
    with caplog.at_level(logging.WARNING, logger="rewards.client"):
        rewards, info = remote(b["images"], b["prompts"])
    np.testing.assert_allclose(rewards, b["images"].mean(axis=(1, 2, 3)), rtol=1e-6)
    assert info["prompt"] == b["prompts"]
    assert server.attempts == 2
    assert [f"answered {status}" in r.getMessage() for r in caplog.records] == [True]


@pytest.mark.parametrize("status", [401, 400, 413])
def test_a_4xx_raises_at_once(service, status):
    server = service([status, OK])
    remote = RemoteReward(server.url, "wrong", timeout=30, **FAST)
    b = batch()
    with pytest.raises(RewardServiceError, match=f"{server.url}.*answered {status}") as e:
        remote(b["images"], b["prompts"])
    assert e.value.status == status
    assert server.attempts == 1  # the reply came after the only attempt was counted


def test_backoff_doubles_up_to_its_cap(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(rewards.client, "time", SimpleNamespace(sleep=waits.append))
    remote = RemoteReward(unused_url(), None, timeout=5, retries=4, backoff=0.5, max_backoff=1.5)
    b = batch(1)
    with pytest.raises(RewardUnavailable, match="failed 5 attempts.*refused"):
        remote(b["images"], b["prompts"])
    assert waits == [0.5, 1.0, 1.5, 1.5]


def test_bad_retry_settings_are_refused():
    with pytest.raises(ValueError, match="timeout > 0"):
        RemoteReward("http://127.0.0.1:1", None, timeout=0)


def test_worker_answers_nan_when_the_service_is_down():
    worker = RewardWorker("jpeg_compressibility", url=unused_url(), remote_options=FAST)
    rewards, info = worker.score(batch(3))
    assert rewards.shape == (3,) and np.isnan(rewards).all()
    assert info["reward_error"].startswith("RewardUnavailable: reward service http://127.0.0.1:")
    assert "failed 3 attempts" in info["reward_error"] and "\n" not in info["reward_error"]
    assert info["batch_id"] == "b0"
    stats = worker.stats()
    assert stats["reward/jpeg_compressibility/failed_calls"] == 1
    assert stats["reward/jpeg_compressibility/calls"] == 1


def test_worker_raises_a_4xx(service):
    server = service([401])
    worker = RewardWorker("jpeg_compressibility", url=server.url, remote_options=FAST)
    with pytest.raises(RewardServiceError, match="answered 401"):
        worker.score(batch())
    assert worker.stats()["reward/jpeg_compressibility/failed_calls"] == 0


def test_worker_answers_nan_for_the_wrong_count():
    worker = RewardWorker("jpeg_compressibility")
    worker.fn = lambda images, prompts: (np.zeros(len(images) + 1), {"x": [0] * len(images)})
    rewards, info = worker.score(batch(3))
    assert rewards.shape == (3,) and np.isnan(rewards).all()
    assert info == {
        "reward_error": "WrongRewardCount: reward jpeg_compressibility returned shape (4,) "
        "for 3 images",
        "batch_id": "b0",
    }
    assert worker.stats()["reward/jpeg_compressibility/failed_calls"] == 1
    worker.fn = lambda images, prompts: (images.mean(axis=(1, 2, 3)), {})
    rewards, info = worker.score(batch(2))  # the next call is scored as usual
    assert np.isfinite(rewards).all() and "reward_error" not in info


def test_killed_reward_actor_restarts_and_scores_the_lost_call(ray_instance, service):
    ray = ray_instance
    server = service([HANG, OK])
    options = reward_actor_options("jpeg_compressibility", role_resource=False)
    actor = (
        ray.remote(RewardWorker)
        .options(**options)
        .remote(
            "jpeg_compressibility", url=server.url, remote_options={"timeout": 60, "retries": 0}
        )
    )
    b = batch(2)
    ref = actor.score.remote(b)
    wait_for(lambda: server.attempts >= 1, seconds=120)  # the call is in flight on the actor
    assert server.attempts == 1
    ray.kill(actor, no_restart=False)
    rewards, info = ray.get(ref, timeout=120)  # re-sent to the restarted actor
    np.testing.assert_allclose(rewards, b["images"].mean(axis=(1, 2, 3)), rtol=1e-6)
    assert info["batch_id"] == "b0"
    assert server.attempts == 2
