"""Multimodal helpers: image loading with limits, image preprocessing (square/pad/anyres), prompt tokenization."""

from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import io
import ipaddress
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

__all__ = [
    "ASPECT_RATIOS",
    "ImageLimits",
    "ImageLoadError",
    "KeywordsStoppingCriteria",
    "divide_to_patches",
    "expand2square",
    "get_anyres_image_grid_shape",
    "get_model_name_from_path",
    "load_image",
    "load_image_from_base64",
    "load_images",
    "parse_grid_pinpoints",
    "process_anyres_image",
    "process_images",
    "resize_and_pad_image",
    "select_best_resolution",
    "tokenizer_image_token",
]

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_DOWNLOAD_TIMEOUT = 10.0
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000  # all images of one server request, counted from their headers
DEFAULT_MAX_ASPECT_RATIO = 20.0  # long side / short side
DEFAULT_MAX_IMAGE_SIDE = 2048  # servers shrink larger images (aspect kept) right after decoding, before any padding
MAX_REDIRECTS = 5
LARGE_DECODE_PIXELS = 4_000_000  # decodes above this many pixels take one of _DECODE_SLOTS (bounds peak memory)
_DECODE_SLOTS = threading.BoundedSemaphore(2)

# `model_cfg.image_aspect_ratio` values process_images understands; None means "square".
ASPECT_RATIOS = (None, "square", "resize", "pad", "anyres")

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_DATA_URL_RE = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<payload>.*)$", re.DOTALL)
_GRID_RE = re.compile(r"\((\d+)\s*x\s*(\d+)\)")


# ---------------------------------------------------------------------------------------------------------------------
# Image loading
# ---------------------------------------------------------------------------------------------------------------------


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the (shortened) source and the cause."""


def _describe(source: str, limit: int = 80) -> str:
    """Short, printable form of an image source for error messages (base64 payloads can be megabytes)."""
    text = str(source)
    if len(text) <= limit:
        return f"`{text}`"
    return f"`{text[: limit - 3]}...` ({len(text)} chars)"


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What a server accepts as images from a request; the flags are added by `server_utils.add_image_limit_args`.

    Every image is checked from its header before its pixels are decoded: width*height <= `max_pixels`, long side
    / short side <= `max_aspect_ratio`, and the images of one request together <= `max_request_pixels`. Decoded
    images larger than `max_side` are shrunk (aspect kept; JPEG decodes at a reduced scale directly). http(s) URLs
    are fetched only with `allow_urls`, and never from loopback, private, link-local, multicast, reserved or
    unspecified addresses unless `url_allow` names the host or a network (CIDR) holding the address.
    """

    max_images: int = 8
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    max_side: int = DEFAULT_MAX_IMAGE_SIDE
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT
    allow_urls: bool = False
    url_allow: tuple[str, ...] = ()

    def __post_init__(self):
        for entry in self.url_allow:
            _allow_entry(entry)  # fail at start-up on a malformed entry


def _allow_entry(entry: str):
    text = entry.strip().lower()
    if not text:
        raise ValueError("--image-url-allow: empty entry; give a host name, an address or a CIDR network.")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        if not re.fullmatch(r"[a-z0-9.\-]+", text):
            raise ValueError(f"--image-url-allow `{entry}` is neither a host name nor an address/CIDR.") from None
        return text


_REFUSED_KINDS = (
    ("loopback", "is_loopback"),
    ("link-local", "is_link_local"),
    ("multicast", "is_multicast"),
    ("unspecified", "is_unspecified"),
    ("reserved", "is_reserved"),
    ("private", "is_private"),
)


def _refused_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str, url_allow: Sequence[str]) -> str:
    """Why `ip` (the address `host` resolved to) must not be fetched from; "" when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for entry in map(_allow_entry, url_allow):
        if entry == host.lower() or (not isinstance(entry, str) and ip.version == entry.version and ip in entry):
            return ""
    for kind, attribute in _REFUSED_KINDS:
        if getattr(ip, attribute):
            return kind
    return "" if ip.is_global else "non-public"


def _fetch_failed(url: str) -> ImageLoadError:
    # One message for every way a fetch can fail, so that errors cannot be used to map ports or read replies.
    return ImageLoadError(
        f"Image URL {_describe(url)} could not be fetched as an image (no answer, an HTTP error, a redirect loop, "
        "too large or too slow); check the URL or send the image as a data: URL."
    )


def _guarded_download(url: str, limits: ImageLimits) -> bytes:
    """GET `url` for a server: addresses checked after DNS and after every redirect, connecting to the checked
    address itself (no second lookup), redirects followed here (at most MAX_REDIRECTS), size and time bounded."""
    import urllib3

    if not limits.allow_urls:
        raise ImageLoadError(
            f"Image {_describe(url)}: remote image URLs are disabled on this server; send the image as a data: URL "
            "or base64 (the operator can enable URLs with --allow-image-urls)."
        )
    deadline = time.monotonic() + limits.timeout
    current = url
    for hop in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(current)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            if hop == 0:
                raise ImageLoadError(f"Image URL {_describe(url)} must be an http(s) URL with a host.")
            raise _fetch_failed(url)
        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            if hop == 0:
                raise ImageLoadError(f"Image URL {_describe(url)}: the host `{host}` could not be resolved.") from exc
            raise _fetch_failed(url) from exc
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        for address in addresses:
            kind = _refused_kind(address, host, limits.url_allow)
            if kind:
                where = f"resolves to the {kind} address {address}" if hop == 0 else f"redirects to a {kind} address"
                raise ImageLoadError(
                    f"Image URL {_describe(url)} {where}; this server does not fetch from {kind} addresses "
                    "(an operator can allow a host or network with --image-url-allow)."
                )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _fetch_failed(url)
        target = str(addresses[0])
        timeout = urllib3.Timeout(connect=remaining, read=remaining)
        if parts.scheme == "https":
            import certifi

            pool = urllib3.HTTPSConnectionPool(
                target,
                port,
                timeout=timeout,
                retries=False,
                server_hostname=host,
                assert_hostname=host,
                cert_reqs="CERT_REQUIRED",
                ca_certs=certifi.where(),
            )
        else:
            pool = urllib3.HTTPConnectionPool(target, port, timeout=timeout, retries=False)
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        host_header = parts.netloc.rsplit("@", 1)[-1]
        try:
            response = pool.urlopen(
                "GET",
                path,
                headers={"Host": host_header, "Accept": "image/*", "User-Agent": "llava-image-fetch"},
                redirect=False,
                retries=False,
                preload_content=False,
            )
            try:
                if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                    current = urllib.parse.urljoin(current, response.headers["Location"])
                    continue
                if response.status != 200:
                    raise _fetch_failed(url)
                chunks, total = [], 0
                while chunk := response.read1(64 * 1024):
                    total += len(chunk)
                    if total > limits.max_bytes or time.monotonic() > deadline:
                        raise _fetch_failed(url)
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise _fetch_failed(url) from exc
        finally:
            pool.close()
    raise _fetch_failed(url)


class _Budget:
    """Pixels left for the rest of one request's images."""

    def __init__(self, limits: ImageLimits):
        self.limits, self.used = limits, 0

    def charge(self, pixels: int) -> None:
        self.used += pixels
        if self.used > self.limits.max_request_pixels:
            raise ImageLoadError(
                f"The request's images have more than {self.limits.max_request_pixels} pixels in all "
                f"(--max-request-pixels); send fewer or smaller images."
            )


def _check_header(image: Image.Image, source: str, limits: ImageLimits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"Image {_describe(source)} is empty ({width}x{height}).")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageLoadError(
            f"Image {_describe(source)} is {width}x{height}, an aspect ratio of {ratio:.0f}:1, over this server's "
            f"limit of {limits.max_aspect_ratio:g}:1 (--max-image-aspect-ratio); crop or pad it first."
        )


def _decode_image(
    data: bytes, source: str, max_pixels: int | None, limits: ImageLimits | None = None, remote: bool = False
) -> Image.Image:
    """Decode image bytes into an RGB PIL image, checking the pixel count before decoding the pixels."""
    return _finish_image(_open_image(data, source, remote), source, max_pixels, limits)


def _open_image(data: bytes, source: str, remote: bool = False) -> Image.Image:
    """The image's header (size, format); its pixels are decoded later."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            f"Image {_describe(source)} has too many pixels: {exc} (servers: --max-image-pixels)."
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        if remote:  # never echo what a URL answered
            raise _fetch_failed(source) from exc
        raise ImageLoadError(
            f"Image {_describe(source)} is not an image PIL can read ({len(data)} bytes, starting {data[:16]!r}); "
            "pass a PNG, JPEG, WebP, GIF or BMP file."
        ) from exc


def _finish_image(
    image: Image.Image, source: str, max_pixels: int | None, limits: ImageLimits | None = None
) -> Image.Image:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        flag = " (--max-image-pixels)" if limits is not None else ""
        raise ImageLoadError(
            f"Image {_describe(source)} has too many pixels: {width}x{height} = {width * height} > "
            f"max_pixels={max_pixels}{flag}; downscale it or raise `max_pixels`."
        )
    if limits is not None:
        _check_header(image, source, limits)
    try:
        if limits is None:
            image.load()
            return image.convert("RGB")
        side = limits.max_side
        if max(width, height) > side and image.format == "JPEG":
            scale = side / max(width, height)
            image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))  # DCT-domain downscale
        large = width * height > LARGE_DECODE_PIXELS
        if large:
            _DECODE_SLOTS.acquire()
        try:
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
            if max(image.size) > side:
                image.thumbnail((side, side), Image.Resampling.BICUBIC, reducing_gap=3.0)
        finally:
            if large:
                _DECODE_SLOTS.release()
        return image
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt files fail only when decoded
        raise ImageLoadError(f"Image {_describe(source)} is corrupt or truncated: {exc}") from exc


def _decode_base64(payload: str, source: str, max_bytes: int | None) -> bytes:
    compact = "".join(payload.split())
    if max_bytes is not None and len(compact) * 3 // 4 > max_bytes:
        raise ImageLoadError(
            f"Image {_describe(source)} is too large: about {len(compact) * 3 // 4} bytes > max_bytes={max_bytes}; "
            "send a smaller image or raise `max_bytes`."
        )
    compact = compact.replace("-", "+").replace("_", "/")  # accept the URL-safe alphabet too
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(f"Image {_describe(source)} is not valid base64: {exc}") from exc


def _download(url: str, max_bytes: int | None, timeout: float) -> bytes:
    """GET `url`, streamed, aborting when the body passes `max_bytes` or the whole transfer passes `timeout` s."""
    import requests
    import urllib3

    deadline = time.monotonic() + timeout
    timed_out = f"Image {_describe(url)} took longer than timeout={timeout}s to download"
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            if response.status_code >= 400:
                raise ImageLoadError(
                    f"Image {_describe(url)} could not be downloaded: HTTP {response.status_code} {response.reason}."
                )
            declared = response.headers.get("Content-Length")
            if max_bytes is not None and declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageLoadError(
                    f"Image {_describe(url)} is too large: Content-Length {declared} > max_bytes={max_bytes}; "
                    "use a smaller image or raise `max_bytes`."
                )
            # requests' timeout bounds each socket read, not the transfer, and iter_content blocks until a whole
            # chunk arrives, so a server trickling bytes could hold us for ages; read1 returns after one read.
            raw = response.raw
            chunks, total = [], 0
            while chunk := raw.read1(64 * 1024, decode_content=True):
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise ImageLoadError(
                        f"Image {_describe(url)} is too large: more than max_bytes={max_bytes} bytes; "
                        "use a smaller image or raise `max_bytes`."
                    )
                if time.monotonic() > deadline:
                    raise ImageLoadError(f"{timed_out}.")
                chunks.append(chunk)
    except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError) as exc:
        raise ImageLoadError(f"{timed_out}: {exc}") from exc
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise ImageLoadError(f"Image {_describe(url)} could not be downloaded: {exc}") from exc
    return b"".join(chunks)


def load_image(
    source: str | os.PathLike[str],
    *,
    max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
    allow_paths: bool = True,
    limits: ImageLimits | None = None,
) -> Image.Image:
    """Load an RGB image from a local path, an http(s) URL, a `data:image/...;base64,` URL or a base64 string.

    `max_bytes` limits downloaded and base64 payloads (local files are not size-limited), `max_pixels` limits
    width*height for every source, `timeout` bounds a whole download in seconds. Servers that take image sources
    from requests should pass `allow_paths=False` so clients cannot read the server's files, and `limits` (an
    `ImageLimits`, which then replaces the three limits above): URLs are fetched only as it allows, with address
    checks, and the image is checked from its header and shrunk as it says. Every failure raises
    `ImageLoadError` (a `ValueError`).
    """
    if limits is not None:
        max_bytes, max_pixels, timeout = limits.max_bytes, limits.max_pixels, limits.timeout
    return _finish_image(
        _source_image(source, max_bytes, timeout, allow_paths, limits), str(source), max_pixels, limits
    )


def _source_image(
    source: str | os.PathLike[str],
    max_bytes: int | None,
    timeout: float,
    allow_paths: bool,
    limits: ImageLimits | None,
) -> Image.Image:
    """The opened (not yet decoded) image a source names."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise ImageLoadError(
            f"Image source must be a path, URL or base64 string, got {type(source).__name__} `{source!r:.80}`."
        )
    text = source.strip()
    lowered = text[:8].lower()
    if lowered.startswith(("http://", "https://")):
        if limits is not None:
            return _open_image(_guarded_download(text, limits), text, remote=True)
        return _open_image(_download(text, max_bytes, timeout), text)
    if lowered.startswith("data:"):
        match = _DATA_URL_RE.match(text)
        if match is None or ";base64" not in match["params"].lower():
            raise ImageLoadError(
                f"Image {_describe(text)} is not a base64 data URL; expected `data:image/<type>;base64,<payload>`."
            )
        return _open_image(_decode_base64(match["payload"], text, max_bytes), text)
    if allow_paths and os.path.isfile(text):
        try:
            with open(text, "rb") as f:  # read whole, so no file handle outlives this call
                data = f.read()
        except OSError as exc:
            raise ImageLoadError(f"Image file {_describe(text)} cannot be read: {exc}") from exc
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(
                f"Image {_describe(text)} has too many pixels: {exc} (servers: --max-image-pixels)."
            ) from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageLoadError(f"Image file {_describe(text)} is not an image PIL can read: {exc}") from exc
    # Anything long made only of base64 characters is treated as base64; short strings are most likely paths.
    if len(text) >= 64 and _BASE64_RE.match(text):
        return _open_image(_decode_base64(text, text, max_bytes), text)
    if not allow_paths:
        raise ImageLoadError(
            f"Image {_describe(text)} is not an http(s) URL, a data URL or base64 (local paths are not allowed here)."
        )
    raise ImageLoadError(
        f"Image {_describe(text)} not found: no such file, and it is not an http(s) URL, data URL or base64 string."
    )


def load_images(sources: Sequence[str], limits: ImageLimits, allow_paths: bool = False) -> list[Image.Image]:
    """A server request's images: all headers are checked (each image, and the request's pixel total against
    `limits.max_request_pixels`) before any pixels are decoded. Errors name the image by its position."""
    if len(sources) > limits.max_images:
        raise ImageLoadError(f"{len(sources)} images sent; the limit is {limits.max_images} (--max-images).")
    opened, budget = [], _Budget(limits)
    for i, source in enumerate(sources):
        try:
            image = _source_image(source, limits.max_bytes, limits.timeout, allow_paths, limits)
            width, height = image.size
            if width * height > limits.max_pixels:
                _finish_image(image, str(source), limits.max_pixels, limits)  # raises with the full message
            _check_header(image, str(source), limits)
        except ImageLoadError as err:
            raise ImageLoadError(f"Image {i + 1} of {len(sources)} was rejected: {err}") from err
        budget.charge(width * height)
        opened.append(image)
    out = []
    for i, image in enumerate(opened):
        try:
            out.append(_finish_image(image, str(sources[i]), limits.max_pixels, limits))
        except ImageLoadError as err:
            raise ImageLoadError(f"Image {i + 1} of {len(sources)} was rejected: {err}") from err
        opened[i] = None  # the compressed bytes can go now
    return out


def load_image_from_base64(image: str) -> Image.Image:
    """Decode a base64 string (or `data:` URL) into an RGB image, with `load_image`'s default limits."""
    text = image.strip()
    if text[:5].lower() == "data:":
        return load_image(text, allow_paths=False)
    return _decode_image(_decode_base64(text, text, DEFAULT_MAX_IMAGE_BYTES), text, DEFAULT_MAX_IMAGE_PIXELS)


# ---------------------------------------------------------------------------------------------------------------------
# Image geometry and preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...] | int) -> Image.Image:
    """Pad `pil_img` to a square of side max(width, height) filled with `background_color`, image centred."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def _fit(image: Image.Image, side: int = DEFAULT_MAX_IMAGE_SIDE) -> Image.Image:
    """`image` shrunk (aspect kept) so that its long side is at most `side`; unchanged when it already is, so
    padding a very long image never builds a huge square canvas."""
    if max(image.size) <= side:
        return image
    image = image.copy()
    image.thumbnail((side, side), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def select_best_resolution(
    original_size: tuple[int, int], possible_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the resolution that keeps the most of the image's pixels, then wastes the least canvas.

    Sizes are (width, height), like `PIL.Image.size` and the original LLaVA-NeXT code. The image is scaled to fit
    each candidate keeping its aspect ratio; the effective resolution is the scaled pixel count capped at the
    original pixel count (upscaling gains nothing), the waste is the candidate's area minus that.
    """
    if not possible_resolutions:
        raise ValueError("`possible_resolutions` is empty; pass at least one [width, height] pair.")
    original_width, original_height = original_size
    best, best_key = None, None
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled = int(original_width * scale) * int(original_height * scale)
        effective = min(scaled, original_width * original_height)
        key = (effective, -(width * height - effective))
        if best_key is None or key > best_key:
            best, best_key = (int(width), int(height)), key
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: tuple[int, int]) -> Image.Image:
    """Resize `image` to fit (width, height) `target_resolution` keeping its aspect ratio; pad black, centred."""
    target_width, target_height = target_resolution
    original_width, original_height = image.size
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(original_width * scale_h), target_width), target_height
    resized = image.resize((new_width, new_height))
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Cut `image` into `patch_size` squares, row by row; edge patches past the image are filled black."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def parse_grid_pinpoints(value: Any, patch_size: int | None = None) -> list[tuple[int, int]]:
    """Normalise `image_grid_pinpoints` to a list of (width, height) pixel pairs.

    Accepts a list of pairs, the string form of such a list (`"[[336, 672], [672, 336]]"`), or the LLaVA-NeXT grid
    form in units of `patch_size`: `"(1x1),...,(3x3)"` is every grid from 1x1 to 3x3, `"(1x2),(2x1)"` just those.
    """
    if isinstance(value, str):
        text = value.strip()
        grids = _GRID_RE.findall(text)
        if grids:
            if patch_size is None:
                raise ValueError(
                    f"Grid pinpoints `{value}` are in patch units; pass `patch_size` (the vision tower's input size)."
                )
            cells = [(int(a), int(b)) for a, b in grids]
            if "..." in text:
                (first_a, first_b), (last_a, last_b) = cells[0], cells[-1]
                cells = [(a, b) for a in range(first_a, last_a + 1) for b in range(first_b, last_b + 1)]
            return [(a * patch_size, b * patch_size) for a, b in cells]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(
                f"Cannot parse grid pinpoints `{value}`; use a list like `[[336, 672], [672, 336]]` "
                "or a range like `(1x1),...,(3x3)`."
            ) from exc
    try:
        pairs = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"Grid pinpoints `{value!r}` are not a list of [width, height] pairs; use e.g. `[[336, 672], [672, 336]]`."
        ) from exc
    if not pairs or any(a <= 0 or b <= 0 for a, b in pairs):
        raise ValueError(f"Grid pinpoints `{value!r}` must be a non-empty list of positive [width, height] pairs.")
    return pairs


def _processor_size(processor: Any) -> tuple[int, int]:
    """(height, width) the image processor outputs: its crop size, else its size."""
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if size is None:
            continue
        get = size.get if hasattr(size, "get") else lambda key, s=size: getattr(s, key, None)
        if get("height") and get("width"):
            return int(get("height")), int(get("width"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
        if isinstance(size, int):
            return size, size
    raise ValueError(
        f"Cannot tell the output size of image processor {type(processor).__name__}: it has no `crop_size` or "
        "`size` with height/width or shortest_edge."
    )


def _patch_size(processor: Any) -> int:
    height, width = _processor_size(processor)
    if height != width:
        raise ValueError(f"anyres needs a square processor crop size, got {height}x{width} (height x width).")
    return height


def get_anyres_image_grid_shape(image_size: tuple[int, int], grid_pinpoints: Any, patch_size: int) -> tuple[int, int]:
    """Number of patches (across, down) anyres cuts an image of (width, height) `image_size` into."""
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def _pixel_values(processor: Any, images: Image.Image | list[Image.Image]) -> torch.Tensor:
    return processor.preprocess(images, return_tensors="pt")["pixel_values"]


def process_anyres_image(image: Image.Image, processor: Any, grid_pinpoints: Any) -> torch.Tensor:
    """Whole image at the processor's size, then the patches of its best-fit grid: (1 + n_patches, C, H, W)."""
    patch_size = _patch_size(processor)
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    patches = divide_to_patches(resize_and_pad_image(image, best), patch_size)
    whole = image.resize((patch_size, patch_size))
    return _pixel_values(processor, [whole, *patches])  # (1 + n_patches, C, H, W)


def process_images(
    images: Sequence[Image.Image], image_processor: Any, model_cfg: Any
) -> torch.Tensor | list[torch.Tensor]:
    """Preprocess images as `model_cfg.image_aspect_ratio` says; (N, C, H, W) when shapes agree, else a list.

    `model_cfg` is any object (or dict) with `image_aspect_ratio` and, for anyres, `image_grid_pinpoints`.
    """
    cfg = model_cfg.get if isinstance(model_cfg, dict) else lambda key, default=None: getattr(model_cfg, key, default)
    aspect = cfg("image_aspect_ratio", None)
    if aspect not in ASPECT_RATIOS:
        raise ValueError(
            f"Unknown image_aspect_ratio `{aspect}`; use one of {', '.join(repr(a) for a in ASPECT_RATIOS)}."
        )
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("process_images got no images; pass at least one PIL image.")
    images = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    if aspect == "pad":
        fill = tuple(int(x * 255) for x in image_processor.image_mean)
        outputs = [_pixel_values(image_processor, expand2square(_fit(image), fill))[0] for image in images]
    elif aspect == "anyres":
        pinpoints = cfg("image_grid_pinpoints", None)
        if pinpoints is None:
            raise ValueError("image_aspect_ratio is `anyres` but model_cfg has no `image_grid_pinpoints`; set it.")
        outputs = [process_anyres_image(image, image_processor, pinpoints) for image in images]
    else:  # None / "square" / "resize": the processor alone decides
        outputs = [_pixel_values(image_processor, image)[0] for image in images]
    if all(out.shape == outputs[0].shape for out in outputs):
        return torch.stack(outputs, dim=0)
    return outputs


# ---------------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------------


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Tokenize `prompt` with each `<image>` replaced by `image_token_index`.

    Each text chunk between images is tokenized on its own without special tokens; the BOS token, when the tokenizer
    adds one, is put once at the very start. Returns a list of ids, or a 1-D `torch.long` tensor for
    `return_tensors="pt"`.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"Unsupported return_tensors `{return_tensors}`; use None (a list) or 'pt'.")
    input_ids: list[int] = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    for i, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            input_ids.append(image_token_index)
        if chunk:
            input_ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    return input_ids


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a row once its generated text (after the prompt) reaches any of `keywords`, as text or as tokens."""

    def __init__(self, keywords: Sequence[str], tokenizer: Any, input_ids: torch.Tensor) -> None:
        if isinstance(keywords, str):
            keywords = [keywords]
        self.keywords = [k for k in keywords if k]
        if not self.keywords:
            raise ValueError(f"KeywordsStoppingCriteria needs at least one non-empty keyword, got `{keywords!r}`.")
        self.tokenizer = tokenizer
        self.keyword_ids = [tokenizer(k, add_special_tokens=False).input_ids for k in self.keywords]
        self.keyword_ids = [ids for ids in self.keyword_ids if ids]
        self.max_keyword_len = max((len(ids) for ids in self.keyword_ids), default=1)
        self.start_len = input_ids.shape[1]

    def _row_done(self, new_ids: torch.Tensor) -> bool:
        if new_ids.numel() == 0:
            return False
        tail = new_ids.tolist()
        for ids in self.keyword_ids:
            if len(tail) >= len(ids) and tail[-len(ids) :] == ids:
                return True
        # Tokens can merge a keyword with neighbouring text, so also look at the text of the last few new tokens.
        text = self.tokenizer.decode(tail[-(self.max_keyword_len + 1) :], skip_special_tokens=True)
        return any(keyword in text for keyword in self.keywords)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs) -> torch.Tensor:
        done = [self._row_done(row[self.start_len :]) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (batch,)


def get_model_name_from_path(model_path: str) -> str:
    """Model name from its directory: `a/b/checkpoint-100` -> `b_checkpoint-100`, else the last path component."""
    parts = [p for p in re.split(r"[/\\]", str(model_path).strip()) if p]
    if not parts:
        raise ValueError(f"Cannot get a model name from empty path `{model_path}`; pass the model directory or id.")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]
