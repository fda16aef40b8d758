"""What an image's bytes give, kept for the next request that sends the same bytes: its decoded pixels
(`image.load_image`), its model inputs (`Processor.pixel_values`) and its encoding by the model's tower and
connector (`Chat.encode`), keyed by the SHA-256 of those bytes.

An OpenAI client sends every image of a conversation again with every turn. The prefix cache spares their encoding
and prefill, but each request would still decode each image and resize it to the model's inputs: some 30 ms for a
1024 x 768 JPEG on one core, every image, every turn. With this cache a turn decodes and preprocesses only its new
images; the others cost their base64 decoding and hashing (about 1 ms). And where the prefix cache cannot help (a
prompt that differs before the image: an edited first message, a question asked before the image), the image's
encoding is still found here.

Bounded by bytes (least recently used out first) and safe across the server's worker threads. Its values are shared
by every request that finds them, so nothing may change them in place: PIL images are converted and resized into
new ones, and tensors are stacked into a new batch.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable

KINDS = ("pixels", "inputs", "features")  # what is kept of an image: the first item of every key


class ImageCache:
    """A bounded LRU keyed by (kind, ..., sha256); `max_bytes` 0 keeps nothing."""

    def __init__(self, max_bytes: int):
        self.capacity = max(0, int(max_bytes))
        self._entries: collections.OrderedDict[Hashable, tuple[object, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.counts = collections.Counter()  # <kind>_hits, <kind>_misses, evicted

    def get(self, key: tuple) -> object | None:
        with self._lock:
            held = self._entries.get(key)
            self.counts[f"{key[0]}_{'misses' if held is None else 'hits'}"] += 1
            if held is None:
                return None
            self._entries.move_to_end(key)
            return held[0]

    def put(self, key: tuple, value: object, nbytes: int) -> None:
        """Keep `value` (`nbytes` of memory), evicting the least recently used; one larger than the whole cache is
        not kept."""
        if nbytes > self.capacity:
            return
        with self._lock:
            if key in self._entries:
                self.nbytes -= self._entries.pop(key)[1]
            while self._entries and self.nbytes + nbytes > self.capacity:
                self.nbytes -= self._entries.popitem(last=False)[1][1]
                self.counts["evicted"] += 1
            self._entries[key] = (value, nbytes)
            self.nbytes += nbytes

    def get_or_make(self, key: tuple, make: Callable[[], object], size: Callable[[object], int]) -> object:
        """The value held for `key`, or `make()` kept for next time. Two threads missing the same key at once both
        make it: the values are equal, and making is not worth a lock held that long."""
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value, size(value))
        return value

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.nbytes, "capacity_bytes": self.capacity,
                    **{f"{kind}_{k}": self.counts[f"{kind}_{k}"] for kind in KINDS for k in ("hits", "misses")},
                    "evicted": self.counts["evicted"]}
