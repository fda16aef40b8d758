"""Small synthetic evaluation folders in the original layouts (annotations/*.json + images/), solid-colour images."""

import json
from pathlib import Path

from PIL import Image as PILImage

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "gray", "pink"]


def _image(path: Path, color: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (48, 40), color).save(path)


def _annotations(root: Path, name: str, items: list) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"sparkles_evaluation_{name}_annotations.json").write_text(json.dumps(items, indent=1))
    return root


def bison(root: Path, n: int = 4) -> Path:
    items = []
    for i in range(n):
        a, b = COLORS[(2 * i) % len(COLORS)], COLORS[(2 * i + 1) % len(COLORS)]
        files = [f"COCO_val2014_{1000 + 2 * i:012d}.jpg", f"COCO_val2014_{1001 + 2 * i:012d}.jpg"]
        for f, color in zip(files, (a, b)):
            _image(root / "images" / f, color)
        true_id = 1000 + 2 * i + (i % 2)  # alternate: the answer is IMAGE#1, then IMAGE#2
        items.append({"evaluation_id": i, "caption": f"a plain {[a, b][i % 2]} picture", "true_image_id": true_id,
                      "bison_id": 50 + i, "image_candidates": [{"image_id": 1000 + 2 * i, "image_filename": files[0]},
                                                               {"image_id": 1001 + 2 * i, "image_filename": files[1]}]})
    return _annotations(root, "bison", items[::-1])  # out of order on purpose: tasks sort by evaluation_id


def nlvr2(root: Path, n: int = 4) -> Path:
    items = []
    for i in range(n):
        stem = f"test1-{10 + i}-{i % 3}"
        for k in (0, 1):
            _image(root / "images" / f"{stem}-img{k}.png", COLORS[(i + k) % len(COLORS)])
        items.append({"evaluation_id": i, "identifier": f"{stem}-{i % 2}", "label": ["True", "False"][i % 2],
                      "sentence": f"The left image is {COLORS[i % len(COLORS)]}.", "synset": "color"})
    return _annotations(root, "nlvr2", items)


def sparkleseval(root: Path, n: int = 3) -> Path:
    items = []
    for i in range(n):
        ids = [2350000 + 10 * i + k for k in range(3 + i % 2)]
        for k, image_id in enumerate(ids):
            _image(root / "images" / f"{image_id}.jpg", COLORS[(i + k) % len(COLORS)])
        first, second = ids[:-1], ids[-1:]
        slots = " and ".join(f"IMAGE#{x}<Img><ImageHere></Img>" for x in first)
        images = [{"image_id": x, "caption": f"A plain {COLORS[(i + k) % len(COLORS)]} square."} for k, x in
                  enumerate(ids)]
        items.append({"evaluation_id": str(i), "dialogue": [
            {"role": "user", "content": f"Compare {slots}. What differs?", "images": images[:len(first)]},
            {"role": "assistant", "content": f"Reference answer one for item {i}."},
            {"role": "user", "content": f"Does IMAGE#{second[0]}<Img><ImageHere></Img> match IMAGE#{first[0]}?",
             "images": images[len(first):]},
            {"role": "assistant", "content": f"Reference answer two for item {i}."}]})
    return _annotations(root, "sparkleseval", items)


# A local OpenAI-compatible endpoint on 127.0.0.1, answering from a script: reply(request_body, call_number).

import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402


@contextmanager
def endpoint(reply):
    """Serve POST /v1/chat/completions; `reply(body, n)` returns text, or (status, text) for an HTTP error.

    Yields (base_url, calls): `calls` lists every request body received, in order.
    """
    calls, lock = [], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                calls.append(body)
                n = len(calls)
            out = reply(body, n)
            status, text = out if isinstance(out, tuple) else (200, out)
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                            "finish_reason": "stop"}], "model": body["model"]}) if status == 200 \
                else text
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data.encode())))
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", calls
    finally:
        server.shutdown()
        server.server_close()


def judge_text(a1, c1, a2, c2, *, brackets=True):
    """A reply in the judge's requested format; `c1`/`c2` are the (C1, C2, C3) ratings of each answer."""
    r = (lambda x: f"[[{x}]]") if brackets else str
    why = ["The answer names the objects in both images correctly and relates the kitchen to the office.",
           "It keeps IMAGE#1 and IMAGE#2 apart across both turns without mixing them up.",
           "Both questions are answered directly, with reasons drawn from the images."]
    parts = []
    for name, overall, scores in (("A1", a1, c1), ("A2", a2, c2)):
        parts.append(f"* Evaluating {name}\n" + "".join(f'- (C{k + 1}) Explanation: "{why[k]}" Rating: {r(s)}\n'
                                                        for k, s in enumerate(scores))
                     + f"Therefore, the overall rating of {name} is {r(overall)}\n")
    return "\n".join(parts)
