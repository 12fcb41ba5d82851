"""The offline API: sampling through the engine, n, stops, streaming, chat, bad input."""

from __future__ import annotations

import json

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model("qwen2")), max_num_batched_tokens=64, num_kv_blocks=128)


@pytest.fixture(autouse=True)
def _no_leaks(request):
    yield
    if "llm" in request.fixturenames:
        request.getfixturevalue("llm").check_integrity()


PROMPTS = [[11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [30] * 40, [40, 41]]


def test_seeded_sampling_is_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [
        SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True),  # unseeded
        SamplingParams(temperature=0, max_tokens=5),
        SamplingParams(temperature=1.3, seed=7, max_tokens=12, ignore_eos=True),
    ]
    batch = llm.generate(
        [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]],
        [others[0], others[1], params, others[2]],
        use_tqdm=False,
    )
    assert batch[2].outputs[0].token_ids == alone
    again = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    other_seed = SamplingParams(
        temperature=1.0, top_p=0.95, seed=43, max_tokens=16, ignore_eos=True
    )
    assert llm.generate([PROMPTS[1]], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_completions_follow_vllm_seeding(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        single = SamplingParams(temperature=1.0, seed=5 + c.index, max_tokens=10, ignore_eos=True)
        ref = llm.generate([PROMPTS[0]], single, use_tqdm=False)[0].outputs[0]
        assert c.token_ids == ref.token_ids and c.text == ref.text
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_a_request_finishes_with_its_last_completion(llm):
    """n = 4 children stopping at different steps (stop token ids): the request is reported
    finished exactly when every child has a finish reason, and only then leaves the engine."""
    engine = llm.engine
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=24,
                            stop_token_ids=list(range(0, 512, 6)))  # fmt: skip
    engine.add_request("fanout", PROMPTS[1], params)
    state = engine.output_processor.requests["fanout"]
    lengths_when_done = set()
    while engine.has_unfinished_requests():
        for touched in engine.step():
            done = [c.finish_reason is not None for c in touched.completions.values()]
            assert touched.finished == all(done)
            if any(done) and not all(done):
                assert "fanout" in engine.output_processor.requests
            lengths_when_done |= {len(c.token_ids) for c in touched.completions.values()
                                  if c.finish_reason is not None}  # fmt: skip
    assert state.finished and "fanout" not in engine.output_processor.requests
    assert len(lengths_when_done) > 1  # the children stopped at different lengths


def test_stop_strings_cut_text(llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate([PROMPTS[1]], greedy, use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 10
    stop = text[6:9]
    cut = text[: text.index(stop)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    out = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0]
    assert out.text == cut and out.finish_reason == "stop" and out.stop_reason == stop
    keep = SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    out = llm.generate([PROMPTS[1]], keep, use_tqdm=False)[0].outputs[0]
    assert out.text == cut + stop


def test_stream_deltas_add_up(llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    final = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0].outputs[0]
    chunks = list(llm.stream(PROMPTS[2], params))
    assert "".join(c.delta_text for c in chunks) == final.text
    assert sum((c.delta_token_ids for c in chunks), []) == final.token_ids
    assert [c.finished for c in chunks].count(True) == 1 and chunks[-1].finish_reason == "length"


def test_prompt_ids_ending_inside_a_character(llm):
    # The character is the prompt's (as in vLLM): the answer holds neither the prompt's U+FFFD
    # nor the character its first token completes.
    tokenizer = llm.get_tokenizer()
    hello, smile = (tokenizer.encode(t, add_special_tokens=False) for t in ("hello ", "🙂"))
    x = tokenizer.encode("x", add_special_tokens=False)
    assert len(smile) > 2 and len(x) == 1
    completing = SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=smile[-1:])
    breaking = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, allowed_token_ids=x)
    prompts = [hello + smile[:-1], hello + smile[:1]]
    outs = [o.outputs[0] for o in llm.generate(prompts, [completing, breaking], use_tqdm=False)]
    assert [o.token_ids for o in outs] == [smile[-1:], x * 3]
    assert [o.text for o in outs] == ["", "xxx"]
    assert "".join(c.delta_text for c in llm.stream(prompts[1], breaking)) == "xxx"


def test_abandoned_stream_frees_blocks(llm):
    stream = llm.stream(PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    llm.check_integrity()


def test_chat_and_metrics(llm):
    out = llm.chat(
        [{"role": "user", "content": "hello there"}],
        SamplingParams(temperature=0, max_tokens=4),
        use_tqdm=False,
    )[0]
    template = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert out.prompt == template
    assert out.prompt_token_ids == llm.get_tokenizer().encode(template, add_special_tokens=False)
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert out.finished and out.outputs[0].finish_reason in ("stop", "length")


def test_min_tokens_and_stop_token_ids(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = llm.generate([PROMPTS[3]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = tokens[3]
    first = tokens.index(stop_id)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    out = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[: first + 1] and out.stop_reason == stop_id
    params = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=12
    )
    out = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and stop_id not in out.token_ids


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", SamplingParams(), "prompt"),
        ([1] * 5000, SamplingParams(), "max_model_len"),
        ([10**6], SamplingParams(), "prompt_token_ids"),
        ([5, 2.5], SamplingParams(), "prompt_token_ids must be integers"),
        ([5, 2**70], SamplingParams(), "prompt_token_ids must be integers"),
        ([1, 2], SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
    ],
)
def test_bad_prompts_name_the_field(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], params, use_tqdm=False)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_request_leaves_running_ones_alone(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("good", PROMPTS[0], params)
    engine.step()
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("bad", [], params)
    finished = {}
    while engine.has_unfinished_requests():
        for state in engine.step():
            if state.finished:
                finished[state.request_id] = state.to_output()
    assert list(finished) == ["good"]
    assert finished["good"].outputs[0].token_ids == expected


def test_model_directory_errors(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
    config = json.loads((tiny_model("llama") / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_kv_cache_too_small_for_request(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[1] * 20], SamplingParams(max_tokens=4), use_tqdm=False)
    llm.check_integrity()
