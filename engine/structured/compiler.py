"""Grammar compilation off the engine step: a thread pool in front of an LRU cache.

`submit` returns at once with a future; a request waits (`RequestStatus.WAITING_FOR_GRAMMAR`)
until it is done while the batch runs on. Equal specs (same backend, constraint and options)
share one compile and one cached grammar; failures are not cached.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import CompiledGrammar
from engine.structured.registry import Backends


@dataclass(slots=True)
class CompileStats:
    """Counts since start; `compile_seconds` is the summed wall time of finished compiles."""

    hits: int = 0  # cached grammar, or a compile of the same spec already under way
    misses: int = 0
    failures: int = 0
    compile_seconds: float = 0.0


class GrammarCompiler:
    """Compiles specs with `backend` (a name in the registry, or "auto") on `max_workers`
    threads, keeping the `cache_size` most recently used grammars."""

    def __init__(
        self, backends: Backends, backend: str, cache_size: int = 256, max_workers: int = 2
    ) -> None:
        self.backends = backends
        self.backend = backend
        self.cache_size = cache_size
        self.stats = CompileStats()
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
            grammar = self.backends.compile(self.backend, params)
        except BaseException:
            with self._lock:
                self.stats.failures += 1
                self._compiling.pop(key, None)
            raise
        with self._lock:
            self.stats.compile_seconds += time.perf_counter() - start
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self._compiling.pop(key, None)
        return grammar

    def num_cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def shutdown(self) -> None:
        """Stop the threads (compiles under way finish first)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
