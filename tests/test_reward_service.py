"""The msgpack reward service on loopback: scoring, the client, the token, limits and 4xx errors."""

import http.client
import io
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from actors.reward import RewardWorker
from rewards import make_reward
from rewards.client import RemoteReward, RewardServiceError, health, score_remote
from rewards.serve import Limits, encode_images, make_server

TOKEN = "test-token-0123456789"
LIMITS = Limits(max_body_bytes=200_000, max_images=4, max_image_pixels=64 * 64, max_prompt_chars=50)


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def post(
    server, body: bytes, headers: dict | None = None, path: str = "/score"
) -> tuple[int, dict]:
    """A raw request; returns (status, decoded msgpack reply)."""
    base = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/msgpack"}
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("POST", path, body=body, headers={**base, **(headers or {})})
    response = conn.getresponse()
    reply = msgpack.unpackb(response.read(), raw=False)
    conn.close()
    return response.status, reply


def message(**fields) -> bytes:
    base = {"images": encode_images(images(2)), "prompts": ["a", "b"]}
    return msgpack.packb({**base, **fields}, use_bin_type=True)


def test_health_and_score_match_the_local_reward(server):
    assert health(server.url) == {"status": "ok", "reward": "jpeg_compressibility"}
    imgs = images(3)
    local, local_info = make_reward("jpeg_compressibility")(imgs, ["a", "b", "c"])
    rewards, info = score_remote(server.url, imgs, ["a", "b", "c"], TOKEN)
    np.testing.assert_allclose(rewards, local, rtol=1e-6)  # PNG is lossless: same pixels
    np.testing.assert_allclose(info["jpeg_kb"], local_info["jpeg_kb"], rtol=1e-6)
    jpeg_rewards, _ = score_remote(server.url, imgs, ["a", "b", "c"], TOKEN, image_format="JPEG")
    assert jpeg_rewards.shape == (3,)
    status, reply = post(server, message(batch_id="s0-7"))
    assert status == 200 and reply["batch_id"] == "s0-7" and len(reply["rewards"]) == 2


def test_remote_reward_splits_and_worker_uses_url(server, tmp_path):
    imgs = images(6, seed=1)
    prompts = [str(i) for i in range(6)]
    local, _ = make_reward("jpeg_compressibility")(imgs, prompts)
    remote, info = RemoteReward(server.url, TOKEN, max_images=4)(imgs, prompts)  # 4 + 2
    np.testing.assert_allclose(remote, local, rtol=1e-6)
    assert info["jpeg_kb"].shape == (6,)
    (tmp_path / "token").write_text(TOKEN + "\n")
    worker = RewardWorker(
        "jpeg_compressibility", url=server.url, token_file=str(tmp_path / "token")
    )
    rewards, info = worker.score({"images": imgs[:4], "prompts": prompts[:4], "batch_id": 3})
    np.testing.assert_allclose(rewards, local[:4], rtol=1e-6)
    assert info["batch_id"] == 3


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"Authorization": ""}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"Content-Type": "application/json"}, 415),
    ],
)
def test_token_and_content_type(server, headers, status):
    got, reply = post(server, message(), headers)
    assert got == status and reply["error"]


def test_client_raises_service_errors(server):
    with pytest.raises(RewardServiceError, match="401.*Bearer") as err:
        score_remote(server.url, images(1), ["a"], "wrong")
    assert err.value.status == 401
    with pytest.raises(RewardServiceError, match="at most 4 per request"):
        score_remote(server.url, images(5), list("abcde"), TOKEN)


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(images(1)[0]).save(buffer, format="GIF")
    return buffer.getvalue()


class Touch:
    """Unpickling this would create a file: the server must never do it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"\xc1 not msgpack", 400, "not valid msgpack"),
        (msgpack.packb([1, 2]), 400, "msgpack map"),
        (message(extra=1), 400, "unknown request keys"),
        (msgpack.packb({"images": [], "prompts": [], b"x": 1, 2.5: 1}), 400, "msgpack"),
        (msgpack.packb({"images": [], "prompts": [], b"x": 1}), 400, "unknown request keys"),
        (message(images=["not bytes", "x"]), 400, "msgpack bin"),
        (message(prompts=["a"]), 400, "2 images and 1 prompts"),
        (message(images=[], prompts=[]), 400, "N >= 1"),
        (message(images=[b"garbage", b"garbage"]), 400, "image 0 is not a readable JPEG or PNG"),
        (message(images=[gif(), gif()]), 400, "not a readable JPEG or PNG"),
        (
            message(images=encode_images(images(1)) + encode_images(images(1, size=8))),
            400,
            "one size",
        ),
        (message(batch_id=[1]), 400, "batch_id"),
        (msgpack.packb({"images": msgpack.ExtType(5, b"x"), "prompts": []}), 400, "extension type"),
        (message(images=encode_images(images(5)), prompts=list("abcde")), 413, "at most 4"),
        (message(images=encode_images(images(2, size=65))), 413, "at most 4096 pixels"),
        (message(prompts=["a", "b" * 51]), 413, "51 chars"),
        (b"\x00" * 200_001, 413, "at most 200000"),
    ],
)
def test_malformed_requests_get_4xx(server, body, status, words):
    got, reply = post(server, body)
    assert got == status and words in reply["error"], reply


def test_pickles_are_refused_not_loaded(server, tmp_path):
    marker = tmp_path / "unpickled"
    for payload in (Touch(marker), {"images": [Touch(marker)], "prompts": ["a"]}):
        got, reply = post(server, pickle.dumps(payload))
        assert got == 400
    assert not marker.exists()


def test_404_411_and_reward_failures_leave_the_server_up(server):
    assert post(server, message(), path="/nope")[0] == 404
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("PUT", "/score", body=message())
    assert conn.getresponse().status == 405
    conn.close()
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/score")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Type", "application/msgpack")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()
    fn = server.reward_fn
    server.reward_fn = lambda images, prompts: 1 / 0
    try:
        got, reply = post(server, message())
    finally:
        server.reward_fn = fn
    assert got == 500 and "ZeroDivisionError" in reply["error"]
    for bad in (lambda i, p: (np.zeros(3), {}), lambda i, p: (np.zeros(2), {"x": object()})):
        server.reward_fn = bad  # wrong shape; info that msgpack cannot carry
        try:
            assert post(server, message())[0] == 500
        finally:
            server.reward_fn = fn
    assert health(server.url)["status"] == "ok"
    assert post(server, message())[0] == 200


def serve_cli(*args, env=None):
    cmd = [sys.executable, "-m", "rewards.serve", "--reward", "jpeg_compressibility", "--port", "0"]
    environ = {k: v for k, v in os.environ.items() if k != "DDPO_REWARD_TOKEN"} | (env or {})
    return subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ
    )


def test_cli_refuses_to_start_without_a_token():
    proc = serve_cli()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "no reward service token" in err


def test_cli_serves_on_loopback_with_a_token_file(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    proc = serve_cli("--token-file", str(tmp_path / "token"))
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving jpeg_compressibility on http://127.0.0.1:"), line
        url = line.split()[-1]
        rewards, _ = score_remote(url, images(2), ["a", "b"], TOKEN)
        np.testing.assert_allclose(
            rewards, make_reward("jpeg_compressibility")(images(2), ["a", "b"])[0]
        )
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_run_scores_its_reward_with_the_service(tmp_path, monkeypatch):
    """--reward-url NAME=URL: the run's reward actors score through the service (its reward
    answers 7 for every image), the token taken from $DDPO_REWARD_TOKEN."""
    import json

    from ddpo.config import SampleConfig, StatTrackerConfig, override
    from ddpo.presets import task_config
    from learner.driver import train
    from learner.wiring import InProcess

    calls = []

    def seven(images, prompts):
        calls.append(len(images))
        return np.full(len(images), 7.0, np.float32), {}

    service = make_server(seven, "jpeg_compressibility", TOKEN, Limits())
    threading.Thread(target=service.serve_forever, daemon=True).start()
    monkeypatch.setenv("DDPO_REWARD_TOKEN", TOKEN)
    config = override(
        task_config("compressibility", "tiny"),
        {
            "run": {"epochs": 1, "dir": tmp_path, "eval_every": 0},
            "system.reward_urls": (f"jpeg_compressibility={service.url}",),
            "sample": SampleConfig(num_steps=2, batch_size=4, num_batches_per_epoch=1),
            "stat_tracker": StatTrackerConfig(buffer_size=4, min_count=2),
            "train.batch_size": 4,
            "grid_prompts": 1,
            "grid_seeds": 2,
            "heldout_prompts": (),
        },
    )
    try:
        train(config, InProcess())
    finally:
        service.shutdown()
        service.server_close()
    samples = [json.loads(s) for s in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in samples] == [7.0] * 4
    assert sum(calls) == 4 + 2 + 2  # the epoch's 4 images, the start and end evaluations' 2
