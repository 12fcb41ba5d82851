"""Asynchronous scheduling (EngineCore.step): a greedy decode step is launched before the
previous one's tokens are read. On the CPU it runs synchronously, but through the same
scheduler path (`schedule_next_decode`), so its outputs must equal the synchronous engine's."""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine

PROMPT_LENS = [1, 5, 16, 17, 33, 40, 64]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("qwen2"))


def _prompts(n: int = len(PROMPT_LENS)) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 500) for _ in range(length)] for length in PROMPT_LENS[:n]]


def _llm(model_dir: str, async_scheduling: bool, **args) -> LLM:
    return LLM(model_dir, max_num_batched_tokens=64, async_scheduling=async_scheduling, **args)


def _run(llm: LLM, prompts, params) -> list[tuple[list[int], str | None, object, str]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [
        (list(c.token_ids), c.finish_reason, c.stop_reason, c.text)
        for c in (o.outputs[0] for o in outputs)
    ]


def _params(reference: list[list[int]]) -> list[SamplingParams]:
    """Per prompt: length limits that differ, stops by token half-way, a stop string, and one
    seeded random request (a batch holding it is not launched ahead)."""
    params = []
    for i, tokens in enumerate(reference):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=5 + 3 * i, ignore_eos=True))
        elif i % 3 == 1:
            stop = tokens[len(tokens) // 2]
            params.append(
                SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop])
            )
        else:
            params.append(SamplingParams(temperature=0, max_tokens=30, ignore_eos=False))
    params[-1] = SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True)
    return params


@pytest.mark.parametrize("num_kv_blocks", [256, 12])  # 12: preemptions, chains cut short
def test_async_outputs_equal_sync(model_dir, num_kv_blocks):
    prompts = _prompts()
    # length limits one apart: each step leaves one request out of the next (a subset)
    plain = [SamplingParams(temperature=0, max_tokens=24 + i, ignore_eos=True) for i in range(7)]
    results = {}
    for async_scheduling in (False, True):
        llm = _llm(model_dir, async_scheduling, num_kv_blocks=num_kv_blocks)
        reference = [r[0] for r in _run(llm, prompts, plain)]
        params = _params(reference)
        mixed = _run(llm, prompts, params)
        alone = [_run(llm, [p], q)[0] for p, q in zip(prompts, params, strict=True)]
        core = llm.engine.core
        assert (core.num_chained_steps > 0) == async_scheduling
        llm.check_integrity()
        results[async_scheduling] = (reference, mixed, alone)
    assert results[True] == results[False]
    reference, mixed, _ = results[True]
    # the stops by token did stop early, so the discarded rows were exercised
    assert any(len(m[0]) < len(r) and m[1] == "stop" for r, m in zip(reference, mixed, strict=True))


def test_stops_and_abort_while_launched(model_dir):
    """A request stopped by a token, by a stop string, or aborted while a step that decodes
    it is in flight: the engine core emits nothing more for it, and the rest go on as in the
    synchronous engine."""
    prompts = _prompts(4)
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    sync = _llm(model_dir, False)
    full = _run(sync, prompts, plain)
    stop_text = full[1][3][5:9]  # a stop string cutting the second request's text
    stop_token = full[3][0][10]
    assert stop_text
    params = [
        plain,
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop_text]),
        plain,
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_token]),
    ]

    def stepwise(engine: LLMEngine) -> dict[str, list[tuple[list[int], str | None]]]:
        """Every output of the engine core, by request id."""
        seen: dict[str, list[tuple[list[int], str | None]]] = {}
        core_step = engine.core.step

        def step():
            outputs = core_step()
            for o in outputs:
                seen.setdefault(o.request_id, []).append((o.new_token_ids, o.finish_reason))
            return outputs

        engine.core.step = step  # type: ignore[method-assign]
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(str(i), prompt, p)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            if steps == 12:
                engine.abort_request(["2"])
        while engine.core.has_work():  # a launched step left behind is read, its rows dropped
            engine.step()
        return seen

    sync_seen = stepwise(sync.engine)
    async_llm = _llm(model_dir, True)
    async_seen = stepwise(async_llm.engine)
    assert async_llm.engine.core.num_chained_steps > 0
    assert async_seen == sync_seen
    assert [o[1] for o in sync_seen["0"]][-1] == "length"
    assert [o[1] for o in sync_seen["3"]][-1] == "stop"
    assert len(sync_seen["1"]) < 40 and len(sync_seen["2"]) < 40  # stopped, aborted
    for llm in (sync, async_llm):
        llm.check_integrity()


def test_prompt_steps_chain_too(model_dir):
    """Steps with prompt chunks (and arrivals admitted mid-run) are launched ahead as well:
    with every request greedy, each step after the first is chained, and the outputs are the
    synchronous engine's."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (100, 7, 64, 65, 33, 1, 130)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = []
    for async_scheduling in (False, True):
        llm = _llm(model_dir, async_scheduling, max_num_seqs=4)  # the rest wait their turn
        results.append(_run(llm, prompts, params))
        core = llm.engine.core
        # one plain schedule, then every step chained; the last schedule finds nothing
        assert core.num_chained_steps == (core.scheduler.num_steps - 2 if async_scheduling else 0)
        llm.check_integrity()
    assert results[0] == results[1]


def test_a_step_scheduled_ahead_that_cannot_launch_runs_once_the_tokens_are_read(model_dir):
    """A sampling request admitted into the step after a launched greedy one: that step was
    scheduled before the greedy tokens were read, so it runs synchronously at the next
    `step()`, its pending rows fed by the tokens read meanwhile. Outputs equal the synchronous
    engine's, seeded sampling included."""
    prompts = _prompts(5)
    params = [SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True) for i in range(4)]
    params.append(SamplingParams(temperature=0.9, seed=11, max_tokens=9, ignore_eos=True))
    results = []
    for async_scheduling in (False, True):
        llm = _llm(model_dir, async_scheduling, max_num_seqs=2)  # the sampler arrives later
        results.append(_run(llm, prompts, params))
        core = llm.engine.core
        assert (core.num_deferred_steps > 0) == async_scheduling
        assert (core.num_chained_steps > 0) == async_scheduling
        llm.check_integrity()
    assert results[0] == results[1]


def _random_run(
    model_dir, async_scheduling: bool, seed: int, num_kv_blocks: int, shared: bool = False
):
    """Requests of mixed kinds arriving over the first steps, and aborts once a request has
    shown a given number of tokens; every output the engine shows, by request. `shared`:
    prompts start with one of three prefixes (prefix-cache hits on blocks that a launched
    step may still be computing)."""
    llm = _llm(model_dir, async_scheduling, max_num_seqs=6, num_kv_blocks=num_kv_blocks)
    engine = llm.engine
    rng = random.Random(seed)
    other = random.Random(-seed)  # the shared prefixes' draws leave `rng`'s alone
    prefixes = [[other.randrange(3, 500) for _ in range(n)] for n in (16, 32, 40)]
    arrivals = []
    for i in range(12):
        prompt = [rng.randrange(3, 500) for _ in range(rng.choice([1, 3, 17, 40, 70]))]
        if shared:
            prompt = other.choice(prefixes) + prompt[: other.choice([0, 1, 5, 20])]
        kind = rng.random()
        if kind < 0.6:
            params = SamplingParams(temperature=0, max_tokens=rng.randrange(1, 24), ignore_eos=True)
        elif kind < 0.8:
            stops = [rng.randrange(3, 500) for _ in range(40)]
            params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=stops)
        else:
            params = SamplingParams(temperature=0.8, seed=i, max_tokens=16, ignore_eos=True)
        arrivals.append((rng.randrange(0, 20), str(i), prompt, params))
    arrivals.sort(key=lambda a: a[0])
    aborts = {str(rng.randrange(12)): rng.randrange(1, 6) for _ in range(3)}  # id: tokens seen
    seen: dict[str, tuple[list[int], str | None]] = {}
    step = 0
    while arrivals or engine.core.has_work():
        while arrivals and arrivals[0][0] <= step:
            _, rid, prompt, params = arrivals.pop(0)
            engine.add_request(rid, prompt, params)
        for state in engine.step():
            for child in state.completions.values():
                seen[state.request_id] = (list(child.token_ids), child.finish_reason)
        for rid, count in list(aborts.items()):
            if rid in seen and len(seen[rid][0]) >= count:
                engine.abort_request([rid])
                del aborts[rid]
        step += 1
    llm.check_integrity()
    return seen, engine.core


@pytest.mark.parametrize("num_kv_blocks", [200, 14])  # 14: preemptions
# Both seeds chain, defer and (with 14 blocks) preempt; 9 with 14 blocks once had a request
# scheduled twice in one step.
@pytest.mark.parametrize("seed", [3, 9])
def test_random_arrivals_kinds_and_aborts_equal_sync(model_dir, seed, num_kv_blocks):
    sync, _ = _random_run(model_dir, False, seed, num_kv_blocks)
    chained, core = _random_run(model_dir, True, seed, num_kv_blocks)
    assert chained == sync
    assert core.num_chained_steps > 0 and core.num_deferred_steps > 0
    if num_kv_blocks == 14:
        assert core.scheduler.num_preemptions > 0


@pytest.mark.parametrize("num_kv_blocks", [200, 14])
def test_shared_prefixes_equal_sync(model_dir, num_kv_blocks):
    sync, _ = _random_run(model_dir, False, 1, num_kv_blocks, shared=True)
    chained, core = _random_run(model_dir, True, 1, num_kv_blocks, shared=True)
    assert chained == sync
    assert core.num_chained_steps > 0 and core.kv.stats.hits > 0


def test_stepping_switches_between_steps_only(model_dir):
    """set_async_scheduling swaps the stepper on an idle engine (outputs unchanged, counters
    kept) and refuses while a step is launched ahead."""
    llm = _llm(model_dir, True)
    core = llm.engine.core
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ahead = _run(llm, _prompts(3), params)
    chained = core.num_chained_steps
    assert core.async_scheduling and chained > 0
    core.set_async_scheduling(False)
    assert not core.async_scheduling and core.num_chained_steps == chained
    assert _run(llm, _prompts(3), params) == ahead
    assert core.num_chained_steps == chained  # nothing launched ahead while synchronous
    core.set_async_scheduling(True)
    llm.engine.add_request("r", _prompts(1)[0], params)
    while not core.stepper.busy():
        core.step()
    with pytest.raises(ValueError, match="between steps"):
        core.set_async_scheduling(False)
    while core.has_unfinished_requests():
        core.step()
    core.check_integrity(expect_all_free=False)
