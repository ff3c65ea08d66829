"""RewardWorker: scoring, coalescing concurrent calls into one model call, errors, Ray options."""

import threading
import time

import numpy as np
import pytest

from actors.reward import RewardWorker
from learner.fleet import local_role_resources, reward_actor_options
from rewards.jpeg import jpeg_size_kb


def batch(n: int, seed: int = 0, size: int = 16) -> dict:
    images = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return {"images": images, "prompts": [f"p{seed}-{i}" for i in range(n)], "batch_id": f"b{seed}"}


class RecordingReward:
    """Reward = the image mean; records each model call's size; the first call waits until
    `wait_for` more requests are queued, so that they must be coalesced."""

    def __init__(self, worker: RewardWorker, wait_for: int = 0):
        self.worker, self.wait_for, self.calls = worker, wait_for, []

    def __call__(self, images, prompts):
        if not self.calls:
            deadline = time.monotonic() + 10
            while len(self.worker._pending) < self.wait_for and time.monotonic() < deadline:
                time.sleep(0.01)
        self.calls.append(len(images))
        return images.mean(axis=(1, 2, 3)), {"prompt": list(prompts)}


def test_score_jpeg_reward_with_info():
    worker = RewardWorker("jpeg_compressibility")
    b = batch(3)
    rewards, info = worker.score(b)
    np.testing.assert_allclose(rewards, -jpeg_size_kb(b["images"]))
    np.testing.assert_allclose(info["jpeg_kb"], jpeg_size_kb(b["images"]))
    assert rewards.dtype == np.float32 and info["batch_id"] == "b0"


def test_concurrent_calls_are_coalesced():
    worker = RewardWorker("jpeg_compressibility", max_batch_images=8)
    worker.fn = fake = RecordingReward(worker, wait_for=3)
    batches = [batch(2, seed=s) for s in range(4)]
    results = [None] * 4

    def call(i):
        results[i] = worker.score(batches[i])

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    while not fake.calls and not worker._model_lock.locked():
        time.sleep(0.005)
    threads += [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert fake.calls == [2, 6]  # the first call alone, the three that queued behind it together
    for b, (rewards, info) in zip(batches, results, strict=True):
        np.testing.assert_allclose(rewards, b["images"].mean(axis=(1, 2, 3)), rtol=1e-6)
        assert info["prompt"] == b["prompts"] and info["batch_id"] == b["batch_id"]
    stats = worker.stats()
    assert stats["reward/jpeg_compressibility/model_calls"] == 2
    assert stats["reward/jpeg_compressibility/images"] == 8


def test_take_respects_the_cap_and_image_size():
    worker = RewardWorker("jpeg_compressibility", max_batch_images=4)
    worker.fn = fake = RecordingReward(worker)
    for b in (batch(3, 0), batch(2, 1), batch(1, 2, size=8), batch(1, 3, size=8)):
        worker._pending.append(worker_request(b))
    sizes = []
    while worker._pending:
        sizes.append([len(r.images) for r in worker._take()])
    assert sizes == [[3], [2], [1, 1]]  # 3+2 > 4; 8x8 images never join 16x16 ones
    assert fake.calls == []


def worker_request(b):
    from actors.reward import _Request

    return _Request(b["images"], b["prompts"])


def test_errors_reach_the_caller():
    worker = RewardWorker("jpeg_compressibility")
    images = batch(3)["images"]
    with pytest.raises(ValueError, match=r"one prompt each, got uint8 \[3, 16, 16, 3\] and 1"):
        worker.score({"images": images, "prompts": ["a"], "batch_id": 0})
    for bad in (images.astype(np.float32), images[..., :1], images[0]):  # dtype, channels, ndim
        with pytest.raises(ValueError, match="must be uint8 \\[N, H, W, 3\\]"):
            worker.score({"images": bad, "prompts": ["a", "b", "c"], "batch_id": 0})
    worker.fn = lambda images, prompts: 1 / 0
    with pytest.raises(ZeroDivisionError):
        worker.score(batch(1))
    assert worker._pending == []  # nothing left queued after errors
    assert worker.stats()["reward/jpeg_compressibility/failed_calls"] == 0  # bugs raise


def test_a_wrong_count_answers_nan_to_every_coalesced_call():
    worker = RewardWorker("jpeg_compressibility", max_batch_images=8)
    fake = RecordingReward(worker, wait_for=2)
    worker.fn = lambda images, prompts: (fake(images, prompts)[0][:-1], {})  # one reward short
    results = [None] * 3

    def call(i):
        results[i] = worker.score(batch(2, seed=i))

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    while not fake.calls and not worker._model_lock.locked():
        time.sleep(0.005)
    threads += [threading.Thread(target=call, args=(i,)) for i in (1, 2)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert fake.calls == [2, 4]  # the first call alone, the two that queued behind it together
    for i, (rewards, info) in enumerate(results):
        assert rewards.shape == (2,) and np.isnan(rewards).all()
        assert "returned shape" in info["reward_error"] and info["batch_id"] == f"b{i}"
    assert worker.stats()["reward/jpeg_compressibility/failed_calls"] == 3


def test_actor_options():
    restarts = {"max_restarts": 3, "max_task_retries": 3}  # a lost score call is sent again
    cpu = reward_actor_options("aesthetic")
    assert cpu == {
        "num_cpus": 1,
        "max_concurrency": 4,
        "resources": {"reward_aesthetic": 0.001},
        **restarts,
    }
    gpu = reward_actor_options("alignment", gpu=True, role_resource=False)
    assert gpu == {"num_cpus": 1, "max_concurrency": 4, "num_gpus": 1.0, **restarts}
    assert local_role_resources("aesthetic+0.5*alignment") == {
        "reward_aesthetic": 1.0,
        "reward_alignment": 1.0,
    }


def test_ray_actor_reads_images_by_ref():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=1,
            resources=local_role_resources("jpeg_compressibility"),
            include_dashboard=False,
        )
    try:
        # A Ray instance started elsewhere lacks the role resource: leave it out there.
        options = reward_actor_options("jpeg_compressibility", role_resource=started)
        actor = ray.remote(RewardWorker).options(**options).remote("jpeg_compressibility")
        b = batch(2)
        rewards, info = ray.get(actor.score.remote(ray.put(b)))
        np.testing.assert_allclose(rewards, -jpeg_size_kb(b["images"]))
        assert info["batch_id"] == "b0"
    finally:
        if started:
            ray.shutdown()
