"""One benchmark request, and the interface every workload generator implements.

A workload is a list of `BenchRequest`s, made before the run from a seed, so two runs with the
same seed send the same requests. A prompt is one of three kinds, and the kind picks the API:

    list[int]             token ids  -> /v1/completions (prompt as ids), gRPC `token_ids`
    str                   text       -> /v1/completions, gRPC `text`
    list[dict[str, str]]  messages   -> /v1/chat/completions, gRPC `chat`

Multi-turn sessions: requests with the same `session` are that session's turns (`turn` = 0, 1,
...). Turn k is sent only after turn k-1 finished; its `prompt` holds only what is new in that
turn (the next user message), and the runner sends history + previous answer + it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from common.structured_outputs import StructuredOutputsParams

Message = dict[str, str]
Prompt = list[int] | str | list[Message]

# The generators' names (bench.workloads maps them to their classes).
WORKLOAD_NAMES = ("fixed", "sharegpt", "long", "prefix", "multiturn", "trace")

# Token ids below this are left out of synthetic prompts: tokenizers put their special and
# control tokens (bos, eos, chat markers) at the start of the vocabulary.
FIRST_ORDINARY_TOKEN_ID = 100


@dataclass(slots=True)
class BenchRequest:
    """One request to send.

    `max_tokens`: output tokens asked for (with eos ignored, exactly what comes back).
    `arrival_s`: offset from the start of the run, seconds; only traces carry one.
    `tenant`: an optional tenant name (gRPC `tenant`; shared-prefix workloads set it).
    `structured_outputs`: the constraint its answer must follow (bench.structured), if any.
    """

    index: int
    prompt: Prompt
    max_tokens: int
    arrival_s: float | None = None
    session: int | None = None
    turn: int = 0
    tenant: str = ""
    structured_outputs: StructuredOutputsParams | None = None


class Workload(Protocol):
    """A seeded generator of requests; `describe()` is what the result JSON records of it."""

    name: str

    def generate(self, num_requests: int, seed: int, vocab_size: int | None) -> list[BenchRequest]:
        """`num_requests` requests, the same ones for the same seed.

        `vocab_size` bounds token-id prompts (ids drawn from [FIRST_ORDINARY_TOKEN_ID, vocab));
        workloads of text or messages ignore it. Raises ValueError when it is needed and None.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """The generator's parameters, JSON-ready."""
        ...


def prompt_kind(prompt: Prompt) -> str:
    """'token_ids', 'text' or 'messages'."""
    if isinstance(prompt, str):
        return "text"
    if prompt and isinstance(prompt[0], dict):
        return "messages"
    return "token_ids"


def require_vocab(vocab_size: int | None, workload: str) -> int:
    """The vocabulary size, or a ValueError saying how to give it."""
    if vocab_size is None:
        raise ValueError(
            f"the {workload} workload sends token ids and needs the vocabulary size: "
            "give --model-dir DIR (its config.json) or --vocab-size N"
        )
    if vocab_size <= FIRST_ORDINARY_TOKEN_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token ids")
    return vocab_size
