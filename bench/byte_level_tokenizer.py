"""A synthetic byte-level tokenizer for random-weight models whose output must spell text.

`bench.gpu_engine`'s word-level tokenizer (`w3`, `w4`, ...) has one word per id: enough for
throughput, but no sequence of its tokens spells `{"a": 1}`, so a grammar allows nothing. This
one is shaped like Llama-3's instead (a byte-level BPE vocabulary, no hub needed):

    ids 0, 1, 2        <unk>, <s>, </s>   (bos 1 and eos 2, as `LlamaConfig`'s defaults)
    the next 256       the byte alphabet of GPT-2's byte-level encoding (every byte, so any
                       text can be written)
    then               JSON punctuation runs (`{"`, `":`, `",Ġ"` ...: 2 and 3 of `{}[]":,Ġ`),
                       numbers 0-999, and seeded pseudo-words (2-10 letters, about half with a
                       leading space `Ġ`, some capitalised) until `vocab_size` ids

It has no merges, so encoding text gives byte tokens only; the benchmarks send token ids and
only decode (the detokenizer and the grammar backends read the vocabulary). xgrammar reads it
as a byte-level vocabulary, as it reads Llama-3's.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Iterator
from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
SPACE = "Ġ"  # the byte-level alphabet's space
JSON_PUNCTUATION = '{}[]":,' + SPACE


def byte_level_vocab(vocab_size: int, seed: int = 0) -> dict[str, int]:
    """token -> id for `vocab_size` distinct tokens (at least the 259 specials and bytes)."""
    from tokenizers import pre_tokenizers

    tokens = list(SPECIAL_TOKENS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size must be at least {len(tokens)}, got {vocab_size}")
    seen = set(tokens)
    for token in itertools.chain(_punctuation_runs(), map(str, range(1000)), _words(seed)):
        if len(tokens) == vocab_size:
            break
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    return {token: i for i, token in enumerate(tokens)}


def _punctuation_runs() -> Iterator[str]:
    return itertools.chain.from_iterable(
        ("".join(p) for p in itertools.product(JSON_PUNCTUATION, repeat=n)) for n in (2, 3)
    )


def _words(seed: int) -> Iterator[str]:
    """An endless stream of seeded pseudo-words (repeats are dropped by the caller)."""
    rng = random.Random(seed)
    while True:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10)))
        if rng.random() < 0.15:
            word = word.capitalize()
        yield (SPACE + word) if rng.random() < 0.5 else word


def write_byte_level_tokenizer(directory: Path, vocab_size: int, seed: int = 0) -> None:
    """Save the tokenizer (tokenizer.json and its config) into `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = byte_level_vocab(vocab_size, seed)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
