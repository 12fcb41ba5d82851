"""The model's tokens as the text they stand for, for backends that match tokens as strings.

Built once per backend (per engine): a byte-level or SentencePiece vocabulary is decoded by
xgrammar's `TokenizerInfo`, which tells the kinds apart. Special tokens (the tokenizer's, and the
model's EOS ids) are left out: they are no text, and EOS is allowed by the matchers themselves.
"""

from __future__ import annotations

from engine.structured.backend import TokenizerData


def special_token_ids(tokenizer: TokenizerData) -> frozenset[int]:
    """Ids that never stand for output text: the tokenizer's special tokens, its added tokens
    marked special, and the model's EOS ids."""
    hf = tokenizer.tokenizer
    added = getattr(hf, "added_tokens_decoder", {})
    marked = {i for i, token in added.items() if getattr(token, "special", False)}
    return frozenset(set(hf.all_special_ids) | marked | set(tokenizer.eos_token_ids))


def decoded_vocab(tokenizer: TokenizerData) -> list[bytes]:
    """The bytes each id below the tokenizer's length decodes to, special tokens included (as
    their text): what a reasoning's end marker is matched against."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer.tokenizer, vocab_size=tokenizer.vocab_size)
    return list(info.decoded_vocab[: min(len(tokenizer.tokenizer), tokenizer.vocab_size)])


def token_bytes(tokenizer: TokenizerData) -> dict[int, bytes]:
    """The bytes of every regular token: ids below the tokenizer's length (the model's vocab may
    be wider: the ids beyond are no tokens), special ones and those decoding to nothing left
    out."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer.tokenizer, vocab_size=tokenizer.vocab_size)
    special = special_token_ids(tokenizer)
    size = min(len(tokenizer.tokenizer), tokenizer.vocab_size)
    return {
        i: text for i, text in enumerate(info.decoded_vocab[:size]) if text and i not in special
    }
