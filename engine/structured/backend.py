"""The grammar-backend interface: compile a spec into a grammar, match one request's tokens.

    StructuredOutputsParams --Backend.compile--> CompiledGrammar --.matcher()--> GrammarMatcher
                                                  (shared, cached)              (one per request)

A matcher follows one request's output tokens (`accept_token`) and, before each sample, fills
that request's row of the batch's allowed-token bitmask: (N, cdiv(V, 32)) int32, bit t of row i
set when token t may come next (V = the model's vocab size, which may exceed the tokenizer's).
EOS is among the allowed tokens only where the grammar may end; after EOS the matcher is
terminated. Backends register by name in `engine.structured.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.structured_outputs import StructuredOutputsParams

if TYPE_CHECKING:  # the registry, and so the CLI's backend names, load without torch
    import torch


class GrammarCompileError(ValueError):
    """A spec a backend cannot compile: the message names the field and has the backend's
    complaint (the API layer answers it with a 400)."""

    def __init__(self, params: StructuredOutputsParams, backend: str, reason: str) -> None:
        self.field = f"structured_outputs.{params.kind}"
        self.backend = backend
        self.reason = reason
        super().__init__(f"{self.field}: the {backend} backend cannot compile it: {reason}")


class GrammarCompileTimeoutError(ValueError):
    """A request's grammar did not compile within `timeout_s` seconds of the request's
    arrival (`StructuredOutputsConfig.compile_timeout_s`); answered as a compile error is."""

    def __init__(self, field: str, timeout_s: float) -> None:
        self.field = field
        self.timeout_s = timeout_s
        super().__init__(f"{field}: grammar compile timed out after {timeout_s:g} s")


@dataclass(frozen=True, slots=True)
class TokenizerData:
    """What backends need of the model's tokenizer, built once per engine.

    `vocab_size` is the model's (its logits' width), at least the tokenizer's length.
    `eos_token_ids` are the ids that end generation (the model config's)."""

    tokenizer: Any  # a Hugging Face fast tokenizer
    vocab_size: int
    eos_token_ids: tuple[int, ...]


class GrammarMatcher(ABC):
    """One request's position in a compiled grammar."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by `token_id`; False (state unchanged) when the grammar does not allow it."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` ((N, cdiv(V, 32)) int32, CPU)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar has ended (an EOS was accepted where it may end)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> bool:
        """Undo the last `num_tokens` accepted tokens; False when the backend cannot (the caller
        then resets and replays)."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the grammar's start, as if no token had been accepted."""


class CompiledGrammar(ABC):
    """A compiled spec; immutable and shared by every request with the same spec."""

    backend: str

    @abstractmethod
    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the grammar's start."""


class StructuredOutputBackend(ABC):
    """Compiles `StructuredOutputsParams` for one tokenizer. `compile` may run on any thread."""

    name: str

    def __init__(self, tokenizer: TokenizerData) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The grammar of `params`; GrammarCompileError when this backend cannot take it."""


def choice_as_ebnf(choices: Sequence[str]) -> str:
    """`root ::= "a" | "b"`: the choices as an EBNF grammar (JSON string escapes)."""
    import json

    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
