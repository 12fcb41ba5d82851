"""IncrementalDetokenizer (common.detokenizer): incremental text equals a full decode; stop
strings; streaming."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from common.detokenizer import IncrementalDetokenizer
from common.sampling_params import SamplingParams

EOS = "<|im_end|>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello there!",
    "Stop here: the end is near.",
    "héllo 世界 🙂 again and again",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, with special tokens (no download)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS, "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


def detokenizer(
    tokenizer: PreTrainedTokenizerFast, prompt: str = "", **kwargs: Any
) -> IncrementalDetokenizer:
    params = SamplingParams(**kwargs)
    return IncrementalDetokenizer(tokenizer, params, tokenizer.encode(prompt))


TEXTS = [
    "héllo 世界 🙂",
    "日本語 😀 ok, naïve café",  # unseen characters: split into byte tokens
    "The quick brown fox<|im_start|> jumps<|im_end|> over",
    "  leading spaces and\nnew lines\t.",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_equals_full_decode(
    tokenizer: PreTrainedTokenizerFast, text: str, skip_special_tokens: bool, chunk: int
) -> None:
    ids = tokenizer.encode(text)
    detok = detokenizer(tokenizer, "hello there", skip_special_tokens=skip_special_tokens)
    pieces = []
    for start in range(0, len(ids), chunk):
        assert detok.update(ids[start : start + chunk], stop_terminated=False) is None
        pieces.append(detok.get_next_output_text(finished=False, delta=True))
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == detok.output_text == expected
    assert detok.output_token_ids == ids


def test_multibyte_characters_are_split_across_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    # Guards the test above: some tokens of TEXTS[1] are partial UTF-8 sequences.
    ids = tokenizer.encode(TEXTS[1])
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[str | None, list[str]]:
    """Feed ids one at a time as a stream; return the stop string and the streamed deltas."""
    deltas = []
    for token_id in ids:
        stop = detok.update([token_id], stop_terminated=False)
        deltas.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            return stop, deltas
    return None, deltas


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(tokenizer: PreTrainedTokenizerFast, include: bool) -> None:
    ids = tokenizer.encode("hello world again")
    assert [tokenizer.decode([i]) for i in ids] == ["hello", " world", " again"]
    detok = detokenizer(tokenizer, stop=["lo wor"], include_stop_str_in_output=include)
    stop, deltas = feed(detok, ids)
    assert stop == "lo wor"
    assert detok.output_text == ("hello wor" if include else "hel")
    assert "".join(deltas) == detok.output_text


def test_streaming_holds_back_possible_stop_prefix(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("hello world again")
    detok = detokenizer(tokenizer, stop=["world peace", "xy"])  # never matches
    stop, deltas = feed(detok, ids)
    assert stop is None
    # longest stop is 11 chars: the last 10 characters stay back until finished.
    assert deltas == ["", "h", "ello w"]
    assert detok.get_next_output_text(finished=False, delta=False) == "hello w"
    assert detok.get_next_output_text(finished=True, delta=True) == "orld again"
    assert detok.get_next_output_text(finished=True, delta=False) == "hello world again"


def test_no_hold_back_when_stop_included(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = detokenizer(tokenizer, stop=["world peace"], include_stop_str_in_output=True)
    _, deltas = feed(detok, tokenizer.encode("hello world"))
    assert deltas == ["hello", " world"]


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = detokenizer(tokenizer, stop=["again", "world"])
    stop = detok.update(tokenizer.encode("hello world again"), stop_terminated=False)
    assert stop == "world" and detok.output_text == "hello "


def test_stop_search_covers_boundary_only(tokenizer: PreTrainedTokenizerFast) -> None:
    # A stop string inside the first min_tokens tokens must not stop the request later.
    ids = tokenizer.encode("hello world again")
    detok = detokenizer(tokenizer, stop=["hello"], min_tokens=1)
    stop, _ = feed(detok, ids)
    assert stop is None and detok.output_text == "hello world again"


@pytest.mark.parametrize("include", [False, True])
def test_stop_terminated_token_text(tokenizer: PreTrainedTokenizerFast, include: bool) -> None:
    ids = tokenizer.encode("the lazy dog") + [tokenizer.eos_token_id]
    detok = detokenizer(tokenizer, skip_special_tokens=False, include_stop_str_in_output=include)
    assert detok.update(ids[:-1], stop_terminated=False) is None
    assert detok.update(ids[-1:], stop_terminated=True) is None
    assert detok.output_text == "the lazy dog" + (EOS if include else "")
    assert detok.output_token_ids == ids


def test_detokenize_false_only_records_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = detokenizer(tokenizer, detokenize=False)
    assert detok.update([5, 6, 7], stop_terminated=True) is None
    assert detok.output_text == "" and detok.output_token_ids == [5, 6, 7]
    assert detok.get_next_output_text(finished=True, delta=True) == ""


def test_no_spaces_between_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("hi<|im_start|><|im_end|>")
    detok = detokenizer(tokenizer, skip_special_tokens=False, spaces_between_special_tokens=False)
    detok.update(ids, stop_terminated=False)
    assert detok.output_text == "hi<|im_start|><|im_end|>"


def answer_text(detok: IncrementalDetokenizer, ids: list[int], chunk: int) -> tuple[str, list[str]]:
    """Feed `ids` `chunk` at a time; the final text and the streamed deltas."""
    deltas = []
    for start in range(0, len(ids), chunk):
        assert detok.update(ids[start : start + chunk], stop_terminated=False) is None
        deltas.append(detok.get_next_output_text(finished=False, delta=True))
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return detok.output_text, deltas


# A prompt given as token ids may end inside a character (TEXTS[1]'s unseen characters are
# split into byte tokens). As in vLLM's detokenize_incrementally, that character belongs to the
# prompt: the answer is the full decode's text after the prompt's text, which ends with one
# U+FFFD for the incomplete character.
@pytest.mark.parametrize("stop", [[], ["zz"]])  # the one-token short path, and the other
@pytest.mark.parametrize("chunk", [1, 3])
def test_prompt_ending_inside_a_character(
    tokenizer: PreTrainedTokenizerFast, chunk: int, stop: list[str]
) -> None:
    ids = tokenizer.encode(TEXTS[1])
    full = tokenizer.decode(ids)
    inside = [cut for cut in range(1, len(ids)) if tokenizer.decode(ids[:cut])[-1] == "\ufffd"]
    assert len(inside) > 5  # guards the test: many cuts fall inside a character
    for cut in range(1, len(ids)):
        prompt_text = tokenizer.decode(ids[:cut])
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=stop), ids[:cut])
        text, deltas = answer_text(detok, ids[cut:], chunk)
        assert text == "".join(deltas) == full[len(prompt_text) :], (cut, prompt_text)


def test_answer_completing_the_prompts_character(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("🙂 again")
    assert tokenizer.decode(ids[:1]) == "\ufffd"
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), ids[:1])
    assert answer_text(detok, ids[1:2], 1)[0] == ""  # the character is the prompt's
    assert answer_text(detok, ids[2:], 1)[0] == " again"


def test_answer_not_completing_the_prompts_character(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = tokenizer.encode("日")[:1]
    answer = tokenizer.encode(" ok")
    assert tokenizer.decode(prompt + answer) == "\ufffd ok"
    for stop in ([], ["zz"]):
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=stop), prompt)
        text, deltas = answer_text(detok, answer, 1)
        assert text == "".join(deltas) == " ok"
