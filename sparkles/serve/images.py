"""Where a request's images may come from (data: URLs; files only in --allowed-image-dir; http(s) only if allowed,
never from private addresses), and the limits they are loaded under: pixels per request from each header, and one
deadline for all of a request's images.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
import warnings
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from ..conversation import Conversation, Image, Message
from ..errors import ImageLoadError, ImageTimeoutError, InputError
from ..image import check_public_addresses, load_image
from .limits import PixelBudget

MAX_REDIRECTS = 3
PEEK_BYTES = 48 * 1024  # of each data: URL's decoded start: PNG's size is in its first 33, JPEG's after its EXIF


def peek_pixels(conversation: Conversation, max_images: int) -> int | None:
    """The pixels a request's images say they have, from the start of each data: URL; None when some image is a
    file or URL (reading it may block) or its start says nothing. Cheap enough for the event loop: it decides
    which pool prepares the request, not what is allowed (that stays with the headers read in the pool)."""
    from PIL import Image as PILImage

    slots = conversation.slots
    if len(slots) > max_images:
        return None  # refused in the pool, with its message
    total = 0
    for image in slots:
        source = image.source or ""
        header, comma, payload = source[5:].partition(",")
        if image.pixels is not None:
            total += image.pixels.width * image.pixels.height
            continue
        if source[:5].lower() != "data:" or not comma or not header.lower().endswith(";base64"):
            return None
        start = payload[:PEEK_BYTES // 3 * 4]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                width, height = PILImage.open(io.BytesIO(base64.b64decode(start[:len(start) // 4 * 4]))).size
        except (OSError, ValueError, binascii.Error, SyntaxError, PILImage.DecompressionBombError):
            return None
        total += width * height
    return total


def load_request_images(conversation: Conversation, config, max_images: int, deadline: float | None = None,
                        cache=None) -> Conversation:
    """Load every image of a request under the server's rules, counting them before decoding any, all of them by
    `deadline` (a `time.monotonic()` time; None: `config.image_timeout` from now); bytes decoded for an earlier
    request are not decoded again where `cache` (an `ImageCache`) holds them."""
    if (count := len(conversation.slots)) > max_images:
        raise InputError(f"too many images: {count}; this server takes at most {max_images} per request")

    budget = PixelBudget(config.max_request_pixels)  # spent from each header: the image that overdraws never decodes
    deadline = time.monotonic() + config.image_timeout if deadline is None else deadline

    def load(part):
        if not isinstance(part, Image) or part.pixels is not None:
            return part
        if time.monotonic() > deadline:  # decoding is not interruptible: check before each image starts
            raise ImageTimeoutError(f"the images of this request were not loaded within {config.image_timeout:g} s "
                                    f"(the limit per request); {part.name} and later were not reached")
        loaded = load_source(part.source, config, check_size=lambda size: budget.take(size, part.name),
                             deadline=deadline, cache=cache)
        return replace(part, pixels=loaded.pixels, sha256=loaded.sha256)
    messages = tuple(Message(m.role, tuple(load(p) for p in m.parts)) for m in conversation.messages)
    return replace(conversation, messages=messages)


def load_source(source: str, config, check_size=None, deadline: float | None = None, cache=None):
    """A data: URL, a file under the allowed folder (a path or file:// URL), or a public http(s) URL."""
    limits = {"max_bytes": config.max_image_bytes, "max_pixels": config.max_image_pixels, "check_size": check_size,
              "deadline": deadline, "cache": cache}
    scheme = urlsplit(source).scheme.lower()
    if scheme == "data":
        return load_image(source, **limits)
    if scheme in ("http", "https"):
        if not config.allow_http:
            raise ImageLoadError(f"cannot load image {source[:80]}: http(s) image URLs are turned off on this "
                                 "server; send the image as a data: URL (or start the server with --allow-http)")
        timeout = config.http_timeout if deadline is None else min(config.http_timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise ImageTimeoutError(f"cannot fetch image {source[:80]}: no time left of the request's image deadline")
        return load_image(fetch_image(source, max_bytes=config.max_image_bytes, timeout=timeout), **limits)
    if scheme not in ("", "file"):
        raise ImageLoadError(f"cannot load image {source[:80]}: expected a data:, http(s) or file URL")
    raw = unquote(urlsplit(source).path) if scheme == "file" else source
    path = allowed_path(raw, config.allowed_image_dir)
    try:
        return load_image(str(path), **limits)
    except ImageLoadError as e:  # its message names the real path; the client sees only the one it sent
        raise type(e)(str(e).replace(str(path), raw)) from None


def allowed_path(raw: str, folder: str | None) -> Path:
    """The real path of `raw` (relative to `folder`, symlinks resolved) if it lies inside `folder`."""
    if folder is None:
        raise ImageLoadError(f"cannot load image {raw[:80]}: local image files are turned off on this server; "
                             "send the image as a data: URL (or start the server with --allowed-image-dir DIR)")
    try:
        root, path = Path(folder).resolve(), (Path(folder).resolve() / raw).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops
        raise ImageLoadError(f"cannot load image {raw[:80]}: not a usable path ({e})") from None
    if not path.is_relative_to(root):
        raise ImageLoadError(f"cannot load image {raw[:80]}: the path is outside the allowed image folder")
    return path


def fetch_image(url: str, *, max_bytes: int, timeout: float, resolve=socket.getaddrinfo, transport=None) -> bytes:
    """GET an image from a public address: every hop's host is resolved, checked and pinned (no DNS rebinding)."""
    import httpx
    deadline = time.monotonic() + timeout
    with httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            pinned, headers, extensions = _pin(url, resolve)
            try:
                with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise ImageLoadError(f"cannot fetch image {url[:80]}: HTTP {response.status_code}")
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise ImageLoadError(f"cannot fetch image {url[:80]}: over {max_bytes} B")
                        if time.monotonic() > deadline:  # a server dripping bytes
                            raise ImageTimeoutError(f"cannot fetch image {url[:80]}: not all there within "
                                                    f"{timeout:g} s")
                    return bytes(data)
            except httpx.TimeoutException as e:
                raise ImageTimeoutError(f"cannot fetch image {url[:80]}: {type(e).__name__}") from None
            except httpx.HTTPError as e:
                raise ImageLoadError(f"cannot fetch image {url[:80]}: {type(e).__name__}") from None
    raise ImageLoadError(f"cannot fetch image {url[:80]}: more than {MAX_REDIRECTS} redirects")


def _pin(url: str, resolve) -> tuple[str, dict, dict]:
    """The URL with its host replaced by a checked public IP, plus the Host header and TLS name to keep."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ImageLoadError(f"cannot fetch image {url[:80]}: expected an http(s) URL with a host and no user info")
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0])
                     for info in resolve(parts.hostname, port, type=socket.SOCK_STREAM)]
    except (OSError, ValueError) as e:
        raise ImageLoadError(f"cannot fetch image {url[:80]}: cannot resolve {parts.hostname} ({e})") from None
    # Every address must be public after unwrapping any IPv4 embedded in IPv6 (mapped, NAT64, 6to4, Teredo, …).
    check_public_addresses(parts.hostname, addresses)
    ip = str(addresses[0]) if addresses[0].version == 4 else f"[{addresses[0]}]"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme.lower() == "https" else {}
    return parts._replace(netloc=f"{ip}:{port}").geturl(), {"Host": parts.netloc}, extensions
