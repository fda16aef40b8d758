"""Tests for `sparkles.image`: every source kind, orientation, colour modes, limits and refusals. No network."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import io
import random
import struct
import threading
import urllib.parse
import zlib
from pathlib import Path

import pytest
from PIL import Image

from sparkles.errors import ImageLoadError, InputError
from sparkles.image import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    LoadedImage,
    image_sha256,
    load_image,
    to_data_uri,
)

PHOTOS = Path(__file__).resolve().parents[2] / "shared/data/photos"


def _encode(image: Image.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def _noise(size=(32, 24), mode="RGB", seed=0) -> Image.Image:
    # Noise, not a flat colour, so that a wrong orientation or a truncated decode shows in the pixels.
    bands = len(mode)
    data = random.Random(seed).randbytes(size[0] * size[1] * bands)
    return Image.frombytes(mode, size, data)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose image data is garbage: it opens but cannot decode."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


@pytest.fixture
def sample():
    return _noise()


@pytest.fixture
def sample_png(sample, tmp_path):
    data = _encode(sample)
    path = tmp_path / "sample.png"
    path.write_bytes(data)
    return path, data


# --- every source kind gives the same result ---


def test_defaults():
    assert DEFAULT_MAX_BYTES == 20 * 2**20
    assert DEFAULT_MAX_PIXELS == 6000 * 6000


def test_sources_agree(sample, sample_png):
    path, data = sample_png
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    loaded = [load_image(s) for s in (str(path), path, data, bytearray(data), uri)]
    expected_hash = hashlib.sha256(data).hexdigest()
    for item in loaded:
        assert isinstance(item, LoadedImage)
        assert item.pixels.mode == "RGB"
        assert item.pixels.size == sample.size
        assert item.pixels.tobytes() == sample.tobytes()
        assert item.sha256 == expected_hash == image_sha256(data)
    assert [item.source for item in loaded[:3]] == [str(path), str(path), "<bytes>"]
    assert loaded[4].source.startswith("data:image/png;base64,") and len(loaded[4].source) <= 41

    direct = load_image(sample)
    assert direct.pixels.tobytes() == sample.tobytes()
    assert direct.source == "<PIL image>"
    assert direct.sha256 == load_image(sample.copy()).sha256  # same pixels, same hash
    assert direct.sha256 != load_image(_noise(seed=1)).sha256
    assert direct.pixels is not sample  # the caller's image is not handed back to be mutated


def test_loaded_image_is_frozen_and_compares_by_hash_and_source(sample_png):
    path, _ = sample_png
    a, b = load_image(path), load_image(str(path))
    assert a == b
    assert "pixels" not in repr(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.sha256 = "x"


def test_pil_image_from_a_file_is_fully_loaded(sample_png):
    path, _ = sample_png
    with Image.open(path) as lazy:
        loaded = load_image(lazy)
    assert loaded.pixels.tobytes() == _noise().tobytes()


def test_relative_path_resolves_against_root(sample_png, tmp_path, monkeypatch):
    path, data = sample_png
    loaded = load_image("sample.png", root=tmp_path)
    assert loaded.sha256 == image_sha256(data)
    assert loaded.source == str(tmp_path / "sample.png")
    assert load_image(path, root=tmp_path / "elsewhere").sha256 == loaded.sha256  # absolute paths ignore root
    monkeypatch.chdir(tmp_path)
    assert load_image("sample.png").sha256 == loaded.sha256


# --- data: URIs and to_data_uri ---


def test_data_uri_variants(sample):
    data = _encode(sample)
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    for uri in (
        "data:image/png;base64," + wrapped,  # MIME-style line breaks
        "data:image/png;base64," + b64.rstrip("="),  # padding dropped
        "DATA:image/png;BASE64," + b64,
        "data:;base64," + b64,
        "data:image/png," + urllib.parse.quote_from_bytes(data),  # percent-encoded, not base64
    ):
        assert load_image(uri).pixels.tobytes() == sample.tobytes(), uri[:30]


def test_bad_data_uris():
    with pytest.raises(ImageLoadError, match="no comma"):
        load_image("data:image/png;base64")
    with pytest.raises(ImageLoadError, match="base64"):
        load_image("data:image/png;base64,@@@not base64@@@")
    with pytest.raises(ImageLoadError, match="not an image file or corrupt"):
        load_image("data:image/png;base64," + base64.b64encode(b"hello world").decode())


def test_to_data_uri_round_trips(sample):
    uri = to_data_uri(sample)
    assert uri.startswith("data:image/png;base64,")
    assert load_image(uri).pixels.tobytes() == sample.tobytes()
    jpeg = to_data_uri(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), format="jpg")
    assert jpeg.startswith("data:image/jpeg;base64,")
    assert load_image(jpeg).pixels.getpixel((4, 4)) >= (250, 250, 250)  # alpha went to white, not black


# --- orientation and colour modes ---


def test_exif_orientation_is_applied(tmp_path):
    image = _noise((40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, format="JPEG", exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    assert load_image(path).pixels.size == (20, 40)
    assert load_image(path.read_bytes()).pixels.size == (20, 40)
    with Image.open(path) as raw:
        assert load_image(raw).pixels.size == (20, 40)


def test_transparency_becomes_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_encode(clear)).pixels.getpixel((1, 1)) == (255, 255, 255)
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    r, g, b = load_image(_encode(half_red)).pixels.getpixel((1, 1))
    assert r == 255 and 120 <= g <= 135 and g == b
    assert load_image(Image.new("LA", (4, 4), (0, 0))).pixels.getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert load_image(opaque).pixels.getpixel((0, 0)) == (10, 20, 30)


def test_palette_with_transparency_becomes_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 1)
    loaded = load_image(_encode(image, transparency=0))
    assert loaded.pixels.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.pixels.getpixel((0, 0)) == (200, 10, 10)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
        ("I;16", 32768, (128, 128, 128)),
        ("I;16", 200, (0, 0, 0)),  # a 16-bit image is scaled as a whole, here together with a white pixel
    ],
)
def test_other_modes_become_rgb(mode, value, expected):
    image = Image.new(mode, (4, 4), value)
    if mode == "I;16":
        image.putpixel((3, 3), 65535)
    for source in (image, _encode(image, "TIFF" if mode == "CMYK" else "PNG")):
        pixels = load_image(source).pixels
        assert pixels.mode == "RGB"
        got = pixels.getpixel((0, 0))
        assert all(abs(g - e) <= 1 for g, e in zip(got, expected, strict=True)), (mode, source.__class__, got)


# --- refusals ---


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match="image file not found: .*nope.png"):
        load_image(missing)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image("nope.png", root=tmp_path)


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="expected an image file, got a directory"):
        load_image(tmp_path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(random.Random(1).randbytes(2000))
    with pytest.raises(ImageLoadError, match=r"cannot read image .*noise.png: not an image file or corrupt"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="not an image file or corrupt"):
        load_image(b"")


def test_truncated_png(tmp_path):
    data = _encode(_noise((64, 64)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="not an image file or corrupt"):
        load_image(path)


def test_too_many_bytes(sample_png):
    path, data = sample_png
    limit = len(data) - 1
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (path, data, uri, "data:image/png," + urllib.parse.quote_from_bytes(data)):
        with pytest.raises(ImageLoadError, match=f"larger than {limit} bytes \\(got {len(data)}\\)"):
            load_image(source, max_bytes=limit)
    assert load_image(path, max_bytes=len(data)).sha256 == image_sha256(data)
    assert load_image(uri, max_bytes=len(data)).sha256 == image_sha256(data)  # the estimate is exact at the edge


def test_too_many_pixels_is_refused_before_decoding():
    big = _encode(Image.new("RGB", (200, 200), "red"))
    with pytest.raises(ImageLoadError, match="200x200 = 40000 pixels, more than the limit of 100"):
        load_image(big, max_pixels=100)
    # A header with garbage behind it: decoding would fail as corrupt, so the pixel message proves it never ran.
    with pytest.raises(ImageLoadError, match="more than the limit"):
        load_image(_png_header_only(200, 200), max_pixels=100)
    with pytest.raises(ImageLoadError, match="not an image file or corrupt"):
        load_image(_png_header_only(200, 200))
    with pytest.raises(ImageLoadError, match="more than the limit"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)


@pytest.mark.parametrize("side", [10_000, 20_000])  # past PIL's warning, and past its hard error
def test_pil_decompression_bomb_checks_become_image_load_errors(side):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match="too large to decode safely"):
        load_image(_png_header_only(side, side), max_pixels=side * side)
    assert Image.MAX_IMAGE_PIXELS == before


def test_http_is_refused_unless_allowed():
    for url in ("http://127.0.0.1:9/x.png", "https://example.com/x.png", "HTTPS://example.com/x.png"):
        with pytest.raises(ImageLoadError, match="http\\(s\\) images are turned off.*allow_http=True"):
            load_image(url)


def test_other_schemes_and_types_are_refused():
    with pytest.raises(ImageLoadError, match="got a ftp:// URL"):
        load_image("ftp://example.com/x.png", allow_http=True)
    with pytest.raises(ImageLoadError, match="expected an image path, bytes.*got int"):
        load_image(42)
    with pytest.raises(ImageLoadError, match="empty string"):
        load_image("  ")


def test_image_load_error_is_an_input_error():
    assert issubclass(ImageLoadError, InputError)


# --- http(s) against a local server ---


@pytest.fixture
def local_server(sample, monkeypatch):
    """A server on 127.0.0.1 answering /ok.png, /big.png, /redirect, /to-file, /to-ftp and 404."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    png = _encode(sample)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            target = {"/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/x.png", "/redirect": "ok.png"}
            if self.path in target:
                self.send_response(302)
                self.send_header("Location", target[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = {"/ok.png": png, "/big.png": png * 3}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", png
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_from_a_local_server(local_server, sample):
    base, png = local_server
    loaded = load_image(base + "/ok.png", allow_http=True, timeout=5)
    assert loaded.pixels.tobytes() == sample.tobytes()
    assert loaded.sha256 == image_sha256(png)
    assert loaded.source == base + "/ok.png"
    with pytest.raises(ImageLoadError, match="expected HTTP 200, got 404"):
        load_image(base + "/missing.png", allow_http=True, timeout=5)
    with pytest.raises(ImageLoadError, match="larger than"):
        load_image(base + "/big.png", allow_http=True, timeout=5, max_bytes=len(png) * 2)
    with pytest.raises(ImageLoadError, match="expected a redirect to http\\(s\\), got file:///etc/passwd"):
        load_image(base + "/to-file", allow_http=True, timeout=5)
    with pytest.raises(ImageLoadError, match="expected a redirect to http\\(s\\), got ftp://"):
        load_image(base + "/to-ftp", allow_http=True, timeout=5)
    assert load_image(base + "/redirect", allow_http=True, timeout=5).sha256 == loaded.sha256


def test_http_connection_refused_is_an_image_load_error(local_server):
    base, _ = local_server
    with pytest.raises(ImageLoadError, match="cannot fetch image"):
        load_image("http://127.0.0.1:1/x.png", allow_http=True, timeout=2)


# --- the shared test photos ---


@pytest.mark.parametrize(("name", "size"), [("case1_1.jpg", (1024, 576)), ("case1_4.jpg", (683, 1024))])
def test_shared_photos(name, size):
    if not PHOTOS.is_dir():
        pytest.skip("shared test photos not present")
    loaded = load_image(PHOTOS / name)
    assert loaded.pixels.mode == "RGB"
    assert loaded.pixels.size == size
    if name == "case1_1.jpg":
        assert loaded.sha256 == "83735819488f20337ba38809b81d0f9b65f2145a200c2b42c0ca367d0b14db8e"
