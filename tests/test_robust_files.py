"""Files and fetches that must not hang, lie or lose work: FIFOs and devices as images, slow image servers, the
public-address filter, PNG headers declaring huge sizes, torn JSONL tails after a kill, damaged checkpoints,
training records with too many images, and captions files with a BOM or invalid UTF-8. Local only: no traffic
leaves 127.0.0.1."""

import dataclasses
import http.server
import io
import json
import logging
import os
import struct
import sys
import threading
import time
import zlib

import pytest
from evaldata import bison
from PIL import Image as PILImage

from sparkles.config import SamplingParams
from sparkles.errors import CheckpointError, ImageLoadError, InputError
from sparkles.eval.harness import RunOptions, evaluate
from sparkles.eval.report import read_jsonl
from sparkles.eval.tasks import load_task
from sparkles.image import check_public_addresses, is_public_address, load_image
from sparkles.jsonl import repair_tail

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def within(seconds, fn, *args, **kwargs):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not finish in `seconds`."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# --- image files: regular files only ---


@posix_only
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match=r"expected an image file, got a FIFO \(named pipe\): .*photo.png"):
        within(10, load_image, fifo)
    with pytest.raises(ImageLoadError, match="FIFO"):
        within(10, load_image, "photo.png", root=tmp_path)  # the server's --allowed-image-dir path goes here too


@posix_only
def test_the_cli_image_option_naming_a_fifo_fails_fast(tmp_path):
    import subprocess

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "sparkles.cli", "chat", "What is it?", "--image", str(fifo)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "expected an image file, got a FIFO" in done.stderr


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_refused():
    with pytest.raises(ImageLoadError, match="expected an image file, got a character device: /dev/zero"):
        within(10, load_image, "/dev/zero")


def test_a_directory_is_still_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="expected an image file, got a directory"):
        load_image(tmp_path)


# --- http(s): a deadline on the whole fetch ---


@pytest.fixture
def dripping_server(monkeypatch):
    """127.0.0.1: /drip sends headers at once, then one byte every 0.2 s for ever (each read is quick)."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while not stop.is_set():
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_a_server_dripping_bytes_hits_the_total_deadline(dripping_server):
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"expected the whole image within 1.5 s, got \d+ bytes"):
        within(20, load_image, dripping_server + "/drip", allow_http=True, timeout=0.5)
    assert time.monotonic() - started < 5


# --- the public-address filter (a table, no resolver traffic) ---

REFUSED = [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "0.1.2.3", "100.64.0.1",
    "100.127.255.254", "192.0.0.1", "192.0.0.170", "192.0.2.1", "198.18.0.1", "198.19.255.255", "198.51.100.7",
    "203.0.113.9", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.88.99.1",
    "::", "::1", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "fec0::1", "fed0::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "::10.0.0.1",
    "::ffff:0:127.0.0.1", "2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:0a00:0001::", "64:ff9b::127.0.0.1",
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::8.8.8.8", "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo: client 127.0.0.1
    "2001::1", "100::1", "not an address", "",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "2a00:1450:4001:82a::200e",
           "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:0808:0808::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_addresses_that_are_not_globally_routable_are_refused(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address):
    assert is_public_address(address)


def test_a_host_is_refused_when_any_address_it_resolves_to_is_not_public():
    table = {"img.example": ["93.184.215.14", "2606:4700:4700::1111"],
             "rebind.example": ["8.8.8.8", "::ffff:127.0.0.1"], "nat64.example": ["64:ff9b::7f00:1"],
             "empty.example": []}

    def resolve(host):  # a fake resolver: nothing leaves the machine
        return table[host]

    check_public_addresses("img.example", resolve("img.example"))
    with pytest.raises(ImageLoadError, match=r"expected a public address, got ::ffff:127.0.0.1"):
        check_public_addresses("rebind.example", resolve("rebind.example"))
    with pytest.raises(ImageLoadError, match="64:ff9b::7f00:1"):
        check_public_addresses("nat64.example", resolve("nat64.example"))
    with pytest.raises(ImageLoadError, match="got no address"):
        check_public_addresses("empty.example", resolve("empty.example"))


# --- PNG headers that declare a huge size ---


def png_header_only(width, height):
    """A PNG whose IHDR declares width x height, with one tiny IDAT: decoding it would need the declared size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [7000, 20000, 100000])
def test_a_png_declaring_a_huge_size_is_refused_from_its_header(side):
    data = png_header_only(side, side)
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match="pixels, more than the limit|too large to decode safely"):
        load_image(data)
    assert time.monotonic() - started < 2  # refused from the header: nothing of side*side was decoded


# --- torn JSONL tails ---


def test_repair_tail_cuts_only_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": 3, "ans')
    with caplog.at_level(logging.WARNING, logger="sparkles"):
        assert repair_tail(path)
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    assert "dropped a half-written last line of 14 bytes" in caplog.text
    assert not repair_tail(path) and not repair_tail(tmp_path / "missing.jsonl")
    path.write_bytes(b'{"id": 1, "torn')  # one torn line and nothing else
    assert repair_tail(path) and path.read_bytes() == b""


class Answering:
    name = "scripted"

    def __init__(self):
        self.asked = 0

    def describe(self):
        return {"kind": "scripted"}

    def answer_batch(self, conversations, params):
        self.asked += len(conversations)
        return ["Let's think step by step. Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#1."] * len(conversations)


def test_eval_resume_after_a_torn_last_line_redoes_that_item(tmp_path, caplog):
    task = load_task("bison", bison(tmp_path / "data", 4))
    opts = RunOptions(out=tmp_path / "run", params=SamplingParams(max_new_tokens=8, seed=0), progress=False,
                      batch_size=4)
    evaluate(task, Answering(), opts)
    for name in ("answers.jsonl", "results.jsonl"):  # a kill while writing item 3's lines
        path = opts.out / name
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    responder = Answering()
    with caplog.at_level(logging.WARNING, logger="sparkles"):
        _, results = evaluate(task, responder, dataclasses.replace(opts, resume=True))
    assert responder.asked == 1  # only the torn item is generated again
    assert len(results) == 4 and len(read_jsonl(opts.out / "results.jsonl")) == 4
    assert all(json.loads(line) for line in (opts.out / "results.jsonl").read_text().splitlines())
    assert caplog.text.count("dropped a half-written last line") == 2


# --- training: too many images, damaged checkpoints ---


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    (root / "images").mkdir()
    records = []
    for n in range(4):
        PILImage.new("RGB", (24, 24), (60 * n, 30, 200 - 40 * n)).save(root / "images" / f"{n}.png")
        records.append({"dialogue": [
            {"role": "user", "content": f"Colour of IMAGE#{n}<Img><ImageHere></Img>?",
             "images": [{"image_id": str(n)}]},
            {"role": "assistant", "content": f"IMAGE#{n} is colour {n}."}]})
    many = [{"image_id": str(k % 4)} for k in range(20)]  # 20 > the tiny model's 16
    records.append({"dialogue": [
        {"role": "user", "content": "".join(f"IMAGE#{k % 4}<Img><ImageHere></Img>" for k in range(20)) + " Same?",
         "images": many},
        {"role": "assistant", "content": "Yes."}]})
    (root / "d.json").write_text(json.dumps(records))
    return root


def train_config(root, out, max_steps=4):
    from conftest import tiny_config

    from sparkles.config import DataConfig, DataSource, OptimConfig, TrainConfig

    return TrainConfig(model=tiny_config(trainable=("connector",)),
                       data=DataConfig(sources=(DataSource(str(root / "d.json")),), max_len=256),
                       optim=OptimConfig(lr_connector=1e-3, max_steps=max_steps, batch_size=2), out=str(out),
                       save_every=2, seed=1)


def test_a_record_with_more_images_than_the_model_takes_is_skipped_and_counted(colours, tmp_path):
    from sparkles.config import DataSource
    from sparkles.train.loop import train
    from sparkles.train.records import read_source

    samples, report = read_source(DataSource(str(colours / "d.json")), max_images=16)
    assert len(samples) == 4 and report.skipped == {"too many images": 1}
    assert "d.json#4: too many images: 20, the model takes at most 16 per conversation" in report.summary()
    with pytest.raises(InputError, match="d.json#4: too many images"):
        read_source(DataSource(str(colours / "d.json")), strict=True, max_images=16)
    train(train_config(colours, tmp_path / "run", max_steps=2))
    assert "1 skipped (d.json#4: too many images: 20" in (tmp_path / "run" / "train.log").read_text()


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(colours, tmp_path):
    from sparkles.train.loop import train

    out = tmp_path / "run"
    train(train_config(colours, out))
    newest = out / "checkpoints" / "step-000004"
    weights = newest / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short, as by a full disk
    (out / "checkpoints" / "step-000002" / "rank-0.pt").unlink()  # and the older one lost its RNG file
    train(train_config(colours, out, max_steps=5), resume=True)
    log = (out / "train.log").read_text()
    assert "checkpoint" in log and "step-000004 is damaged" in log and "falling back to the one before it" in log
    assert "resuming from" in log and "step-000002 (step 2)" in log
    assert "has no rank-0.pt" in log and "starts fresh random streams" in log
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # steps 3 and 4 were trained again from step 2
    assert (out / "checkpoints" / "step-000005" / "state.json").is_file()


def test_every_checkpoint_damaged_is_a_checkpoint_error(tmp_path):
    from sparkles.train.resume import Dist, resume_point

    for step in (1, 2):
        folder = tmp_path / f"step-{step:06d}"
        folder.mkdir()
        (folder / "state.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        resume_point(tmp_path, Dist())
    assert resume_point(tmp_path / "none", Dist()) is None


# --- synth captions: BOM and invalid UTF-8 ---


def test_a_captions_file_with_a_bom_is_read(tmp_path):
    from sparkles.synth.store import read_json_records

    path = tmp_path / "captions.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"image_id": "1", "caption": "a red square"}]).encode())
    assert read_json_records(path) == [{"image_id": "1", "caption": "a red square"}]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"image_id": "1", "caption": "x"}\n{"image_id": "2", "caption": "y"}\n')
    assert len(read_json_records(jsonl)) == 2


def test_a_captions_file_with_invalid_utf8_names_the_file_and_offset(tmp_path):
    from sparkles.synth.store import read_captions

    path = tmp_path / "captions.json"
    path.write_bytes(b'[{"image_id": "1",\n "caption": "caf\xe9"}]')
    with pytest.raises(InputError, match=r"captions.json: expected UTF-8 text, got byte 0xe9 at byte offset 35 "
                                         r"\(line 2\)"):
        read_captions(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # with a BOM, the offset still counts from the file's start
    with pytest.raises(InputError, match=r"byte offset 38 \(line 2\)"):
        read_captions(path)


def test_pixels_given_as_io_are_not_files():
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).pixels.size == (8, 8)


def test_checkpoint_files_and_folders_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    import torch

    from sparkles.train import resume

    synced, real = [], resume.fsync

    def record(path):
        synced.append((path.relative_to(tmp_path).as_posix(), (tmp_path / "step-000001").exists()))
        real(path)

    monkeypatch.setattr(resume, "fsync", record)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    resume.save_training_state(tmp_path, 1, dist=resume.Dist(), weights={"w": torch.zeros(2)}, optimizer=optimizer,
                               scheduler=scheduler, position=3, keep_last=2, sharded=False)
    tmp = ".tmp-step-000001"
    assert synced == [(f"{tmp}/rank-0.pt", False), (f"{tmp}/weights.safetensors", False),
                      (f"{tmp}/optimizer.pt", False), (f"{tmp}/state.json", False), (tmp, False), (".", True)]
    point = resume.resume_point(tmp_path, resume.Dist())
    assert point.state == {"step": 1, "position": 3, "world": 1, "seconds": 0.0} and set(point.weights) == {"w"}


def test_repair_tail_finds_the_last_newline_across_blocks(tmp_path):
    path = tmp_path / "big.jsonl"
    head = b'{"id": 1}\n'
    path.write_bytes(head + b"x" * 200_000)  # a torn line longer than the block read from the end
    assert repair_tail(path, warn=False) and path.read_bytes() == head
    path.write_bytes(b"y" * 70_000)
    assert repair_tail(path, warn=False) and path.read_bytes() == b""
