"""Structured outputs after the reasoning (`StructuredOutputsParams.reasoning_end`): tokens up
to and including the end sequence are free, the grammar governs the rest; the sequence travels
through the workers' proto; without it the grammar starts at the first token."""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from common.structured_outputs import StructuredOutputsParams
from engine import LLM
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
