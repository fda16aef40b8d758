"""The one image loader: paths, bytes, data: URIs, http(s) URLs and PIL images all become a `LoadedImage`.

A loaded image is fully decoded RGB with its EXIF orientation applied, plus a content hash. Every failure is an
`ImageLoadError` that says what was expected and what came. No torch and no resizing here: turning pixels into
model inputs is the vision encoder's preprocessing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import os
import re
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageOps

from .conversation import Conversation, Message
from .conversation import Image as ConversationImage
from .errors import ImageLoadError, ImageTimeoutError
from .image_cache import ImageCache

DEFAULT_MAX_BYTES = 20 * 2**20  # refuse sources larger than this
DEFAULT_MAX_PIXELS = 6000 * 6000  # refuse images whose width*height exceeds this (decompression bombs)

_CHUNK = 1 << 20  # bytes per read of a file: the deadline is checked between reads

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class LoadedImage:
    pixels: Image.Image = field(compare=False, repr=False)  # RGB, EXIF orientation applied, fully loaded
    sha256: str  # of the source bytes; for a PIL image given directly, of its mode, size and raw pixels
    source: str  # what was loaded, for messages: a path, a shortened data: URI, a URL, "<bytes>" or "<PIL image>"


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_data_uri(image: Image.Image, format: str = "PNG") -> str:
    """Encode `image` as a ``data:image/…;base64,`` URI (JPEG drops alpha, since it cannot carry it)."""
    format = "JPEG" if format.upper() in ("JPG", "JPEG") else format.upper()
    if format == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = _to_rgb(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    mime = Image.MIME.get(format, f"image/{format.lower()}")
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def load_image(
    source,
    *,
    allow_http: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = 10.0,
    root: str | os.PathLike | None = None,
    check_size: Callable[[tuple[int, int]], None] | None = None,
    deadline: float | None = None,
    cache: ImageCache | None = None,
) -> LoadedImage:
    """Load `source` (a path, bytes, data: URI, http(s) URL or PIL image) as RGB pixels; see the module docstring.

    `check_size((width, height))` runs on the size the header gives, before any pixel is decoded, and may raise: a
    caller's own budget (the server's pixels per request) refuses a large image at the cost of reading its header.
    `deadline` (a `time.monotonic()` time) ends reading a file or URL between chunks with an `ImageTimeoutError`: a
    caller's total for several images. One read blocked inside the OS is not interrupted (see the README). With a
    `cache` (image_cache.py), bytes decoded before give the pixels kept then, after the same size checks."""
    if isinstance(source, Image.Image):
        # _decode loads it, so tobytes() below is cheap
        pixels = _decode(lambda: source, "<PIL image>", max_pixels, check_size)
        digest = hashlib.sha256(f"{source.mode} {source.width}x{source.height}\n".encode())
        digest.update(bytes(source.getpalette() or ()) if source.mode == "P" else b"")  # indices alone say little
        digest.update(source.tobytes())
        return LoadedImage(pixels, digest.hexdigest(), "<PIL image>")
    data, label = _read_source(source, allow_http, max_bytes, timeout, root, deadline)
    sha = image_sha256(data)
    held = cache.get(("pixels", sha)) if cache is not None else None
    if held is not None:  # decoded before: the checks its header met then, against this call's limits
        _check_pixels(held.size, label, max_pixels)
        if check_size is not None:
            check_size(held.size)
        return LoadedImage(held, sha, label)
    pixels = _decode(lambda: Image.open(io.BytesIO(data)), label, max_pixels, check_size)
    if cache is not None:
        cache.put(("pixels", sha), pixels, pixels.width * pixels.height * len(pixels.getbands()))
    return LoadedImage(pixels, sha, label)


def _read_source(source, allow_http: bool, max_bytes: int, timeout: float, root, deadline) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_bytes(len(data), "<bytes>", max_bytes)
        return data, "<bytes>"
    if isinstance(source, str):
        if not source.strip():
            raise ImageLoadError("expected an image path, data: URI or URL, got an empty string")
        if source[:5].lower() == "data:":
            label = source if len(source) <= 40 else source[:39] + "…"
            return _read_data_uri(source, label, max_bytes), label
        scheme = _URL_SCHEME.match(source)
        if scheme and scheme.group(1).lower() in ("http", "https"):
            if not allow_http:
                raise ImageLoadError(
                    f"cannot load image {source}: http(s) images are turned off; "
                    "pass allow_http=True to load_image to allow them"
                )
            return _read_url(source, max_bytes, timeout, deadline), source
        if scheme:
            raise ImageLoadError(
                f"cannot load image {source}: expected a file path, data: URI or http(s) URL, "
                f"got a {scheme.group(1)}:// URL"
            )
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source)).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root).expanduser() / path
        return _read_file(path, max_bytes, deadline), str(path)
    raise ImageLoadError(
        f"expected an image path, bytes, data: URI, http(s) URL or PIL image, got {type(source).__name__}"
    )


def _read_file(path: Path, max_bytes: int, deadline: float | None = None) -> bytes:
    # Regular files only: a FIFO, a device or a socket would block a worker for ever (or stream without end). The
    # open never blocks (O_NONBLOCK), and the check runs on the opened file, so a swap after a stat cannot slip by.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        kind = _file_kind(os.stat(path).st_mode)
        if kind != "regular file":
            raise ImageLoadError(f"expected an image file, got a {kind}: {path}")
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb", buffering=0) as f:
            info = os.fstat(f.fileno())
            if _file_kind(info.st_mode) != "regular file":
                raise ImageLoadError(f"expected an image file, got a {_file_kind(info.st_mode)}: {path}")
            _check_bytes(info.st_size, str(path), max_bytes)
            data = _read_up_to(f, max_bytes + 1, deadline, path)  # a file growing under us stops at the limit
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    except PermissionError:
        raise ImageLoadError(f"cannot read image file {path}: permission denied") from None
    except OSError as e:
        raise ImageLoadError(f"cannot read image file {path}: {e.strerror or e}") from e
    _check_bytes(len(data), str(path), max_bytes)
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _read_up_to(f, limit: int, deadline: float | None = None, path=None) -> bytes:
    chunks, size = [], 0
    while size < limit:
        # A slow filesystem (a network mount) returns each chunk late; checking between chunks bounds the total.
        if deadline is not None and time.monotonic() > deadline:
            raise ImageTimeoutError(f"cannot read image file {path}: it came too slowly, {size} bytes by the deadline")
        chunk = f.read(min(_CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_data_uri(uri: str, label: str, max_bytes: int) -> bytes:
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise ImageLoadError(f"cannot read image {label}: expected data:<type>[;base64],<data>, found no comma")
    if not header.lower().endswith(";base64"):
        data = urllib.parse.unquote_to_bytes(payload)  # the plain form percent-encodes its bytes
    else:
        payload = re.sub(r"\s+", "", urllib.parse.unquote(payload))
        payload += "=" * (-len(payload) % 4)  # some encoders drop the padding
        # Refuse from the encoded length before decoding: 4 base64 characters carry 3 bytes.
        _check_bytes(len(payload) // 4 * 3 - payload[-2:].count("="), label, max_bytes)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageLoadError(f"cannot read image {label}: expected valid base64 after the comma ({e})") from e
    _check_bytes(len(data), label, max_bytes)
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # The stdlib follows redirects to ftp:// too, and turns file:// ones into a bare HTTPError: refuse both here.
    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
            fp.close()
            raise ImageLoadError(f"cannot fetch image {req.full_url}: expected a redirect to http(s), got {target}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _read_url(url: str, max_bytes: int, timeout: float, deadline: float | None = None) -> bytes:
    """GET `url` with `timeout` seconds for the connection and each read, and 3 × `timeout` (or less, to `deadline`)
    for the whole body, so a server that drips bytes cannot hold a worker."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    start = time.monotonic()
    deadline = min(start + 3 * timeout, deadline if deadline is not None else float("inf"))
    try:
        with opener.open(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit():
                _check_bytes(int(length), url, max_bytes)
            data = bytearray()
            while len(data) <= max_bytes:
                if time.monotonic() > deadline:
                    raise ImageTimeoutError(f"cannot fetch image {url}: expected the whole image within "
                                            f"{deadline - start:g} s, got {len(data)} bytes by then")
                chunk = response.read1(min(1 << 16, max_bytes + 1 - len(data)))  # one recv: returns as bytes come
                if not chunk:
                    break
                data += chunk
    except urllib.error.HTTPError as e:
        raise ImageLoadError(f"cannot fetch image {url}: expected HTTP 200, got {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ImageLoadError(f"cannot fetch image {url}: {e.reason}") from e
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise ImageLoadError(f"cannot fetch image {url}: {e}") from e
    _check_bytes(len(data), url, max_bytes)
    return bytes(data)


# Not globally routable, whatever a Python version's `is_global` says (IANA special-purpose registries).
_SPECIAL_V4 = tuple(map(ipaddress.IPv4Network, (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32")))
_SPECIAL_V6 = tuple(map(ipaddress.IPv6Network, (
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8")))
_WRAPS_V4 = tuple(map(ipaddress.IPv6Network, ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96")))


def is_public_address(address) -> bool:
    """True only for a globally routable unicast address, checked after unwrapping every IPv4 address an IPv6 one
    carries (IPv4-mapped, -compatible and -translated, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32), so
    that ::ffff:127.0.0.1 or 2002:7f00:1:: count as the loopback they lead to. `address`: a string or ip_address."""
    try:
        ip = ipaddress.ip_address(str(address).split("%")[0])  # a zone (fe80::1%eth0) changes nothing
    except ValueError:
        return False
    if ip.version == 4:
        return ip.is_global and not any(ip in net for net in _SPECIAL_V4)
    inner = [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)] if any(ip in net for net in _WRAPS_V4) else []
    inner += [ip.sixtofour] if ip.sixtofour else []
    inner += list(ip.teredo) if ip.teredo else []  # (server, client): both are IPv4 hops
    if inner:
        return all(is_public_address(v4) for v4 in inner)
    return ip.is_global and not any(ip in net for net in _SPECIAL_V6)


def check_public_addresses(host: str, addresses) -> None:
    """Refuse `host` unless it resolved to something and every address it resolved to is public."""
    addresses = list(addresses)
    bad = [str(a) for a in addresses if not is_public_address(a)]
    if bad or not addresses:
        raise ImageLoadError(f"cannot fetch image from {host}: expected a public address, got "
                             f"{', '.join(bad) if bad else 'no address'} (private, local or reserved)")


def _check_bytes(size: int, label: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageLoadError(
            f"image {label} is larger than {max_bytes} bytes (got {size}); raise max_bytes to allow it"
        )


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"image {label} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            "raise max_pixels to allow it"
        )


def _decode(open_image, label: str, max_pixels: int, check_size=None) -> Image.Image:
    """Open, size-check, decode and orient an image; `open_image` runs inside the error handling."""
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; make it refuse instead, without touching the global.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = open_image()
            _check_pixels(image.size, label, max_pixels)  # the header alone gives the size: nothing is decoded yet
            if check_size is not None:
                check_size(image.size)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageLoadError(f"image {label} is too large to decode safely ({e})") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageLoadError(f"cannot read image {label}: not an image file or corrupt ({e})") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent areas are usually meant as background; black would turn dark-on-clear drawings into black boxes.
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")  # PIL has no La->RGBA
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I"):
        # 16-bit greys (PNG, TIFF) would clip to white in a plain convert: scale them to 8 bits.
        wide = image.convert("I")
        if wide.getextrema()[1] > 255:
            wide = wide.point(lambda v: v / 256)
        return wide.convert("L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_part(source, **kwargs) -> ConversationImage:
    """An image part of a conversation with its pixels loaded; `kwargs` go to `load_image`."""
    loaded = load_image(source, **kwargs)
    name = source if isinstance(source, str) and not source.startswith("data:") else loaded.source
    return ConversationImage(source=str(name), pixels=loaded.pixels, sha256=loaded.sha256)


def load_images(conversation: Conversation, **kwargs) -> Conversation:
    """The conversation with pixels loaded for every image part that has a source but no pixels yet."""

    def load(part):
        if not isinstance(part, ConversationImage) or part.pixels is not None:
            return part
        if part.source is None:
            raise ImageLoadError(f"{part.name} has neither pixels nor a source to load them from")
        loaded = load_image(part.source, **kwargs)
        return replace(part, pixels=loaded.pixels, sha256=loaded.sha256)

    messages = tuple(Message(m.role, tuple(load(p) for p in m.parts)) for m in conversation.messages)
    return replace(conversation, messages=messages)
