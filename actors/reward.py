"""The reward worker: hosts one reward model (or a client of a remote reward service) and scores
batches of images.

A plain class; `learner.wiring` wraps it with `ray.remote`, with the options of
`learner.fleet.reward_actor_options`, when the fleet creates the actors. With
`max_concurrency > 1` (a threaded actor) calls that arrive while the model is busy are coalesced into one model call of up to `max_batch_images`, so
a GPU reward model sees large batches even when samplers send small ones.

A call that fails for this batch's result rather than through a bug (the reward service gave no
answer after its retries, or the reward returned the wrong number of rewards) answers NaN
rewards with `info["reward_error"]`: the driver drops and counts the batch and the run goes on.
Anything else (images of the wrong shape, an error in the reward's code) raises.

    worker = RewardWorker("aesthetic", {"clip_model": "tiny", "mlp_path": "tiny"})
    rewards, info = worker.score({"images": uint8 [N, H, W, 3], "prompts": [N], "batch_id": "0-3"})
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.metrics import ray_actor_metrics
from rewards import RewardFn, make_reward
from rewards.client import RewardUnavailable

log = logging.getLogger(__name__)


@dataclass
class _Request:
    images: np.ndarray  # uint8 [n, H, W, 3]
    prompts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[np.ndarray, dict] | None = None
    error: BaseException | None = None


class WrongRewardCount(ValueError):
    """The reward returned a number of rewards other than one per image."""


class RewardWorker:
    """Scores `{"images", "prompts", "batch_id"}` batches with one reward.

    name: a reward spec (`rewards.REWARDS`, or a weighted sum computed in this process);
    options: reward factory options ({"clip_model": ..., "mlp_path": ...}; `"tiny": True` for
    the tiny models); run: the run's name, the `run` tag of its metrics; url: score through a
    reward service (`python -m rewards.serve`) instead of a local model, with the token from
    `token_file` or $DDPO_REWARD_TOKEN and `remote_options` for `rewards.client.RemoteReward`
    (timeout, retries, backoff, max_backoff).
    """

    def __init__(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        run: str = "",
        url: str | None = None,
        token_file: str | None = None,
        max_batch_images: int = 64,
        threads: int | None = None,
        remote_options: dict[str, Any] | None = None,
    ):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.name = name
        self.fn: RewardFn
        if url:
            from rewards.client import RemoteReward
            from rewards.protocol import read_token

            token = read_token(token_file, required=False)
            self.fn = RemoteReward(url, token, **(remote_options or {}))
        else:
            options = dict(options or {})
            self.fn = make_reward(name, tiny=bool(options.pop("tiny", False)), **options)
        self.max_batch_images = max_batch_images
        self._pending: list[_Request] = []
        self._pending_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one model call at a time
        self._stats = {
            "calls": 0,
            "failed_calls": 0,  # answered NaN rewards with info["reward_error"]
            "model_calls": 0,
            "images": 0,
            "busy_seconds": 0.0,
        }
        self._started = time.monotonic()
        self.metrics = ray_actor_metrics(run)

    def score(self, batch: dict) -> tuple[np.ndarray, dict]:
        """batch: {"images": uint8 [N, H, W, 3], "prompts": [N], "batch_id"} -> (rewards [N], info).

        info holds one value per image (lists or [N] arrays), plus "batch_id"; or, when the reward
        failed for this batch, rewards all NaN and info {"reward_error": "why", "batch_id"}."""
        images, prompts = batch["images"], list(batch["prompts"])
        if (
            not isinstance(images, np.ndarray)
            or images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[-1] != 3
            or len(images) != len(prompts)
        ):
            raise ValueError(
                f"reward {self.name}: images must be uint8 [N, H, W, 3] with one prompt each, got "
                f"{_describe(images)} and {len(prompts)} prompts"
            )
        request = _Request(images, prompts)
        start = time.perf_counter()
        with self._pending_lock:
            self._pending.append(request)
            self._stats["calls"] += 1
            self._report_depth()
        while not request.done.is_set():
            with self._model_lock:
                if not request.done.is_set():
                    self._run(self._take())
        if self.metrics:
            self.metrics.reward_latency.observe(
                time.perf_counter() - start, tags={"reward": self.name}
            )
        if request.error is not None:
            raise request.error
        assert request.result is not None
        rewards, info = request.result
        return rewards, {**info, "batch_id": batch.get("batch_id")}

    def _take(self) -> list[_Request]:
        """The oldest pending requests of one image size, up to max_batch_images in all."""
        with self._pending_lock:
            taken = [self._pending.pop(0)]
            total = len(taken[0].images)
            while self._pending:
                nxt = self._pending[0]
                same_size = nxt.images.shape[1:] == taken[0].images.shape[1:]
                if not same_size or total + len(nxt.images) > self.max_batch_images:
                    break
                taken.append(self._pending.pop(0))
                total += len(nxt.images)
            self._report_depth()
            return taken

    def _report_depth(self) -> None:
        """The queue-depth gauge: requests waiting for the model, back to 0 once it took them
        all (with _pending_lock held)."""
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending), tags={"queue": f"reward_{self.name}"})

    def _run(self, requests: list[_Request]) -> None:
        start = time.monotonic()
        try:
            images = np.concatenate([r.images for r in requests])  # [sum n, H, W, 3]
            prompts = [p for r in requests for p in r.prompts]
            rewards, info = self.fn(images, prompts)
            rewards = np.asarray(rewards, dtype=np.float32)
            if rewards.shape != (len(prompts),):
                raise WrongRewardCount(
                    f"reward {self.name} returned shape {rewards.shape} for {len(prompts)} images"
                )
            offset = 0
            for r in requests:
                n = len(r.images)
                part = {k: _slice(v, offset, offset + n, len(prompts)) for k, v in info.items()}
                r.result = (rewards[offset : offset + n], part)
                offset += n
        except (RewardUnavailable, WrongRewardCount) as err:  # this batch's result, not a bug
            self._fail(requests, f"{type(err).__name__}: {err}")
        except Exception as err:  # every waiting caller sees the model's error
            for r in requests:
                r.error = err
        finally:
            self._stats["model_calls"] += 1
            self._stats["images"] += sum(len(r.images) for r in requests)
            self._stats["busy_seconds"] += time.monotonic() - start
            for r in requests:
                r.done.set()

    def _fail(self, requests: list[_Request], message: str) -> None:
        """Answer every request of a failed model call with NaN rewards and the reason."""
        message = " ".join(message.split())  # one line, for the driver's log
        log.warning("reward %s: NaN rewards for %d calls: %s", self.name, len(requests), message)
        for r in requests:
            r.result = (np.full(len(r.images), np.nan, np.float32), {"reward_error": message})
        self._stats["failed_calls"] += len(requests)

    def stats(self) -> dict[str, float]:
        """Counters for the metrics: calls, failed calls (answered NaN), model calls, images,
        busy seconds and fraction."""
        stats = dict(self._stats)
        stats["busy_fraction"] = stats["busy_seconds"] / max(time.monotonic() - self._started, 1e-9)
        return {f"reward/{self.name}/{k}": v for k, v in stats.items()}


def _describe(images: Any) -> str:
    if isinstance(images, np.ndarray):
        return f"{images.dtype} {list(images.shape)}"
    return type(images).__name__


def _slice(value: Any, start: int, stop: int, n: int) -> Any:
    """One request's share of a per-image info value; anything not of length n is shared."""
    try:
        if len(value) == n and not isinstance(value, str | bytes):
            return value[start:stop]
    except TypeError:
        pass
    return value
