"""What the server's image cache saves a request that resends its images: preparing the last turn of
bench_prefix.py's conversation (five images, as data: URLs) with a warm cache against none.

    python bench/bench_image_cache.py [--repeats 15] [--photos]

"Preparing" is what a server worker does before the engine sees the request: load every image under the server's
rules (base64, hash, decode, size checks) and render the prompt with the model's inputs made from the pixels
(`serve.images.load_request_images`, then `Engine.encode`). Then the images' encoding by the model's tower and
connector, which a request needs where the prefix cache does not hold them (its prompt differs before them). The
model is bench_prefix.py's (224 px inputs, a 4-layer ViT and a resampler). The variants alternate; medians of
`--repeats` rounds, this process's CPU time (one thread).
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_prefix  # noqa: E402 (run as a script: bench/ is on the path)
import torch
from bench_session import bench_model  # noqa: E402

from sparkles.formats import from_openai
from sparkles.generate import Chat
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
    model, processor = bench_model("cpu", "chat_template")
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
    # Where the prefix cache misses (the prompt differs before an image), the server's Chat still finds each image's
    # encoding in the cache: the tower and connector on the five images, against looking them up.
    chat, warm = Chat(model, processor), Chat(model, processor, image_cache=cache)
    with torch.inference_mode():
        fresh = chat.images(reference)
        warm.images(reference)  # kept once
        encode: dict[str, list[float]] = {"no cache": [], "cache": []}
        for r in range(args.repeats):
            for name in (("no cache", "cache") if r % 2 == 0 else ("cache", "no cache")):
                start = time.process_time()
                features = (warm if name == "cache" else chat).images(reference)
                encode[name].append(time.process_time() - start)
                assert features.equal(fresh), "the kept features differ from fresh ones"
    kind = "1024 x 768 JPEG photos" if args.photos else "96 px PNG drawings"
    print(f"the 4th turn's request ({seen} images, {kind}, {len(reference.rendered)} prompt tokens), one thread, CPU "
          f"time, median of {args.repeats} rounds\n")
    print("| step | no cache (ms) | warm cache (ms) | speed-up |\n|---|---:|---:|---:|")
    for name, measured in (("prepare: load the images, render, make the inputs", times),
                           ("encode the images (tower and connector)", encode)):
        plain, cached = (statistics.median(measured[k]) for k in ("no cache", "cache"))
        print(f"| {name} | {1000 * plain:.1f} | {1000 * cached:.2f} | {plain / cached:.1f}x |")
    print(f"\nsame model inputs and features both ways: yes; cache: {cache.stats()}")


if __name__ == "__main__":
    main()
