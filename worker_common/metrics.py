"""A worker's Prometheus metrics, named like vLLM's with a `baton:` prefix."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.async_core import AsyncEngineCore
from engine.core import EngineCore
from engine.outputs import EngineCoreOutput
from engine.spec_decode.stats import SpecDecodeStats
from engine.structured.backend import CompiledGrammar
from engine.structured.compiler import CompileStats
from engine.structured.manager import StructuredOutputManager

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_COMPILE_BUCKETS = (0.001, *_LATENCY_BUCKETS)


class WorkerMetrics:
    """Engine gauges refreshed every step, plus token counters and KV-transfer figures."""

    def __init__(self, role: str, model: str, registry: CollectorRegistry = REGISTRY) -> None:
        labels = {"role": role, "model_name": model}
        names = list(labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"baton:{name}", doc, names, registry=registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"baton:{name}", doc, names, registry=registry).labels(**labels)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(
                f"baton:{name}", doc, names, buckets=_LATENCY_BUCKETS, registry=registry
            ).labels(**labels)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.reserved = gauge("num_requests_reserved", "Decode reservations waiting for KV.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found cached.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Requests preempted (KV freed, recomputed).")
        self.step_seconds = histogram("engine_step_seconds", "Time of one engine step.")
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduling, in this worker."
        )
        self.kv_transfer_bytes = counter("kv_transfer_bytes", "KV bytes pushed or received.")
        self.kv_transfer_seconds = histogram("kv_transfer_seconds", "Time of one KV transfer.")
        self.kv_transfer_failures = counter("kv_transfer_failures", "KV pushes that failed.")
        self._queries = self._hits = self._preemptions = 0
        self._labels, self._registry = labels, registry

    def export_config(self, core: EngineCore) -> None:
        """The configuration the engine runs with, as info gauges (value 1, settings as labels),
        as vLLM's `vllm:cache_config_info`: `baton:cache_config_info` (num_gpu_blocks is the
        number of KV blocks allocated, on any device) and `baton:engine_config_info` (with the
        kernels that run: `engine.layers.Kernels.describe`, and the structured-outputs settings)."""
        config = core.config
        cache = {
            "block_size": config.cache.block_size,
            "gpu_memory_utilization": config.cache.gpu_memory_utilization,
            "enable_prefix_caching": config.cache.enable_prefix_caching,
            "kv_cache_memory_bytes": config.cache.kv_cache_memory_bytes,
            "num_gpu_blocks": core.runner.num_blocks,
        }
        engine = {
            "served_model_name": config.model.served_model_name,
            "dtype": str(config.model.dtype).removeprefix("torch."),
            "max_model_len": config.model.max_model_len,
            "seed": config.seed,
            "enforce_eager": config.enforce_eager,
            "device": config.device,
            "max_num_seqs": config.scheduler.max_num_seqs,
            "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
            "max_num_waiting": config.scheduler.max_num_waiting,
            "scheduling_policy": config.scheduler.policy,
            "async_scheduling": core.async_scheduling,
            **core.runner.kernels.describe(),
            "structured_outputs_backend": config.structured_outputs.backend,
            "structured_outputs_disable_fallback": config.structured_outputs.disable_fallback,
            "structured_outputs_compile_timeout_s": config.structured_outputs.compile_timeout_s,
        }
        for name, info in (("cache_config_info", cache), ("engine_config_info", engine)):
            labels = {**self._labels, **{key: str(value) for key, value in info.items()}}
            doc = f"The worker's {name.split('_')[0]} configuration (labels; value 1)."
            info_gauge = Gauge(f"baton:{name}", doc, list(labels), registry=self._registry)
            info_gauge.labels(**labels).set(1)

    def attach(self, engine: AsyncEngineCore) -> None:
        """Refresh from the engine after every step (called on the engine thread)."""

        def on_step(outputs: list[EngineCoreOutput], seconds: float) -> None:
            load = engine.load
            self.running.set(load.num_running)
            self.waiting.set(load.num_waiting)
            self.reserved.set(load.num_reserved)
            self.kv_usage.set(load.kv_usage)
            self.prefix_queries.inc(load.prefix_cache_queries - self._queries)
            self.prefix_hits.inc(load.prefix_cache_hits - self._hits)
            self._queries, self._hits = load.prefix_cache_queries, load.prefix_cache_hits
            self.preemptions.inc(load.num_preemptions - self._preemptions)
            self._preemptions = load.num_preemptions
            self.generation_tokens.inc(sum(len(o.new_token_ids) for o in outputs))
            self.step_seconds.observe(seconds)
            for out in outputs:
                if out.queue_time_s is not None:
                    self.queue_time.observe(out.queue_time_s)

        engine.on_step = on_step

    def watch_structured_outputs(self, structured: StructuredOutputManager) -> None:
        """The engine's grammar compiles: `baton:structured_outputs_compile_seconds{backend}`
        observed as each finishes (on its compile thread), and counters of compile-cache
        queries and hits, failed and timed-out compiles, and structured requests by backend,
        read from the engine's `CompileStats` when scraped."""
        labels = self._labels
        seconds = Histogram(
            "baton:structured_outputs_compile_seconds",
            "Wall time of one grammar compile, by the backend that compiled it.",
            [*labels, "backend"],
            buckets=_COMPILE_BUCKETS,
            registry=self._registry,
        )

        def on_compiled(grammar: CompiledGrammar, wall_s: float) -> None:
            seconds.labels(**labels, backend=grammar.backend).observe(wall_s)

        structured.on_compiled = on_compiled
        self._registry.register(StructuredOutputsCounters(structured.stats, labels))


    def watch_spec_decode(self, stats: SpecDecodeStats) -> None:
        """Speculative decoding's counters, named as vLLM's, read from the engine's
        `SpecDecodeStats` when scraped."""
        self._registry.register(SpecDecodeCounters(stats, self._labels))


class SpecDecodeCounters(Collector):
    """`baton:spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens` and
    `..._num_accepted_tokens_per_pos{position}` (vLLM's names)."""

    def __init__(self, stats: SpecDecodeStats, labels: dict[str, str]) -> None:
        self.stats = stats
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        stats, names, values = self.stats, list(self.labels), list(self.labels.values())
        for name, doc, value in (
            ("num_drafts", "Verify passes of a request with drafts.", stats.num_drafts),
            ("num_draft_tokens", "Draft tokens verified.", stats.num_draft_tokens),
            ("num_accepted_tokens", "Draft tokens accepted.", stats.num_accepted_tokens),
        ):
            family = CounterMetricFamily(f"baton:spec_decode_{name}", doc, labels=names)
            family.add_metric(values, value)
            yield family
        per_pos = CounterMetricFamily(
            "baton:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft (0: the first).",
            labels=[*names, "position"],
        )
        for position, count in enumerate(list(stats.accepted_per_pos)):
            per_pos.add_metric([*values, str(position)], count)
        yield per_pos


class StructuredOutputsCounters(Collector):
    """Counters read from a `CompileStats` at each scrape (it counts since the engine
    started, on several threads: nothing to keep in step)."""

    def __init__(self, stats: CompileStats, labels: dict[str, str]) -> None:
        self.stats = stats
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        stats, names, values = self.stats, list(self.labels), list(self.labels.values())
        for name, doc, value in (
            ("compile_cache_queries", "Grammar lookups (one per structured request).",
             stats.hits + stats.misses),
            ("compile_cache_hits", "Lookups that found the grammar cached or compiling.",
             stats.hits),
            ("compile_failures", "Grammar compiles that failed: no backend took the spec.",
             stats.failures),
            ("compile_timeouts", "Requests ended because their grammar did not compile in "
             "time (--structured-outputs-compile-timeout).", stats.timeouts),
        ):  # fmt: skip
            family = CounterMetricFamily(f"baton:structured_outputs_{name}", doc, labels=names)
            family.add_metric(values, value)
            yield family
        requests = CounterMetricFamily(
            "baton:structured_outputs_requests",
            "Structured requests, by the backend whose grammar they generated under.",
            labels=[*names, "backend"],
        )
        for backend, count in sorted(dict(stats.requests).items()):
            requests.add_metric([*values, backend], count)
        yield requests
