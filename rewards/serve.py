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
            404, 411 (no Content-Length), 413 (too large), 415 (not msgpack), 500 (reward failed)
GET /health answers {"status": "ok", "reward": name} without a token. Nothing is ever unpickled:
msgpack carries maps, lists, strings, numbers and bytes only (extension types are refused).
The server binds 127.0.0.1 unless told otherwise and refuses to start without a token unless
given --insecure-no-token. Reward calls run one at a time; HTTP handling is threaded.
"""

from __future__ import annotations

import hmac
import io
import logging
import os
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from PIL import Image

log = logging.getLogger("rewards.serve")

TOKEN_ENV = "DDPO_REWARD_TOKEN"
CONTENT_TYPES = ("application/msgpack", "application/x-msgpack")
REQUEST_KEYS = {"images", "prompts", "batch_id"}


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


class RequestError(Exception):
    """A client error: the HTTP status and a message that says what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=refuse_ext)
    except Exception as err:
        raise RequestError(400, f"the body is not valid msgpack ({err})") from err
    if not isinstance(msg, dict) or not {"images", "prompts"} <= msg.keys():
        raise RequestError(
            400, 'the body must be a msgpack map {"images": [...], "prompts": [...]}'
        )
    if extra := set(msg) - REQUEST_KEYS:
        raise RequestError(
            400, f"unknown request keys {sorted(map(repr, extra))}; allowed {sorted(REQUEST_KEYS)}"
        )
    blobs, prompts, batch_id = msg["images"], msg["prompts"], msg.get("batch_id")
    if not isinstance(blobs, list) or not all(isinstance(b, bytes) for b in blobs):
        raise RequestError(400, "images must be a list of JPEG or PNG files as msgpack bin")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "prompts must be a list of strings")
    if not blobs or len(blobs) != len(prompts):
        raise RequestError(
            400, f"got {len(blobs)} images and {len(prompts)} prompts; send N >= 1 of each"
        )
    if len(blobs) > limits.max_images:
        raise RequestError(
            413, f"{len(blobs)} images; at most {limits.max_images} per request, split it"
        )
    if (longest := max(len(p) for p in prompts)) > limits.max_prompt_chars:
        raise RequestError(413, f"a prompt of {longest} chars; at most {limits.max_prompt_chars}")
    if batch_id is not None and not isinstance(batch_id, str | int):
        raise RequestError(400, "batch_id must be a string or an integer")
    return decode_images(blobs, limits), prompts, batch_id


def decode_images(blobs: list[bytes], limits: Limits) -> np.ndarray:
    """JPEG/PNG files -> uint8 [N, H, W, 3]; sizes are checked before any pixel is decoded."""
    arrays = []
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob), formats=["PNG", "JPEG"]) as image:
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise RequestError(
                        413,
                        f"image {i} is {width}x{height}; at most {limits.max_image_pixels} pixels",
                    )
                arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except RequestError:
            raise
        except Image.DecompressionBombError as err:
            raise RequestError(413, f"image {i}: {err}") from err
        except Exception as err:  # unidentified, truncated or corrupt files
            raise RequestError(400, f"image {i} is not a readable JPEG or PNG ({err})") from err
        if arrays[-1].shape != arrays[0].shape:
            raise RequestError(
                400,
                f"image {i} is {arrays[-1].shape[:2]} but image 0 is {arrays[0].shape[:2]}; "
                "send images of one size per request",
            )
    return np.stack(arrays)


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
class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, reward_fn, reward_name: str, token: str | None, limits: Limits):
        super().__init__(address, _Handler)
        self.reward_fn, self.reward_name = reward_fn, reward_name
        self.token, self.limits = token, limits
        self.reward_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "ddpo-reward/1"
    timeout = 60  # seconds a client may stall mid-request before its thread gives up

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok", "reward": self.server.reward_name})
        else:
            self._send(404, {"error": f"no {self.path}; use GET /health or POST /score"})

    def do_POST(self) -> None:
        try:
            if self.path != "/score":
                raise RequestError(404, f"no {self.path}; use POST /score")
            self._check_token()
            images, prompts, batch_id = parse_request(self._read_body(), self.server.limits)
        except RequestError as err:
            self._send(err.status, {"error": str(err)})
            return
        except Exception as err:  # a request we did not foresee is still the client's error
            log.exception("malformed request")
            self._send(400, {"error": f"malformed request ({type(err).__name__}: {err})"})
            return
        try:
            with self.server.reward_lock:
                rewards, info = self.server.reward_fn(images, prompts)
            rewards = np.asarray(rewards, np.float32)
            if rewards.shape != (len(prompts),):
                raise ValueError(f"rewards of shape {rewards.shape} for {len(prompts)} images")
            reply = {"rewards": to_plain(rewards), "info": to_plain(info), "batch_id": batch_id}
            body = msgpack.packb(reply, use_bin_type=True)
        except Exception as err:
            log.exception("reward %s failed", self.server.reward_name)
            self._send(500, {"error": f"the reward failed: {type(err).__name__}: {err}"})
            return
        self._send_bytes(200, body)

    def _not_allowed(self) -> None:
        self._send(405, {"error": f"{self.command} is not served; use GET /health or POST /score"})

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _check_token(self) -> None:
        if self.server.token is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.server.token.encode()
        ):
            self._discard_body(2**20)
            raise RequestError(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    def _read_body(self) -> bytes:
        if self.headers.get_content_type() not in CONTENT_TYPES:
            raise RequestError(415, f"Content-Type must be {CONTENT_TYPES[0]}")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "send a Content-Length header with the body")
        if int(length) > self.server.limits.max_body_bytes:
            self._discard_body(min(int(length), 16 * 2**20))
            raise RequestError(
                413,
                f"body of {length} bytes; at most {self.server.limits.max_body_bytes}, split it",
            )
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise RequestError(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _discard_body(self, cap: int) -> None:
        """Read (up to `cap` bytes of) an unwanted body so the client can read our answer."""
        length = self.headers.get("Content-Length", "")
        remaining = min(int(length), cap) if length.isdigit() else 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 2**16))
            if not chunk:
                break
            remaining -= len(chunk)

    def _send(self, status: int, payload: dict) -> None:
        self._send_bytes(status, msgpack.packb(payload, use_bin_type=True))

    def _send_bytes(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPES[0])
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


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
        limits = Limits(args.max_body_bytes, args.max_images, args.max_image_pixels)
        fn = make_reward(args.reward, tiny=args.tiny, **parse_reward_options(args.reward_model))
    except (ValueError, OSError, ImportError) as err:
        sys.exit(f"error: {err}")
    server = make_server(fn, args.reward, token, limits, args.host, args.port)
    print(f"serving {args.reward} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
