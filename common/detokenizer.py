"""Incremental detokenization and stop-string checking for one request (vLLM v1 semantics).

Text comes from the `tokenizers` library's `DecodeStream`, which buffers tokens until they
form valid UTF-8 and handles byte-level / metaspace decoders. Stop strings are searched only in
the newly added text plus the (longest stop - 1) characters before it. `TokenTexts` decodes
single tokens (the text shown beside logprobs).

A prompt given as token ids may end inside a character. As in vLLM's `detokenize_incrementally`,
that character is the prompt's (its text ends with U+FFFD for it): the answer starts after it,
whether the answer's first tokens complete it or not (`HeldCharacter`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from common.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# DecodeStream raises this when a tokenizer decodes non-monotonically (vLLM issue 17448).
_INVALID_PREFIX_ERROR = "Invalid prefix encountered"
# Prime the stream with at most this many prompt tokens (for leading-space context).
_MAX_PROMPT_CONTEXT = 24
_REPLACEMENT = "\ufffd"  # what a decode shows for bytes that are not (yet) a character


@dataclass(slots=True)
class HeldCharacter:
    """The end of a prompt that stops inside a character, held back from the stream until the
    answer's tokens complete or break that character.

    `prompt_text` is the decode of `token_ids`' prompt part: its last `replacements` characters
    are U+FFFD, for the prompt's incomplete bytes (one with byte-level decoders; one a byte with
    byte-fallback ones).
    """

    token_ids: list[int]  # the prompt's last tokens, then the answer's so far
    prompt_text: str
    replacements: int = field(init=False)

    def __post_init__(self) -> None:
        self.replacements = len(self.prompt_text) - len(self.prompt_text.rstrip(_REPLACEMENT))

    def answer_text(self, text: str) -> str:
        """The answer's part of `text` (the decode of `token_ids`, no longer ending inside a
        character): what follows the prompt's text and the character its bytes begin, which
        is either completed (one character) or stays `replacements` U+FFFD."""
        rest = text[len(self.prompt_text) - self.replacements :]
        return rest[self.replacements :] if rest.startswith(_REPLACEMENT) else rest[1:]


class IncrementalDetokenizer:
    """Turns one request's output token ids into text as they arrive, and checks stop strings.

    `output_text` is everything detokenized so far (truncated at a matched stop string); the
    stream accessor `get_next_output_text` holds back text that might begin a stop string.
    With `params.detokenize=False` it only records token ids.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
    ) -> None:
        self.token_ids: list[int] = []  # output token ids, including a final stop token
        self._output_text = ""
        self._last_output_offset = 0  # chars already returned by get_next_output_text(delta)
        assert isinstance(params.stop, list)
        self.stop: list[str] = params.stop
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.stop_buffer_length = (
            max(map(len, self.stop)) - 1 if self.stop and not self.include_stop_str_in_output else 0
        )
        self.detokenize = params.detokenize
        self.skip_special_tokens = params.skip_special_tokens
        self._tokenizer: Tokenizer = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        self._special_tokens = self._special_token_texts(params)
        self._last_was_special = False
        # The stream is primed with the prompt's end at the first output token, not here: a
        # batch of requests added at once (LLM.generate) reaches the GPU sooner, and the
        # priming runs while an asynchronous step computes.
        self._prompt_end: list[int] | None = (
            list(prompt_token_ids[-_MAX_PROMPT_CONTEXT:]) if self.detokenize else None
        )
        self._held: HeldCharacter | None = None  # the prompt ends inside a character
        # Text with no stop strings and no added-token spacing to mind: `update`'s short path,
        # once the stream is primed (and no prompt character is held).
        self._plain = self.detokenize and not self.stop and not self._special_tokens
        self._short_path = False

    def _special_token_texts(self, params: SamplingParams) -> dict[int, str]:
        # Only needed to drop the spaces the decoder puts between adjacent added tokens.
        if params.skip_special_tokens or params.spaces_between_special_tokens:
            return {}
        added = self._tokenizer.get_added_tokens_decoder()
        return {tid: tok.content for tid, tok in added.items()}

    def _prime(self, suffix: list[int]) -> None:
        # Decode the first output token in the context of a prompt suffix that ends on a
        # character boundary, so word-initial spaces come out as in a full decode.
        end = self._decode(suffix[-4:])  # holds the last character whole (4 bytes at most)
        if end.endswith(_REPLACEMENT) and (text := self._decode(suffix)).endswith(_REPLACEMENT):
            self._held = HeldCharacter(list(suffix), text)  # the stream waits for its end
            return
        if _REPLACEMENT not in end:
            suffix = suffix[-4:]
        for length in range(5, len(suffix) + 1):  # else further back, where no U+FFFD is
            if _REPLACEMENT not in self._decode(suffix[-length:]):
                suffix = suffix[-length:]
                break
        for token_id in suffix:
            self._step(token_id)
        self._short_path = self._plain

    def _step_held(self, held: HeldCharacter, token_id: int) -> str:
        # vLLM's detokenize_incrementally, until the prompt's last character is decided; then
        # the stream takes over, primed with the tokens so far.
        held.token_ids.append(token_id)
        ids = held.token_ids
        text = self._decode(ids)
        if text.endswith(_REPLACEMENT):
            return ""
        self._held = None
        self._prime(ids[-_MAX_PROMPT_CONTEXT:])
        return held.answer_text(text)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def output_text(self) -> str:
        """The text generated so far (without held-back characters, all of it)."""
        return self._output_text

    @property
    def output_token_ids(self) -> list[int]:
        """Output token ids seen so far, including a final eos/stop token."""
        return self.token_ids

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool) -> str | None:
        """Append `new_token_ids` (this step's tokens) and check stop strings.

        `stop_terminated`: the last token is an eos / stop token; its text is not added unless
        include_stop_str_in_output. Returns the matched stop string (output_text is then cut
        before it, or just after it with include_stop_str_in_output), else None.
        """
        if self._short_path and len(new_token_ids) == 1:
            # one token a step, no stop string to look for (per-step host time: kept lean)
            if not stop_terminated or self.include_stop_str_in_output:
                self._output_text += self._step(new_token_ids[0]) or ""
            self.token_ids.append(new_token_ids[0])
            return None
        if not self.detokenize:
            self.token_ids.extend(new_token_ids)
            return None
        if self._prompt_end is not None:
            self._prime(self._prompt_end)
            self._prompt_end = None
        skipped: int | None = None
        if new_token_ids and stop_terminated and not self.include_stop_str_in_output:
            *new_token_ids, skipped = new_token_ids
        check_from = len(self._output_text)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            held = self._held
            text = (self._step(token_id) if held is None else self._step_held(held, token_id)) or ""
            if self._special_tokens:
                text = self._special_text(token_id, text)
            self._output_text += text
            if len(self.token_ids) <= self.min_tokens:
                # Text of the first min_tokens tokens cannot end the request.
                check_from = len(self._output_text)
        if skipped is not None:
            self.token_ids.append(skipped)
        if not self.stop or len(self.token_ids) <= self.min_tokens:
            return None
        return self._check_stop_strings(check_from)

    def _check_stop_strings(self, new_text_start: int) -> str | None:
        """Find the earliest stop string that ends after `new_text_start`; truncate there."""
        if new_text_start >= len(self._output_text):
            return None
        search_from = max(0, new_text_start - self.max_stop_length + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self._output_text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        cut = index + len(stop) if self.include_stop_str_in_output else index
        self._output_text = self._output_text[:cut]
        return stop

    @property
    def max_stop_length(self) -> int:
        """Length in characters of the longest stop string (0 without stop strings)."""
        return max(map(len, self.stop), default=0)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to stream: all of it (`delta=False`) or only what is new since the last delta
        call. While not `finished`, the last (longest stop - 1) characters are held back, so
        the start of a stop string split across tokens is never streamed."""
        hold_back = 0 if finished else self.stop_buffer_length
        end = max(0, len(self._output_text) - hold_back)
        if not delta:
            return self._output_text[:end]
        start = self._last_output_offset
        if start >= end:
            return ""
        self._last_output_offset = end
        return self._output_text[start:end]

    def _special_text(self, token_id: int, text: str) -> str:
        special = self._special_tokens.get(token_id)
        if special is not None and self._last_was_special:
            text = special  # no separating space between adjacent added tokens
        self._last_was_special = special is not None
        return text

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._tokenizer, token_id)
        except Exception as error:
            if not str(error).startswith(_INVALID_PREFIX_ERROR):
                raise
            # The stream's state is broken; restart it from this token.
            logger.warning("Resetting decode stream after: %s", error)
            self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
            return self._stream.step(self._tokenizer, token_id)


class TokenTexts:
    """Each token id's text on its own (as shown beside logprobs), decoded once and cached."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        """The text of `token_id` decoded alone (special tokens included)."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = str(self._tokenizer.decode([token_id]))
        return text
