"""What the server's image cache saves a request that resends its images: preparing the last turn of
bench_prefix.py's conversation (five images, as data: URLs) with a warm cache against none.

    python bench/bench_image_cache.py [--repeats 15] [--photos]

"Preparing" is what a server worker does before the engine sees the request: load every image under the server's
rules (base64, hash, decode, size checks) and render the prompt with the model's inputs made from the pixels
(`serve.images.load_request_images`, then `Engine.encode`). The model is bench_prefix.py's (224 px inputs). The
variants alternate; medians of `--repeats` rounds, this process's CPU time (one thread).
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_prefix  # noqa: E402 (run as a script: bench/ is on the path)
import torch
from bench_session import bench_model  # noqa: E402

from sparkles.formats import from_openai
from sparkles.image_cache import ImageCache
from sparkles.serve.images import load_request_images
from sparkles.serve.server import ServeConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--photos", action="store_true", help="1024 x 768 JPEG photos instead of 96 px drawings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_prefix.PHOTOS = args.photos
    _, processor = bench_model("cpu", "chat_template")
    messages = [{"role": "system", "content": bench_prefix.SYSTEM}]
    seen = 0
    for text, count in bench_prefix.TURNS:
        messages.append(bench_prefix.user_turn(text, [bench_prefix.image_url(seen + k) for k in range(count)]))
        messages.append({"role": "assistant", "content": "An answer."})
        seen += count
    conversation = from_openai(messages[:-1])
    config, cache = ServeConfig(), ImageCache(int(ServeConfig.image_cache_mb * 2**20))

    def prepare(held: ImageCache | None):
        loaded = load_request_images(conversation, config, 16, cache=held)
        return processor.encode(loaded, generation=True, cache=held)

    reference = prepare(None)
    prepare(cache)  # the earlier turns' requests: every image decoded and kept once
    times: dict[str, list[float]] = {"no cache": [], "cache": []}
    for r in range(args.repeats):
        for name in (("no cache", "cache") if r % 2 == 0 else ("cache", "no cache")):
            start = time.process_time()
            encoded = prepare(cache if name == "cache" else None)
            times[name].append(time.process_time() - start)
            assert encoded.pixel_values.equal(reference.pixel_values), "the kept inputs differ from fresh ones"
    plain, cached = (statistics.median(times[k]) for k in ("no cache", "cache"))
    kind = "1024 x 768 JPEG photos" if args.photos else "96 px PNG drawings"
    print(f"preparing the 4th turn's request ({seen} images, {kind}, {len(reference.rendered)} prompt tokens), one "
          f"thread, CPU time, median of {args.repeats} rounds\n")
    print("| image cache | prepare (ms) | vs none |\n|---|---:|---:|")
    print(f"| none | {1000 * plain:.1f} | 1.00x |\n| warm | {1000 * cached:.1f} | {plain / cached:.2f}x |")
    print(f"\nsame model inputs both ways: yes; cache: {cache.stats()}")


if __name__ == "__main__":
    main()
