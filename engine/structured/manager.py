"""The engine's structured-outputs entry point: a request in, its grammar compiling."""

from __future__ import annotations

from engine.config import ModelConfig, StructuredOutputsConfig
from engine.request import Request
from engine.structured.backend import CompiledGrammar, TokenizerData
from engine.structured.compiler import CompileListener, CompileStats, GrammarCompiler
from engine.structured.matcher_state import RequestGrammar
from engine.structured.reasoning_end import ReasoningEnd
from engine.structured.registry import Backends
from engine.structured.vocabulary import decoded_vocab


class StructuredOutputManager:
    """Compiles the grammars of an engine's structured requests. The model's tokenizer is
    loaded, and the backends built, on the first structured request.

    `stats` counts from the start (metrics read it); `on_compiled`, when set, hears of each
    finished compile (the grammar and its wall time in seconds) on the compile thread."""

    def __init__(self, config: StructuredOutputsConfig, model: ModelConfig) -> None:
        self.config = config
        self.model = model
        self.stats = CompileStats()
        self.on_compiled: CompileListener | None = None
        self._compiler: GrammarCompiler | None = None
        self._data: TokenizerData | None = None
        self._vocab: list[bytes] | None = None  # token id -> text, for reasoning ends

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            from common.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.model.model)
            data = TokenizerData(
                tokenizer,
                vocab_size=self.model.vocab_size,  # the logits' width
                eos_token_ids=tuple(self.model.eos_token_ids),
            )
            self._data = data
            self._compiler = GrammarCompiler(
                Backends(data),
                self.config.backend,
                cache_size=self.config.cache_size,
                max_workers=self.config.compile_workers,
                fallback=not self.config.disable_fallback,
                stats=self.stats,
                on_compiled=self._compiled,
            )
        return self._compiler

    def _compiled(self, grammar: CompiledGrammar, seconds: float) -> None:
        if self.on_compiled is not None:
            self.on_compiled(grammar, seconds)

    def attach(self, request: Request) -> None:
        """Start compiling `request`'s grammar (a cache hit is ready at once); a request
        without structured outputs, or with its grammar already attached, is left alone. The
        request gives up on it `compile_timeout_s` from now."""
        spec = request.params.structured_outputs
        if spec is not None and request.grammar is None:
            request.grammar = RequestGrammar(
                self.compiler.submit(spec),
                field=f"structured_outputs.{spec.kind}",
                timeout_s=self.config.compile_timeout_s,
                stats=self.stats,
                reasoning_end=self._reasoning_end(spec.reasoning_end),
            )

    def _reasoning_end(self, token_ids: tuple[int, ...]) -> ReasoningEnd | None:
        """The end marker whose canonical tokens are `token_ids`, matched by its text (None
        when the grammar applies from the first token)."""
        if not token_ids:
            return None
        if self._vocab is None:
            assert self._data is not None  # the compiler is built before this is asked
            self._vocab = decoded_vocab(self._data)
        return ReasoningEnd.of_tokens(token_ids, self._vocab)

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
