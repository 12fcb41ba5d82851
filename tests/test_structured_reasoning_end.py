"""Structured outputs after the reasoning (`StructuredOutputsParams.reasoning_end`): tokens up
to and including the end marker are free, the grammar governs the rest; the marker is found by
its text, in whatever tokens the model wrote it; its tokens travel through the workers' proto;
without it the grammar starts at the first token."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from common.sampling_params import SamplingParams
from common.structured_outputs import StructuredOutputsParams
from engine import LLM
from engine.structured.backend import TokenizerData
from engine.structured.matcher_state import RequestGrammar
from engine.structured.reasoning_end import ReasoningEnd
from engine.structured.vocabulary import decoded_vocab
from proto.convert import params_from_proto, params_to_proto

CHOICES = ["yes", "no"]


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model("qwen2")), num_kv_blocks=128)


def _end(llm: LLM) -> tuple[int, ...]:
    """Two tokens standing for a reasoning end such as `</think>`."""
    return tuple(llm.get_tokenizer().encode(" maybe later", add_special_tokens=False)[:2])


def _outputs(llm: LLM, end: tuple[int, ...], **so_kwargs) -> list[list[int]]:
    """Outputs under a choice grammar with the end tokens' logits pushed up: the model writes
    them at once wherever the grammar lets it."""
    so = StructuredOutputsParams(choice=CHOICES, **so_kwargs)
    bias = {t: 30.0 for t in end}
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, logit_bias=bias,
                             structured_outputs=so) for s in range(4)]  # fmt: skip
    outs = llm.generate([[11, 12, 13 + i] for i in range(4)], params, use_tqdm=False)
    llm.check_integrity()
    return [list(o.outputs[0].token_ids) for o in outs]


def test_grammar_applies_after_the_reasoning_end(llm) -> None:
    end = _end(llm)
    tok = llm.get_tokenizer()
    for ids in _outputs(llm, end, reasoning_end=end):
        at = next(i for i in range(len(ids)) if tuple(ids[i : i + len(end)]) == end)
        answer = tok.decode(ids[at + len(end) :], skip_special_tokens=True)
        assert answer in CHOICES, (ids, answer)
        assert at < 12  # the biased end tokens came through, unconstrained


def test_without_reasoning_end_the_grammar_starts_at_once(llm) -> None:
    tok = llm.get_tokenizer()
    for ids in _outputs(llm, _end(llm)):
        assert tok.decode(ids, skip_special_tokens=True) in CHOICES


def test_reasoning_end_crosses_the_proto() -> None:
    so = StructuredOutputsParams(json={"type": "object"}, reasoning_end=(5, 6))
    back = params_from_proto(params_to_proto(SamplingParams(structured_outputs=so)))
    assert back.structured_outputs.reasoning_end == (5, 6)
    with pytest.raises(ValueError, match="reasoning_end"):
        StructuredOutputsParams(json={"type": "object"}, reasoning_end=("a",))


def test_an_end_marker_of_several_tokens_is_found_by_its_text(llm) -> None:
    """`</think>` is seven tokens in the tiny vocabulary: written in other tokens than its
    canonical encoding, it still ends the reasoning, at the token that completes its text."""
    tok = llm.get_tokenizer()
    canonical = tok.encode("</think>", add_special_tokens=False)
    assert len(canonical) > 1
    spelled = [tok.convert_tokens_to_ids(piece) for piece in ("<", "/", "t", "h", "i", "n", "k")]
    assert 0 not in spelled and tuple(spelled) != tuple(canonical[:-1])
    reasoning = tok.encode("so far, so", add_special_tokens=False)
    answer = tok.encode("yes", add_special_tokens=False)
    vocab = decoded_vocab(TokenizerData(tok, vocab_size=len(tok), eos_token_ids=(2,)))
    end = ReasoningEnd.of_tokens(canonical, vocab)
    assert end.marker == b"</think>"
    request = RequestGrammar(Future(), reasoning_end=end)
    output = [*reasoning, *spelled]
    assert request.grammar_start(output) is None  # "</think" so far
    output.append(canonical[-1])  # ">" completes it
    assert request.grammar_start([*output, *answer]) == len(output)
    assert request.grammar_start(reasoning) is None  # a shorter output is searched again
    fresh = RequestGrammar(Future(), reasoning_end=end)  # the marker first, read token by token
    assert [fresh.grammar_start(canonical[:n]) for n in range(len(canonical) + 1)] == [
        None
    ] * len(canonical) + [len(canonical)]
