"""Multi-turn chat sessions whose history grows turn by turn.

`num_requests` requests form ceil(num_requests / num_turns) sessions of `num_turns` turns (the
last session may be shorter). Each turn is one new user message of `question_words` words
(spread by +/- `range_ratio`) drawn from a fixed list of common English words, so the text is
tokenizer-independent (about one token per word with most tokenizers); a session's first turn
may start with a system message of `system_words` words. At run time turn k is sent after turn
k-1 finished, as the whole conversation so far: every earlier message, each answer as an
assistant message, then the new question (the way vLLM's multi-turn benchmark does it). A
worker that kept the session's KV cache serves turn k's history from its prefix cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.synthetic import request_rng, uniform_lengths
from bench.workload import BenchRequest, Message

_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy process music market sense nation plan college interest "
    "death experience effect use class control care field development role effort rate heart "
    "drug show leader light voice wife police mind price report decision son view relationship "
    "town road arm difference value building action model season society tax director position "
    "player record paper space ground form event official matter center couple site project "
    "activity star table need court oil situation cost industry figure street image phone data "
    "picture practice piece land product doctor wall patient worker news test movie north love "
    "support technology step baby computer type attention film tree source organization hair "
    "window evidence population truth river garden ocean mountain cloud energy signal"
)
WORDS = tuple(_WORD_TEXT.split())


def random_text(rng: np.random.Generator, num_words: int) -> str:
    """`num_words` words from WORDS, space-separated, the first capitalised, ending with '?'."""
    picks = rng.integers(0, len(WORDS), size=num_words)
    text = " ".join(WORDS[i] for i in picks)
    return text[:1].upper() + text[1:] + "?"


@dataclass(slots=True)
class MultiTurn:
    """Chat sessions of `num_turns` turns; each turn's prompt is only its new messages."""

    num_turns: int = 4
    question_words: int = 48
    system_words: int = 0
    output_len: int = 64
    range_ratio: float = 0.0
    name: str = "multiturn"

    def generate(self, num_requests: int, seed: int, vocab_size: int | None) -> list[BenchRequest]:
        if self.num_turns < 1:
            raise ValueError(f"num_turns must be >= 1, got {self.num_turns}")
        rng = np.random.default_rng(seed)
        words = uniform_lengths(rng, self.question_words, self.range_ratio, num_requests)
        outputs = uniform_lengths(rng, self.output_len, self.range_ratio, num_requests)
        requests = []
        for i in range(num_requests):
            session, turn = divmod(i, self.num_turns)
            text_rng = request_rng(seed, i)
            messages: list[Message] = []
            if turn == 0 and self.system_words > 0:
                system = random_text(text_rng, self.system_words)
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": random_text(text_rng, int(words[i]))})
            requests.append(BenchRequest(i, messages, int(outputs[i]), session=session, turn=turn))
        return requests

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def num_sessions(num_requests: int, num_turns: int) -> int:
    """Sessions needed for `num_requests` turns of at most `num_turns` each."""
    return math.ceil(num_requests / num_turns)
