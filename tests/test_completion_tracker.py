"""common.completion and common.fan_out: one completion's text, stop strings, logprobs and finish
as chunks arrive (the engine's and the router's shared code), and the n-way fan-out."""

from __future__ import annotations

from typing import Any

import pytest

from common.completion import CompletionTracker
from common.fan_out import FanOut, child_params, child_request_id
from common.logprobs import Logprob
from common.sampling_params import SamplingParams
from common.tokenizer import load_tokenizer

EOS = 2  # <|im_end|> in the tiny tokenizer
TEXT = " there was a little town by the sea, and the town was little"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model("llama"))


def tracker(tokenizer, **params: Any) -> CompletionTracker:
    return CompletionTracker(0, tokenizer, SamplingParams(**params), tokenizer.encode("Once"))


def test_one_token_a_chunk_equals_one_chunk(tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    by_token, whole = tracker(tokenizer), tracker(tokenizer)
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        by_token.add([token], "length" if last else None)
    whole.add(ids, "length")
    for t in (by_token, whole):
        assert (t.text, t.token_ids, t.finish_reason, t.stop_reason) == (TEXT, ids, "length", None)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_stop_string_ends_at_its_token_and_drops_the_rest(tokenizer, chunked: bool) -> None:
    ids = tokenizer.encode(TEXT)
    t = tracker(tokenizer, stop=["little"])
    chunks = [ids] if chunked else [[token] for token in ids]
    stopped = [t.add(chunk) for chunk in chunks]
    assert stopped.count(True) == 1  # the producer is told once; later chunks are ignored
    assert t.finished and t.finished_here and (t.finish_reason, t.stop_reason) == ("stop", "little")
    assert t.text == " there was a "
    assert tokenizer.decode(t.token_ids).endswith("little") and len(t.token_ids) < len(ids)
    assert not t.add(ids) and t.text == " there was a "


def test_the_producers_finish_wins_on_its_token(tokenizer) -> None:
    """max_tokens reached on the very token that completes a stop string: "length", with the
    stop string as stop_reason; the producer ended it, so nothing is to be stopped."""
    ids = tokenizer.encode(" a little")
    t = tracker(tokenizer, stop=["little"])
    assert not t.add(ids, "length")
    assert (t.finish_reason, t.stop_reason, t.finished_here) == ("length", "little", False)


@pytest.mark.parametrize("include", [False, True])
def test_eos_and_stop_tokens_are_kept_but_not_shown(tokenizer, include: bool) -> None:
    ids = tokenizer.encode(" hello")
    t = tracker(tokenizer, skip_special_tokens=False, include_stop_str_in_output=include)
    t.add(ids)
    t.add([EOS], "stop", stopped_by_token=True)
    assert t.token_ids == [*ids, EOS] and t.finish_reason == "stop" and t.stop_reason is None
    assert t.text == (" hello<|im_end|>" if include else " hello")
    by_id = tracker(tokenizer, stop_token_ids=[9])
    by_id.add([5, 9], "stop", 9, stopped_by_token=True)
    assert by_id.stop_reason == 9 and by_id.token_ids == [5, 9]


def test_deltas_add_up_hold_back_and_announce_the_finish_once(tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    t = tracker(tokenizer, stop=["sea."])
    assert t.take_delta() is None
    deltas = []
    for i, token in enumerate(ids):
        t.add([token], "length" if i == len(ids) - 1 else None)
        delta = t.take_delta()
        if delta is not None:
            deltas.append(delta)
            assert delta.finished or len(t.text) - len("".join(d.text for d in deltas)) >= 3
    assert "".join(d.text for d in deltas) == t.text == TEXT
    assert sum((d.token_ids for d in deltas), []) == ids
    assert [d.finish_reason for d in deltas].count("length") == 1 and deltas[-1].finished
    assert t.take_delta() is None


def test_min_tokens_keep_a_stop_string_from_ending_early(tokenizer) -> None:
    ids = tokenizer.encode(" little by little")
    t = tracker(tokenizer, stop=["little"], min_tokens=len(tokenizer.encode(" little")))
    for token in ids:
        t.add([token])
    assert t.finish_reason == "stop" and t.text == " little by "


def test_logprobs_follow_the_kept_tokens(tokenizer) -> None:
    ids = tokenizer.encode(" a little town")
    entries = [{tok: Logprob(-0.25 * i, 1), 7: Logprob(-9.0, 2)} for i, tok in enumerate(ids)]
    t = tracker(tokenizer, stop=["little"], logprobs=1)
    t.add(ids[:1], logprobs=entries[:1])
    first = t.take_delta()
    t.add(ids[1:], logprobs=entries[1:])
    second = t.take_delta()
    assert first is not None and second is not None
    kept = len(t.token_ids)
    assert t.logprobs == entries[:kept] and kept < len(ids)
    assert first.logprobs == entries[:1] and second.logprobs == entries[1:kept]
    assert t.cumulative_logprob == pytest.approx(sum(-0.25 * i for i in range(kept)))


def test_child_ids_and_seeds_follow_vllm() -> None:
    params = SamplingParams(n=3, temperature=0.8, seed=10)
    assert [child_request_id("r", i, 3) for i in range(3)] == ["0_r", "1_r", "2_r"]
    assert child_request_id("r", 0, 1) == "r"
    children = [child_params(params, i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12] and {c.n for c in children} == {1}
    assert params.n == 3 and params.seed == 10  # the request's own params are left alone
    assert child_params(SamplingParams(n=2, temperature=0.8), 1).seed is None
    single = SamplingParams(seed=4)
    assert child_params(single, 0) is single


def test_fan_out_counts_down_and_merges_in_index_order(tokenizer) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=1)
    prompt = tokenizer.encode("Once")
    fan = FanOut("req", params, lambda i, p: CompletionTracker(i, tokenizer, p, prompt))
    assert list(fan.completions) == ["0_req", "1_req", "2_req"] and fan.first.index == 0
    assert [c.params.seed for c in fan.completions.values()] == [1, 2, 3]
    hello, town = tokenizer.encode(" hello"), tokenizer.encode(" town")
    fan.add("2_req", town, "length")
    fan.add("0_req", hello)
    assert fan.unfinished == 2 and not fan.finished
    assert [(d.index, d.text) for d in fan.take_deltas()] == [(0, " hello"), (2, " town")]
    assert fan.take_deltas() == []
    fan.add("0_req", [EOS], "stop", stopped_by_token=True)
    fan.add("2_req", hello, "length")  # already finished: ignored, counted once
    assert fan.unfinished == 1
    fan.add("1_req", town, "length")
    assert fan.finished and fan.num_output_tokens == len(hello) + 1 + 2 * len(town)
