"""The reward service's wire format, shared by the server (`rewards.serve`), the client
(`rewards.client`) and reward actors: the bearer token, the size limits, and msgpack requests
and answers read by their schema (see `rewards.serve` for the protocol and what it guards
against). No HTTP server here: importing it costs msgpack, numpy and PIL only.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from PIL import Image

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
