r"""Serve a reward over HTTP with msgpack, for reward models hosted outside the Ray cluster.

    export DDPO_REWARD_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    python -m rewards.serve --reward aesthetic --port 8085 \
        --reward-model clip=openai/clip-vit-large-patch14 mlp=sac+logos+ava1-l14-linearMSE.pth
    curl -f http://127.0.0.1:8085/health        # 200 once the model is loaded (msgpack body)

and in Python `rewards.client.score_remote("http://127.0.0.1:8085", images, prompts, token)`, or a
reward actor with `RewardWorker("aesthetic", url="http://127.0.0.1:8085")`; the client retries
timeouts, lost connections and 5xx answers with backoff (see rewards/client.py).

Protocol: POST /score with `Authorization: Bearer <token>` and `Content-Type: application/msgpack`
  request   {"images": [JPEG or PNG bytes, ...], "prompts": [str, ...], "batch_id": str | int}
            (batch_id optional, echoed back)
  response  {"rewards": [float, ...], "info": {key: [one value per image]}, "batch_id": ...}
  error     {"error": "what was wrong and how to fix it"}, status 400 (malformed), 401 (token),
            404, 405 (method), 408 (too slow), 411 (no Content-Length), 413 (too large),
            415 (not msgpack), 500 (reward failed)
GET (or HEAD) /health answers {"status": "ok", "reward": name} without a token. Nothing is ever
unpickled: msgpack carries maps, lists, strings, numbers and bytes only (extension types are
refused). The server binds 127.0.0.1 unless told otherwise and refuses to start without a token
unless given --insecure-no-token.

Against a client that means harm (issue 13), with `Limits`:
- aiohttp on one event loop, so a slow or idle connection costs a socket, not a thread; parsing,
  decoding and the reward run on `max_active` worker threads, the reward one call at a time.
- Headers must arrive within `request_timeout` of connecting; the body within `request_timeout`
  of the server starting to read it (408 after).
- The token, Content-Type and Content-Length are checked before a byte of the body is read; an
  unwanted body is read and thrown away (for `request_timeout` at most), so the client gets the
  401 or 413 rather than a broken pipe.
- At most `max_active` requests are read, decoded and scored at once; the others wait unread.
  Memory beyond the model stays under about max_active x (3 x max_body_bytes + 3 x
  max_request_pixels) bytes.
- msgpack is read by the request's schema: the map and its two arrays are counted before their
  items are read, and any other array or map is refused, so no body builds millions of objects.
- Every image size is read from the file headers and checked before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from rewards.protocol import (  # noqa: F401  (encode_images, TOKEN_ENV: the service's API)
    CONTENT_TYPES,
    TOKEN_ENV,
    Limits,
    RequestError,
    encode_images,
    parse_request,
    read_token,
    to_plain,
)

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("rewards.serve")  # also when run as __main__

BACKLOG = 1024  # connections the kernel queues before accept (capped by net.core.somaxconn)


# ----- server -----
class RewardServer:
    """The reward service on a socket bound at construction (so a port in use fails at once).
    serve_forever() runs it on an asyncio loop in the calling thread; shutdown(), from another
    thread, stops it; server_close() closes the socket."""

    def __init__(self, address: tuple[str, int], reward_fn, reward_name: str, token, limits):
        self.reward_fn, self.reward_name = reward_fn, reward_name
        self.token, self.limits = token, limits
        try:
            self.socket = socket.create_server(address, backlog=BACKLOG)
        except (OSError, OverflowError) as err:
            reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else err
            raise OSError(
                f"cannot listen on {address[0]}:{address[1]} ({reason}); "
                "choose another --port (0: any free port) or --host"
            ) from None
        self.server_address = self.socket.getsockname()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._closing = False
        self._started, self._done = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stop serve_forever and wait for it to return."""
        self._closing = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._started.is_set():
            self._done.wait()

    def server_close(self) -> None:
        self.socket.close()

    async def _serve(self) -> None:
        from aiohttp import web

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._slots = asyncio.Semaphore(self.limits.max_active)
        self._reward_lock = asyncio.Lock()
        self._workers = ThreadPoolExecutor(self.limits.max_active, "reward-serve")
        handler = web.Server(
            self._handle,
            keepalive_timeout=self.limits.request_timeout,  # also the headers' deadline
            lingering_time=self.limits.request_timeout,  # unwanted bodies read and dropped
            auto_decompress=False,  # no Content-Encoding: a zip bomb stays a 415
            logger=_OneLineErrors(logging.getLogger("aiohttp.server"), {}),
        )
        server = await self._loop.create_server(handler, sock=self.socket, backlog=BACKLOG)
        self._started.set()
        try:
            if not self._closing:
                await self._stop.wait()
        finally:
            server.close()
            await handler.shutdown(timeout=1.0)
            self._workers.shutdown(wait=False, cancel_futures=True)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            if request.path == "/health":
                _allow(request, "GET", "HEAD")
                return _reply(200, {"status": "ok", "reward": self.reward_name})
            if request.path == "/score":
                _allow(request, "POST")
                return _reply(200, await self._score(request))
            raise RequestError(404, f"no {request.path}; use GET /health or POST /score")
        except RequestError as err:
            return _reply(err.status, {"error": str(err)}, err.headers)
        except ConnectionError as err:  # the client left: nobody to answer, nothing to trace
            log.info("%s left before its answer (%s)", request.remote, err)
            return _reply(400, {"error": "connection lost"})

    async def _score(self, request: web.BaseRequest) -> bytes:
        self._check_token(request)
        length = self._check_headers(request)
        async with self._slots:  # at most max_active requests in memory; the others wait unread
            if request.headers.get("Expect", "").lower() == "100-continue":  # e.g. curl's
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await self._read_body(request, length)
            try:
                images, prompts, batch_id = await self._run(parse_request, body, self.limits)
            except RequestError:
                raise
            except Exception as err:  # a request we did not foresee is still the client's error
                log.exception("malformed request")
                raise RequestError(400, f"malformed request ({type(err).__name__}: {err})") from err
            del body
            async with self._reward_lock:
                return await self._run(self._reward, images, prompts, batch_id)

    def _check_token(self, request: web.BaseRequest) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise RequestError(
                401,
                "missing or wrong token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    def _check_headers(self, request: web.BaseRequest) -> int:
        """The body's length, from headers alone: 415, 411 or 413 before a byte is read."""
        if request.content_type not in CONTENT_TYPES:
            raise RequestError(415, f"Content-Type must be {CONTENT_TYPES[0]}")
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise RequestError(415, "send the body without a Content-Encoding")
        length = request.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "send a Content-Length header with the body")
        if int(length) > self.limits.max_body_bytes:
            raise RequestError(
                413, f"body of {length} bytes; at most {self.limits.max_body_bytes}, split it"
            )
        return int(length)

    async def _read_body(self, request: web.BaseRequest, length: int) -> bytes:
        chunks, got = [], 0
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                while got < length and (chunk := await request.content.readany()):
                    chunks.append(chunk)
                    got += len(chunk)
        except TimeoutError:
            raise RequestError(
                408,
                f"the body did not arrive within {self.limits.request_timeout:g} s "
                f"({got} of {length} bytes)",
            ) from None
        if got != length:
            raise RequestError(400, f"body ended after {got} of {length} bytes")
        return b"".join(chunks)

    def _reward(self, images: np.ndarray, prompts: list[str], batch_id: Any) -> bytes:
        """The reply to a parsed request (on a worker thread, under the reward lock)."""
        try:
            rewards, info = self.reward_fn(images, prompts)
            rewards = np.asarray(rewards, np.float32)
            if rewards.shape != (len(prompts),):
                raise ValueError(f"rewards of shape {rewards.shape} for {len(prompts)} images")
            reply = {"rewards": to_plain(rewards), "info": to_plain(info), "batch_id": batch_id}
            return msgpack.packb(reply, use_bin_type=True)
        except Exception as err:
            log.exception("reward %s failed", self.reward_name)
            raise RequestError(500, f"the reward failed: {type(err).__name__}: {err}") from None

    async def _run(self, fn, *args):
        assert self._loop is not None
        return await self._loop.run_in_executor(self._workers, fn, *args)


def _allow(request: web.BaseRequest, *methods: str) -> None:
    if request.method not in methods:
        raise RequestError(
            405,
            f"{request.method} {request.path} is not served; use GET /health or POST /score",
            {"Allow": ", ".join(methods)},
        )


def _reply(status: int, body: dict | bytes, headers: dict[str, str] | None = None) -> web.Response:
    from aiohttp import web

    if isinstance(body, dict):
        body = msgpack.packb(body, use_bin_type=True)
    return web.Response(status=status, body=body, content_type=CONTENT_TYPES[0], headers=headers)


class _OneLineErrors(logging.LoggerAdapter):
    """aiohttp's server log, with a client's protocol errors (a bad request line, a header too
    long) on one line: they are the client's mistakes, not the server's."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        self.warning(f"{msg}: %s", *args, " ".join(str(error).split()), **kwargs)


def make_server(
    reward_fn,
    reward_name: str,
    token: str | None,
    limits: Limits = Limits(),
    host: str = "127.0.0.1",
    port: int = 0,
) -> RewardServer:
    """A server for `reward_fn` on (host, port) (port 0: a free one); call .serve_forever()."""
    return RewardServer((host, port), reward_fn, reward_name, token, limits)


# ----- CLI -----
@dataclass(frozen=True)
class ServeArgs:
    """Serve a DDPO reward over HTTP (msgpack, bearer token)."""

    reward: str
    """Reward spec, e.g. aesthetic, alignment or aesthetic+0.5*alignment (see rewards.REWARDS)."""
    port: int = 8085
    """TCP port (0: any free port; the chosen URL is printed)."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default. Anything else exposes the service to the network."""
    token_file: Path | None = None
    """File holding the bearer token (default: $DDPO_REWARD_TOKEN)."""
    insecure_no_token: bool = False
    """Serve without a token (only for a trusted loopback setup)."""
    reward_model: tuple[str, ...] = ()
    """Reward options KEY=VALUE: clip=, mlp=, llava=, bertscore=, device=, batch_size=, ..."""
    tiny: bool = False
    """Use the tiny test models for whatever --reward-model leaves unset."""
    max_body_bytes: int = Limits.max_body_bytes
    max_images: int = Limits.max_images
    max_image_pixels: int = Limits.max_image_pixels
    max_request_pixels: int = Limits.max_request_pixels
    request_timeout: float = Limits.request_timeout


def main(argv: list[str] | None = None) -> None:
    import tyro

    from rewards import make_reward, parse_reward_options

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = tyro.cli(ServeArgs, args=argv)
    try:
        token = None if args.insecure_no_token else read_token(args.token_file, required=True)
        if token is None:
            log.warning(
                "serving WITHOUT a token (--insecure-no-token): anyone who reaches it may score"
            )
        limits = Limits(
            max_body_bytes=args.max_body_bytes,
            max_images=args.max_images,
            max_image_pixels=args.max_image_pixels,
            max_request_pixels=args.max_request_pixels,
            request_timeout=args.request_timeout,
        )
        # bind before loading the model: a port in use fails in a second, not after minutes
        server = make_server(None, args.reward, token, limits, args.host, args.port)
        server.reward_fn = make_reward(
            args.reward, tiny=args.tiny, **parse_reward_options(args.reward_model)
        )
    except (ValueError, OSError, ImportError) as err:
        sys.exit(f"error: {err}")
    print(f"serving {args.reward} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
