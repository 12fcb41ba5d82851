"""Where a reasoning ends in a request's output: the first token that completes the text of its
end marker (e.g. `</think>`), however the model spelled the marker in tokens.

Reasoning models keep `</think>` one token, but a marker may be several (a vocabulary without
it as a token: `<` `/` `th` `ink` `>`), and a model may write it in other tokens than the
canonical encoding the router sends (`</` `think>`). So the marker is matched in the output's
text, bytes as the tokenizer decodes them, not as a token sequence:

    output   ...  "</"  "thi"  "nk>"  "{"  ...
    text     ...  </    thi    nk>     {
                                 ^ completes "</think>": the grammar starts at "{"

Text that the completing token carries past the marker (a token such as `>\n`) is outside the
grammar; a marker kept one token, as reasoning models have it, never leaves any.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class EndScan(NamedTuple):
    """Where a scan of output tokens stands: `end`, the index just after the token that
    completed the marker (None: not yet); `scanned` tokens read; `tail`, the last bytes read
    (fewer than the marker's), where a marker cut across tokens may have begun."""

    end: int | None
    scanned: int
    tail: bytes


class ReasoningEnd:
    """A reasoning's end marker, found in output token ids by its text. `vocab[i]` is the
    bytes token i decodes to (b"" for ids without text)."""

    def __init__(self, marker: bytes, vocab: Sequence[bytes]) -> None:
        if not marker:
            raise ValueError("structured_outputs.reasoning_end: the end marker decodes to no text")
        self.marker = marker
        self.vocab = vocab

    @classmethod
    def of_tokens(cls, token_ids: Sequence[int], vocab: Sequence[bytes]) -> ReasoningEnd:
        """The marker whose canonical tokens are `token_ids` (the router's encoding of it)."""
        return cls(b"".join(cls._bytes(vocab, t) for t in token_ids), vocab)

    @staticmethod
    def _bytes(vocab: Sequence[bytes], token: int) -> bytes:
        return vocab[token] if 0 <= token < len(vocab) else b""

    def scan(self, token_ids: Sequence[int], since: EndScan | None = None) -> EndScan:
        """Read `token_ids` on from `since` (an earlier scan of a prefix of them; None: from
        the start) until a token completes the marker."""
        scanned, tail = (0, b"") if since is None else (since.scanned, since.tail)
        keep = len(self.marker) - 1
        for i in range(scanned, len(token_ids)):
            text = tail + self._bytes(self.vocab, token_ids[i])
            if self.marker in text:
                return EndScan(i + 1, i + 1, b"")
            tail = text[-keep:] if keep else b""
        return EndScan(None, len(token_ids), tail)
