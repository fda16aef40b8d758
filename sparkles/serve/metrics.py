"""GET /metrics: the server's metrics in Prometheus's text format, for a scraper and a dashboard.

Each request is measured from the moment the server has it (histograms): the time to the first text the client
gets, the time a token after that, the whole request, and the parts before generation (preparing: the body read,
images loaded, text tokenized; queueing: waiting to join the batch); its prompt and generated tokens. Counters: the
requests that ended, by how (stop, length, cancelled, error), and the ones refused before generating, by HTTP
status. Read at each scrape, the counts `/health` shows: the batch (running, waiting), the prefix cache (hits,
misses, positions reused, bytes held, entries stored and evicted), the image cache, prompt lookup, the workers that
prepare requests and the request bodies in flight.

Names follow Prometheus's rules (base units, `_total` for counters) and vLLM's where it has the same measure
(`sparkles_time_to_first_token_seconds` is its `vllm:time_to_first_token_seconds`), each labelled with the model's
name. Every app has its own registry, so several servers in one process (the tests, the benchmarks) keep their
counts apart.
"""

from __future__ import annotations

import time

from ..image_cache import KINDS
from ..request import Event, Request

# Seconds: from a small model's first token on a GPU to a long answer on a busy CPU.
TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The per-request measures, filled by the server as requests end, and a collector of the live counts of
    `engine`, the two worker pools and the body budget (their `stats()`), read at each scrape."""

    def __init__(self, model_name: str, engine, workers, light, bodies, images=None):
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        disable_created_metrics()  # no `_created` series beside every counter: a dashboard never reads them
        self.registry, self.model = CollectorRegistry(), model_name
        self._sources, self._images = (engine, workers, light, bodies), images

        def histogram(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = histogram("sparkles_time_to_first_token_seconds",
                              "From the request's arrival to its first text sent to the client.", TIME_BUCKETS)
        self.tpot = histogram("sparkles_request_time_per_output_token_seconds",
                              "A request's time per generated token after its first text.", TOKEN_TIME_BUCKETS)
        self.e2e = histogram("sparkles_e2e_request_latency_seconds",
                             "From the request's arrival to its end.", TIME_BUCKETS)
        self.prepare = histogram("sparkles_request_prepare_seconds",
                                 "From arrival until queued: body read, images loaded, text tokenized.", TIME_BUCKETS)
        self.queue = histogram("sparkles_request_queue_time_seconds",
                               "Time queued before joining the batch.", TIME_BUCKETS)
        self.prompt = histogram("sparkles_request_prompt_tokens",
                                "Prompt tokens of a request, image tokens included.", TOKEN_BUCKETS)
        self.generated = histogram("sparkles_request_generation_tokens",
                                   "Tokens a request generated.", TOKEN_BUCKETS)
        self.ended = Counter("sparkles_request_finished", "Requests that ended, by how: stop, length, cancelled "
                             "(the client left) or error.", ["model_name", "finished_reason"], registry=self.registry)
        self.refused = Counter("sparkles_request_refused", "Requests answered with an error before generating, "
                               "by HTTP status.", ["model_name", "status"], registry=self.registry)
        self.prompt_total = Counter("sparkles_prompt_tokens", "Prompt tokens of ended requests.", ["model_name"],
                                    registry=self.registry).labels(model_name)
        self.generated_total = Counter("sparkles_generation_tokens", "Tokens generated for ended requests.",
                                       ["model_name"], registry=self.registry).labels(model_name)
        self.registry.register(self)

    def refuse(self, status: int) -> None:
        self.refused.labels(self.model, str(status)).inc()

    def finish(self, request: Request, arrived: float, last: Event | None) -> None:
        """Observe a request that ended: `last` its final event, else (the client left before it) None or the last
        event read."""
        end, final = request.ended or time.monotonic(), last is not None and last.finish_reason is not None
        self.ended.labels(self.model, last.finish_reason if final else "cancelled").inc()
        self.e2e.observe(end - arrived)
        self.prepare.observe(request.submitted - arrived)
        if request.started is not None:
            self.queue.observe(request.started - request.submitted)
        if request.first_text is not None:
            self.ttft.observe(request.first_text - arrived)
        if not final:
            return
        self.prompt.observe(last.prompt_tokens)
        self.generated.observe(last.completion_tokens)
        self.prompt_total.inc(last.prompt_tokens)
        self.generated_total.inc(last.completion_tokens)
        if request.first_text is not None and last.completion_tokens > 1:
            self.tpot.observe((end - request.first_text) / (last.completion_tokens - 1))

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

    def collect(self):
        """The live counts, as the registry asks for them at a scrape."""
        from prometheus_client.core import CounterMetricFamily as C
        from prometheus_client.core import GaugeMetricFamily as G

        engine, workers, light, bodies = self._sources
        stats, held = engine.stats(), bodies.stats()
        cache = stats["prefix_cache"]

        def family(kind, name, doc, value, label=None):
            """A gauge or counter (`kind`): one value, or with `label` a {label value: value} dict."""
            made = kind(name, doc, labels=["model_name"] + ([label] if label else []))
            for extra, v in value.items() if label else [(None, value)]:
                made.add_metric([self.model] + ([extra] if label else []), float(v))
            return made

        yield family(G, "sparkles_engine_up", "1 while the engine's thread runs, else 0.", engine.alive)
        yield family(G, "sparkles_num_requests_running", "Requests in the batch being decoded.", stats["running"])
        yield family(G, "sparkles_num_requests_waiting", "Requests queued to join the batch.", stats["waiting"])
        yield family(G, "sparkles_batch_peak", "The most rows the batch has held.", stats.get("peak_batch", 0))
        yield family(C, "sparkles_prefix_cache_hits", "Prompts that resumed from a held prefix.", cache["hits"])
        yield family(C, "sparkles_prefix_cache_misses", "Prompts with no held prefix.", cache["misses"])
        yield family(C, "sparkles_prefix_cache_reused_tokens", "Prompt positions taken from held prefixes instead of "
                     "prefilled.", cache["tokens_reused"])
        yield family(C, "sparkles_prefix_cache_stored", "Prefixes stored.", cache["stored"])
        yield family(C, "sparkles_prefix_cache_evicted", "Prefixes evicted to stay within the cache's bound.",
                     cache["evicted"])
        yield family(G, "sparkles_prefix_cache_entries", "Prefixes held.", cache["entries"])
        yield family(G, "sparkles_prefix_cache_bytes", "Memory the held prefixes take.", cache["bytes"])
        yield family(G, "sparkles_prefix_cache_capacity_bytes", "The prefix cache's bound (0: off).",
                     cache["capacity_bytes"])
        yield family(C, "sparkles_lookahead_steps", "Decoding steps that checked guessed tokens (prompt lookup).",
                     stats.get("lookahead_steps", 0))
        yield family(C, "sparkles_lookahead_tokens", "Tokens those steps gave.", stats.get("lookahead_tokens", 0))
        pools = {"heavy": workers.stats(), "light": light.stats()}
        for kind, name, doc, key in (
                (G, "sparkles_prepare_workers", "Threads that prepare requests (images, text).", "workers"),
                (G, "sparkles_prepare_busy", "Of those, the ones at work.", "busy"),
                (G, "sparkles_prepare_waiting", "Requests waiting for one.", "waiting"),
                (G, "sparkles_prepare_degraded", "1 where a request waited too long or every thread is stuck.",
                 "degraded"),
                (C, "sparkles_prepare_refused", "Requests refused for want of a thread.", "refused"),
                (C, "sparkles_prepare_abandoned", "Requests that gave up waiting.", "abandoned")):
            yield family(kind, name, doc, {pool: counts[key] for pool, counts in pools.items()}, "pool")
        if self._images is not None:
            images = self._images.stats()
            for outcome, doc in (("hits", "Images found decoded (pixels), preprocessed (inputs) or encoded "
                                  "(features) for an earlier request."),
                                 ("misses", "Images decoded, preprocessed or encoded anew.")):
                yield family(C, f"sparkles_image_cache_{outcome}", doc,
                             {kind: images[f"{kind}_{outcome}"] for kind in KINDS}, "kind")
            yield family(G, "sparkles_image_cache_bytes", "Memory the kept images take.", images["bytes"])
            yield family(G, "sparkles_image_cache_entries", "Decoded images, inputs and encodings kept.",
                         images["entries"])
            yield family(C, "sparkles_image_cache_evicted", "Entries evicted to stay within the bound.",
                         images["evicted"])
        yield family(G, "sparkles_body_bytes", "Bytes of request bodies being read, parsed or prepared.",
                     held["bytes"])
        yield family(G, "sparkles_body_limit_bytes", "The bound on those bytes.", held["limit"])
        yield family(G, "sparkles_body_peak_bytes", "The most those bytes have been.", held["peak"])
        yield family(C, "sparkles_body_refused", "Bodies refused for want of room.", held["refused"])
        yield family(C, "sparkles_body_timed_out", "Bodies that did not arrive in time.", held["timed_out"])
