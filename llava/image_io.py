"""Image loading with limits: paths, URLs (with the SSRF guard) and base64, decoded under size and pixel budgets.

One job, a little over the house's ~450 lines: everything between an untrusted image source and a bounded RGB image
(address checks, byte and pixel budgets, decode slots) stays together so the guard has one place to be read and
changed. `llava.mm_utils` re-exports the public names.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import ipaddress
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_IMAGE_SIDE",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "ImageLimits",
    "ImageLoadError",
    "expand2square",
    "load_image",
    "load_image_from_base64",
    "load_images",
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

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_DATA_URL_RE = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<payload>.*)$", re.DOTALL)


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


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...] | int) -> Image.Image:
    """Pad `pil_img` to a square of side max(width, height) filled with `background_color`, image centred."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result
