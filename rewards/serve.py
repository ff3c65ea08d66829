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
import io
import logging
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("rewards.serve")

TOKEN_ENV = "DDPO_REWARD_TOKEN"
CONTENT_TYPES = ("application/msgpack", "application/x-msgpack")
REQUEST_KEYS = {"images", "prompts", "batch_id"}
BACKLOG = 1024  # connections the kernel queues before accept (capped by net.core.somaxconn)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 2**20
    """Largest request body accepted (413 above)."""
    max_images: int = 64
    """Most images in one request (413 above)."""
    max_image_pixels: int = 1024 * 1024
    """Most pixels (width x height) of one image, checked before it is decoded (413 above)."""
    max_prompt_chars: int = 2000
    """Longest prompt accepted (413 above)."""
    max_request_pixels: int = 64 * 512 * 512
    """Most pixels of all images of one request together, checked before any is decoded (413
    above): 64 images of 512x512, 48 MiB decoded."""
    max_active: int = 2
    """Requests read, decoded and scored at once (one is read while another is scored); the
    others wait their turn unread. Bounds the memory: see the module docstring."""
    request_timeout: float = 60.0
    """Seconds a client has to send its headers (from connecting) and again its body (from when
    the server starts reading it); 408 or a closed connection after."""

    def __post_init__(self) -> None:
        if bad := {k: v for k, v in asdict(self).items() if not v > 0}:
            raise ValueError(f"reward service limits {bad}: each must be > 0")


class RequestError(Exception):
    """A client error: the HTTP status, a message that says what to fix, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def read_token(token_file: str | Path | None = None, required: bool = True) -> str | None:
    """The bearer token from `token_file`, else from $DDPO_REWARD_TOKEN."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty; write the token into it")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token and required:
        raise ValueError(
            f"no reward service token: set ${TOKEN_ENV} or pass a token file "
            f"(e.g. {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))'))"
        )
    return token or None


# ----- messages -----
def encode_images(images: np.ndarray, image_format: str = "PNG", quality: int = 95) -> list[bytes]:
    """uint8 [N, H, W, 3] -> one PNG (lossless) or JPEG file each."""
    if image_format not in ("PNG", "JPEG"):
        raise ValueError(f"image_format={image_format!r}: use PNG or JPEG")
    out = []
    for image in images:
        buffer = io.BytesIO()
        kwargs = {"quality": quality} if image_format == "JPEG" else {}
        Image.fromarray(image).save(buffer, format=image_format, **kwargs)
        out.append(buffer.getvalue())
    return out


def refuse_ext(code: int, data: bytes) -> None:
    """msgpack `ext_hook`: extension types are refused, so only plain values ever travel."""
    raise ValueError(f"msgpack extension type {code} is not accepted")


def parse_request(body: bytes, limits: Limits) -> tuple[np.ndarray, list[str], Any]:
    """A request body -> (images uint8 [N, H, W, 3], prompts, batch_id); RequestError if bad."""
    blobs, prompts, batch_id = read_request(body, limits)
    return decode_images(blobs, limits), prompts, batch_id


_MAP = 'a msgpack map {"images": [JPEG or PNG bytes, ...], "prompts": [str, ...]}'
_IMAGES = "images must be a list of JPEG or PNG files as msgpack bin"
_PROMPTS = "prompts must be a list of strings"


def read_request(body: bytes, limits: Limits) -> tuple[list[bytes], list[str], Any]:
    """A request body -> (image files, prompts, batch_id), read by the schema rather than
    unpacked whole: the map and its two arrays are counted before their items are read, and
    every other value must be plain (an array or map inside one exceeds the msgpack limits of 0),
    so memory stays within a few times len(body) whatever the body holds."""
    unpacker = msgpack.Unpacker(
        io.BytesIO(body),
        raw=False,
        strict_map_key=False,  # keys are checked below, with a message
        ext_hook=refuse_ext,
        max_buffer_size=max(limits.max_body_bytes, 2**16),
        max_bin_len=limits.max_body_bytes,
        max_str_len=limits.max_body_bytes,
        max_array_len=0,
        max_map_len=0,
    )
    try:
        n_keys = unpacker.read_map_header()
    except ValueError:  # something else than a map: say whether it is msgpack at all
        try:
            unpacker.skip()
        except Exception as err:
            raise RequestError(400, f"the body is not valid msgpack ({err})") from None
        raise RequestError(400, f"the body must be {_MAP}") from None
    except Exception as err:
        raise RequestError(400, f"the body is not valid msgpack ({err})") from None
    if n_keys > 8:  # room to name a few unknown keys
        raise RequestError(400, f"a map of {n_keys} keys; the body must be {_MAP}")
    msg: dict[str, Any] = {}
    unknown = []
    for _ in range(n_keys):
        key = _plain(unpacker, "msgpack map keys must be strings", (str, bytes))
        if key == "images":
            msg[key] = _array(unpacker, "images", bytes, _IMAGES, limits)
        elif key == "prompts":
            msg[key] = _array(unpacker, "prompts", str, _PROMPTS, limits)
        elif key == "batch_id":
            msg[key] = _plain(unpacker, "batch_id must be a string or an integer", str | int | None)
        else:
            unknown.append(repr(key))
            try:
                unpacker.skip()  # walks the value, builds nothing
            except Exception as err:
                raise RequestError(
                    400, f"the value of {key!r} is not valid msgpack ({err})"
                ) from None
    if unknown:
        raise RequestError(
            400, f"unknown request keys {sorted(unknown)}; allowed {sorted(REQUEST_KEYS)}"
        )
    if not {"images", "prompts"} <= msg.keys():
        raise RequestError(400, f"the body must be {_MAP}")
    if unpacker.tell() != len(body):
        raise RequestError(400, f"{len(body) - unpacker.tell()} bytes after the request map")
    blobs, prompts = msg["images"], msg["prompts"]
    if not blobs or len(blobs) != len(prompts):
        raise RequestError(
            400, f"got {len(blobs)} images and {len(prompts)} prompts; send N >= 1 of each"
        )
    if (longest := max(len(p) for p in prompts)) > limits.max_prompt_chars:
        raise RequestError(413, f"a prompt of {longest} chars; at most {limits.max_prompt_chars}")
    return blobs, prompts, msg.get("batch_id")


def _plain(unpacker: msgpack.Unpacker, what: str, kinds: Any) -> Any:
    """The next value, which must be of `kinds`; never an array or a map (limits of 0)."""
    try:
        value = unpacker.unpack()
    except msgpack.OutOfData:
        raise RequestError(400, f"the body ends early ({what})") from None
    except Exception as err:  # a nested array or map, an extension type, a bad byte
        raise RequestError(400, f"{what} ({err})") from None
    if not isinstance(value, kinds):
        raise RequestError(400, what)
    return value


def _array(unpacker: msgpack.Unpacker, name: str, kind: type, what: str, limits: Limits) -> list:
    """A request array: its length checked against max_images before an item is read."""
    try:
        n = unpacker.read_array_header()
    except ValueError:
        _plain(unpacker, what, ())  # not an array: raises, with msgpack's reason if it has one
        raise
    except msgpack.OutOfData:
        raise RequestError(400, f"the body ends early ({what})") from None
    if n > limits.max_images:
        raise RequestError(413, f"{n} {name}; at most {limits.max_images} per request, split it")
    return [_plain(unpacker, what, kind) for _ in range(n)]


def decode_images(blobs: list[bytes], limits: Limits) -> np.ndarray:
    """JPEG/PNG files -> uint8 [N, H, W, 3]. Every size is read from the file headers and
    checked (per image, one size for all, the request's pixel budget) before any pixel is
    decoded; the pixels go straight into the one output array."""
    images: list[Image.Image] = []
    try:
        for i, blob in enumerate(blobs):
            images.append(_open_image(i, blob))
            width, height = images[i].size
            if width * height > limits.max_image_pixels:
                raise RequestError(
                    413, f"image {i} is {width}x{height}; at most {limits.max_image_pixels} pixels"
                )
            if images[i].size != images[0].size:
                raise RequestError(
                    400,
                    f"image {i} is {width}x{height} but image 0 is "
                    f"{'x'.join(map(str, images[0].size))}; send images of one size per request",
                )
        width, height = images[0].size
        if len(images) * width * height > limits.max_request_pixels:
            raise RequestError(
                413,
                f"{len(images)} images of {width}x{height} are {len(images) * width * height} "
                f"pixels; at most {limits.max_request_pixels} per request, send fewer "
                "(RemoteReward(max_pixels=...))",
            )
        out = np.empty((len(images), height, width, 3), np.uint8)  # [N, H, W, 3]
        for i, image in enumerate(images):
            try:
                out[i] = np.asarray(image.convert("RGB"))
                image.close()  # at once: a decoded image keeps its pixels until closed
            except Exception as err:  # truncated or corrupt past the header
                raise RequestError(
                    400, f"image {i} is not a readable JPEG or PNG ({err})"
                ) from None
        return out
    finally:
        for image in images:
            image.close()


def _open_image(i: int, blob: bytes) -> Image.Image:
    """The image's header only (PIL reads pixels lazily); RequestError if it is not JPEG/PNG."""
    try:
        return Image.open(io.BytesIO(blob), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"image {i}: {err}") from None
    except Exception as err:  # unidentified or truncated files
        raise RequestError(400, f"image {i} is not a readable JPEG or PNG ({err})") from None


def to_plain(value: Any) -> Any:
    """numpy values -> msgpack-able Python values (lists, floats, ints, strings)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


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
