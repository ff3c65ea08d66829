"""The client of a reward service (`python -m rewards.serve`): score images over HTTP, retrying
what may get better and failing at once on what will not.

    rewards, info = score_remote("http://127.0.0.1:8085", images, prompts, token)
    fn = RemoteReward("http://127.0.0.1:8085", token)      # a reward function, requests split
    rewards, info = fn(images, prompts)

A timeout, a refused or reset connection, a 408 (the request arrived too slowly) and a 5xx
answer are retried with exponential backoff; after the last attempt `RewardUnavailable` says
which service, how many attempts and the last error. Any other 4xx answer (wrong token,
malformed or oversized request) raises `RewardServiceError` at once: sending the same request
again would get the same answer.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np

from rewards.protocol import CONTENT_TYPES, Limits, encode_images, refuse_ext

log = logging.getLogger(__name__)

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy


class RewardServiceError(RuntimeError):
    """The service answered with an error status; `.status` holds it."""

    def __init__(self, status: int, message: str, url: str = ""):
        where = f" {url}" if url else ""
        super().__init__(f"reward service{where} answered {status}: {message}")
        self.status = status


class RewardUnavailable(RuntimeError):
    """No answer from the reward service after every attempt: down, overloaded or too slow.
    About this request, not a bug: a reward worker answers NaN rewards and the batch is dropped."""


def _post(url: str, body: bytes, token: str | None, timeout: float) -> dict:
    """One POST; RewardServiceError for an error status, OSError/HTTPException if no answer."""
    headers = {"Content-Type": CONTENT_TYPES[0]}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout) as response:
            return msgpack.unpackb(response.read(), raw=False, ext_hook=refuse_ext)
    except urllib.error.HTTPError as err:
        try:
            message = msgpack.unpackb(err.read(), raw=False, ext_hook=refuse_ext)["error"]
        except Exception:
            message = err.reason
        raise RewardServiceError(err.code, str(message), url) from None


def _post_with_retries(
    url: str,
    body: bytes,
    token: str | None,
    timeout: float,
    retries: int,
    backoff: float,
    max_backoff: float,
) -> dict:
    """`_post`, attempted up to retries + 1 times; waits backoff, 2 backoff, ... (at most
    max_backoff) between attempts. 4xx raises at once, the rest RewardUnavailable at the end."""
    attempts, attempt = retries + 1, 1
    while True:
        try:
            return _post(url, body, token, timeout)
        except RewardServiceError as err:
            if err.status < 500 and err.status != 408:  # the request is wrong: it stays wrong
                raise
            error: Exception = err
        # OSError: refused, reset, timed out (TimeoutError, URLError); HTTPException: a cut reply
        except (OSError, http.client.HTTPException) as err:
            error = err
        reason = f"{type(error).__name__}: {error}".replace("\n", " ")
        if attempt == attempts:
            raise RewardUnavailable(
                f"reward service {url} failed {attempts} attempts (timeout {timeout:g} s each); "
                f"last error {reason}"
            ) from error
        wait = min(backoff * 2 ** (attempt - 1), max_backoff)
        log.warning(
            "reward service %s, attempt %d/%d failed (%s); retrying in %.2g s",
            url,
            attempt,
            attempts,
            reason,
            wait,
        )
        time.sleep(wait)
        attempt += 1


def score_remote(
    url: str,
    images: np.ndarray,
    prompts: list[str],
    token: str | None = None,
    image_format: str = "PNG",
    timeout: float = 120.0,
    batch_id: str | int | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
) -> tuple[np.ndarray, dict]:
    """Score uint8 [N, H, W, 3] images on a reward service: (rewards float32 [N], info).
    PNG is lossless, so a remote reward sees the same pixels as a local one. `timeout` bounds
    each wait of one attempt (connecting, then the reply); see `RemoteReward` for the rest."""
    message = {"images": encode_images(images, image_format), "prompts": list(prompts)}
    if batch_id is not None:
        message["batch_id"] = batch_id
    reply = _post_with_retries(
        url.rstrip("/") + "/score",
        msgpack.packb(message, use_bin_type=True),
        token,
        timeout,
        retries,
        backoff,
        max_backoff,
    )
    info = {
        k: np.asarray(v) if v and all(isinstance(x, int | float) for x in v) else v
        for k, v in reply["info"].items()
    }
    return np.asarray(reply["rewards"], np.float32), info


def health(url: str, timeout: float = 10.0) -> dict:
    """GET /health -> {"status": "ok", "reward": name}."""
    with _opener.open(url.rstrip("/") + "/health", timeout=timeout) as response:
        return msgpack.unpackb(response.read(), raw=False, ext_hook=refuse_ext)


class RemoteReward:
    """A reward function backed by a reward service; requests of at most `max_images` images
    and `max_pixels` pixels each (the service's --max-images and --max-request-pixels).

    timeout: seconds one attempt may wait to connect or for the reply. The service scores one
    request at a time, so a reply may wait behind other workers' requests: leave room for them
    (LLaVA scores 64 images in tens of seconds). retries: attempts after the first, on a
    timeout, a connection error, a 408 or a 5xx answer; backoff: seconds before the first retry,
    doubled before each next one up to max_backoff.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        max_images: int = Limits.max_images,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        max_pixels: int = Limits.max_request_pixels,
    ):
        if timeout <= 0 or retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                f"timeout={timeout}, retries={retries}, backoff={backoff}, "
                f"max_backoff={max_backoff}: use timeout > 0 and the others >= 0"
            )
        self.url, self.token = url, token
        self.max_images, self.max_pixels = max_images, max_pixels
        self.timeout, self.retries = timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff

    def __call__(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]:
        from rewards import concat_infos

        n = max(1, min(self.max_images, self.max_pixels // (images.shape[1] * images.shape[2])))
        parts = [
            score_remote(
                self.url,
                images[i : i + n],
                prompts[i : i + n],
                self.token,
                timeout=self.timeout,
                retries=self.retries,
                backoff=self.backoff,
                max_backoff=self.max_backoff,
            )
            for i in range(0, len(images), n)
        ]
        return np.concatenate([r for r, _ in parts]), concat_infos([info for _, info in parts])
