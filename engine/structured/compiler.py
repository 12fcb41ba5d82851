"""Grammar compilation off the engine step: a thread pool in front of an LRU cache.

`submit` returns at once with a future; a request waits (`RequestStatus.WAITING_FOR_GRAMMAR`)
until it is done while the batch runs on. Equal specs (same backend, constraint and options)
share one compile and one cached grammar; failures are not cached. A compile cannot be stopped:
one its request gave up on (timed out, aborted) runs on and its grammar is cached.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import CompiledGrammar
from engine.structured.registry import Backends

# Told of each finished compile: the grammar (its `.backend` compiled it) and its wall time (s).
CompileListener = Callable[[CompiledGrammar, float], None]


@dataclass(slots=True)
class CompileStats:
    """Counts since start; `compile_seconds` is the summed wall time of finished compiles.

    Written on the compile threads and the engine thread, read anywhere (a reader may see a
    count a moment old); `compiles` and `requests` are keyed by the backend that compiled the
    grammar (under `auto`, the one that took it)."""

    hits: int = 0  # cached grammar, or a compile of the same spec already under way
    misses: int = 0
    failures: int = 0  # compiles no backend could do (GrammarCompileError)
    timeouts: int = 0  # requests ended because their grammar was not ready in time
    compile_seconds: float = 0.0
    compiles: dict[str, int] = field(default_factory=dict)  # finished compiles
    requests: dict[str, int] = field(default_factory=dict)  # requests generating under one


class GrammarCompiler:
    """Compiles specs with `backend` (a name in the registry, or "auto", falling back unless
    `fallback` is False) on `max_workers` threads, keeping the `cache_size` most recently used
    grammars. `on_compiled` hears of each finished compile, on the compile thread."""

    def __init__(
        self,
        backends: Backends,
        backend: str,
        cache_size: int = 256,
        max_workers: int = 2,
        fallback: bool = True,
        stats: CompileStats | None = None,
        on_compiled: CompileListener | None = None,
    ) -> None:
        self.backends = backends
        self.backend = backend
        self.fallback = fallback
        self.cache_size = cache_size
        self.stats = CompileStats() if stats is None else stats
        self.on_compiled = on_compiled
        self._cache: OrderedDict[Hashable, CompiledGrammar] = OrderedDict()
        self._compiling: dict[Hashable, Future[CompiledGrammar]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar-compile")

    def submit(self, params: StructuredOutputsParams) -> Future[CompiledGrammar]:
        """The grammar of `params`: a done future on a cache hit, else one a thread fulfils
        (with GrammarCompileError when the backend cannot take the spec)."""
        key = (self.backend, params.cache_key())
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
                done: Future[CompiledGrammar] = Future()
                done.set_result(grammar)
                return done
            future = self._compiling.get(key)
            if future is not None:
                self.stats.hits += 1
                return future
            self.stats.misses += 1
            future = self._compiling[key] = self._pool.submit(self._compile, key, params)
            return future

    def _compile(self, key: Hashable, params: StructuredOutputsParams) -> CompiledGrammar:
        start = time.perf_counter()
        try:
            grammar = self.backends.compile(self.backend, params, self.fallback)
        except BaseException:
            with self._lock:
                self.stats.failures += 1
                self._compiling.pop(key, None)
            raise
        seconds = time.perf_counter() - start
        with self._lock:
            stats = self.stats
            stats.compile_seconds += seconds
            stats.compiles[grammar.backend] = stats.compiles.get(grammar.backend, 0) + 1
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self._compiling.pop(key, None)
        if self.on_compiled is not None:
            self.on_compiled(grammar, seconds)
        return grammar

    def num_cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def shutdown(self) -> None:
        """Stop the threads (compiles under way finish first)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
