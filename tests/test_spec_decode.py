"""Speculative decoding (engine.spec_decode) on random-weight tiny models: greedy outputs equal
those without it (every architecture; with preemption, prefix hits, chunked prompts, stops and
penalties in the runs), rejection sampling keeps the target's distribution (chi-square), the
config is validated by field, and nothing leaks."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from common.sampling_params import SamplingParams
from engine import LLM, StructuredOutputsParams
from engine.config import SpeculativeConfig
from engine.request import Request
from engine.scheduler.output import ScheduledRequest
from engine.spec_decode.ngram import ngram_drafts
from engine.spec_decode.verify import verify

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}  # fmt: skip


def _prompts(num: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves (so n-grams recur), of varied lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        motif = [rng.randrange(3, 400) for _ in range(rng.randrange(3, 9))]
        out.append((motif * (2 + i % 4))[: 6 + 7 * i])
    return out


def _run(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_ngram_drafts():
    assert ngram_drafts([1, 2, 3, 4, 1, 2], 1, 3, 3) == [3, 4, 1]
    assert ngram_drafts([1, 2, 3, 1, 2, 3, 1, 2], 2, 2, 5) == [3, 1, 2]  # the latest match
    assert ngram_drafts([1, 2, 3, 4, 9, 2], 2, 3, 3) == []  # no earlier 2-gram "9 2"
    assert ngram_drafts([7, 8, 7], 1, 1, 4) == [8, 7]  # what follows, up to the end
    assert ngram_drafts([5], 1, 3, 2) == []


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_equals_no_speculation(tiny_model, arch):
    """Small blocks and cache (preemption), a low token budget (chunked prompts), the prompts
    sent twice (prefix hits): the same tokens as without drafts, some of them accepted."""
    model = str(tiny_model(arch))
    prompts = _prompts(10)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = {"num_kv_blocks": 48, "block_size": 4, "max_num_batched_tokens": 24}
    plain = LLM(model, **kw)
    expected = _run(plain, prompts, params)
    spec = LLM(model, speculative_config=NGRAM, **kw)
    assert _run(spec, prompts, params) == expected
    assert _run(spec, prompts, params) == expected  # again: prefix hits
    core = spec.engine.core
    stats = core.scheduler.spec_stats
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    assert core.scheduler.num_preemptions > 0 and core.prefix_cache_stats.hits > 0
    spec.check_integrity()


def test_stops_lengths_penalties_and_other_requests(tiny_model):
    """Stop tokens met inside an accepted run of drafts, exact max_tokens, a repetition
    penalty (it sees the drafts before each row), logprobs (a row per accepted token) and a
    grammar in the same batch: outputs equal those without speculation."""
    model = str(tiny_model("qwen2"))
    prompts = _prompts(8, seed=1)
    plain, spec = LLM(model, num_kv_blocks=256), LLM(model, num_kv_blocks=256,
                                                       speculative_config=NGRAM)  # fmt: skip
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    first = _run(plain, prompts, free)
    assert _run(spec, prompts, free) == first
    params = [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                       stop_token_ids=[tokens[5 + i]])  # fmt: skip
        for i, tokens in enumerate(first[:4])
    ]
    params += [
        SamplingParams(temperature=0, max_tokens=7 + 3 * i, ignore_eos=True) for i in range(2)
    ]
    params.append(SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3))
    params.append(SamplingParams(temperature=0, max_tokens=12, logprobs=2))
    prompts.append(prompts[0])
    params.append(
        SamplingParams(temperature=0, max_tokens=30,
                       structured_outputs=StructuredOutputsParams(regex=r"[a-c]{4,12}"))
    )  # fmt: skip
    outs_plain = plain.generate(prompts, params, use_tqdm=False)
    outs_spec = spec.generate(prompts, params, use_tqdm=False)
    for a, b in zip(outs_plain, outs_spec, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason
    with_logprobs = outs_spec[7].outputs[0].logprobs  # one entry per token, as without drafts
    assert with_logprobs is not None
    assert len(with_logprobs) == len(outs_spec[7].outputs[0].token_ids)
    for got, want in zip(with_logprobs, outs_plain[7].outputs[0].logprobs, strict=True):
        assert got.keys() == want.keys()
        for token, entry in got.items():
            assert abs(entry.logprob - want[token].logprob) < 1e-4
    assert [len(o.outputs[0].token_ids) for o in outs_spec[4:6]] == [7, 10]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs_spec[:4])
    plain.check_integrity()
    spec.check_integrity()


def test_sampling_with_drafts_is_seeded_and_completes(tiny_model):
    model = str(tiny_model("llama"))
    spec = LLM(model, num_kv_blocks=256, speculative_config=NGRAM)
    prompts = _prompts(6, seed=2)
    params = [SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=24) for i in range(6)]
    assert _run(spec, prompts, params) == _run(spec, prompts, params)
    assert spec.engine.core.scheduler.spec_stats.num_drafts > 0
    spec.check_integrity()


def _verify_once(logits: torch.Tensor, drafts: list[int], seed: int) -> list[int]:
    request = Request("r", [0], SamplingParams(temperature=1.0, seed=seed), max_tokens=10)
    item = ScheduledRequest(request, 1 + len(drafts), [], drafts)
    out = verify(logits, [item], logits.shape[1])
    return [*out.accepted[0], out.tokens[0]]


def _chi_square(counts: Counter, probs: torch.Tensor, total: int) -> float:
    return sum(
        (counts.get(t, 0) - total * p) ** 2 / (total * p) for t, p in enumerate(probs.tolist())
    )


def test_rejection_sampling_keeps_the_target_distribution():
    """Six-token vocab, two drafts (one likely, one unlikely under the target): the first output
    token follows p_0, and the second, given the first draft was taken, follows p_1. Chi-square
    against the target with 5 degrees of freedom: 20.5 is its 0.999 quantile. Accepting every
    draft, or resampling without banning the rejected draft, fails it."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=gen) * 1.5
    probs = torch.softmax(logits, dim=-1)
    drafts = [int(probs[0].argmax()), int(probs[1].argmin())]
    trials = 6000
    outs = [_verify_once(logits, drafts, seed) for seed in range(trials)]
    first = Counter(o[0] for o in outs)
    assert _chi_square(first, probs[0], trials) < 20.5
    given = [o[1] for o in outs if o[0] == drafts[0]]
    assert len(given) > 1000
    assert _chi_square(Counter(given), probs[1], len(given)) < 20.5
    assert any(len(o) == 3 for o in outs)  # both drafts accepted sometimes: a bonus token


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "medusa"}, "speculative_config.method must be one of"),
        ({"method": "eagle"}, r"speculative_config.model \(the drafter's weights"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup"),
        ({"method": "ngram", "bogus": 1}, "unknown key.*bogus"),
        ({"method": "ngram", "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ],
)
def test_config_errors_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(config)


def test_vllm_defaults_and_disable_by_batch_size(tiny_model):
    assert SpeculativeConfig().prompt_lookup_min == 5
    config = SpeculativeConfig(prompt_lookup_max=3)
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (3, 3)
    model = str(tiny_model("llama"))
    spec = LLM(model, num_kv_blocks=128, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    _run(spec, _prompts(4), params)  # four at once: never below the limit until the end
    drafted = spec.engine.core.scheduler.spec_stats.num_drafts
    _run(spec, _prompts(1), params)  # alone: drafts
    assert spec.engine.core.scheduler.spec_stats.num_drafts > drafted
    spec.check_integrity()


REPEATING = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                       "ok": {"type": "boolean"}},
        "required": ["x", "ok"],
        "additionalProperties": False,
    },
    "minItems": 3,
    "maxItems": 6,
}  # fmt: skip


def test_structured_outputs_with_drafts(tiny_model):
    """Drafts under a grammar: only those it allows are verified, each verify row masked. Greedy
    outputs equal those without drafts and validate; sampled ones (temperature 1) validate;
    drafts were accepted (a JSON array of objects repeats itself)."""
    import json

    import jsonschema

    model = str(tiny_model("qwen3"))
    so = StructuredOutputsParams(json=REPEATING, disable_any_whitespace=True)
    prompts = _prompts(4, seed=3)
    greedy = SamplingParams(temperature=0, max_tokens=120, structured_outputs=so)
    plain = LLM(model, num_kv_blocks=256)
    spec = LLM(model, num_kv_blocks=256, speculative_config=NGRAM)
    expected = plain.generate(prompts, greedy, use_tqdm=False)
    got = spec.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    tokenizer = spec.get_tokenizer()

    def parsed(out) -> object:  # the output alone (random prompts may end mid-character)
        return json.loads(tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True))

    for out in got:
        jsonschema.validate(parsed(out), REPEATING)
    sampled = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=120, structured_outputs=so)
        for i in range(4)
    ]
    for out in spec.generate(prompts, sampled, use_tqdm=False):
        jsonschema.validate(parsed(out), REPEATING)
    assert spec.engine.core.scheduler.spec_stats.num_accepted_tokens > 0
    spec.check_integrity()
