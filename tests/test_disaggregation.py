"""Prefill in one engine, decode in another: the same tokens as one engine.

The two engines exchange KV through `copy_blocks` / `write_blocks` (what a transport carries);
the services and the KV transports are tested on their own.
"""

from __future__ import annotations

import random

import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore
from engine.request import KVHandoff, Request, RequestStatus
from engine.sampling_params import SamplingParams


def _core(model_dir, **cache) -> EngineCore:
    return EngineCore(
        EngineConfig(
            ModelConfig.from_pretrained(model_dir),
            CacheConfig(num_blocks=cache.get("num_blocks", 64)),
            SchedulerConfig(max_num_batched_tokens=32),
        )
    )


def _request(rid, prompt, params, eos, **kw) -> Request:
    return Request(rid, list(prompt), params, params.max_tokens, tuple(eos), **kw)


def _drain(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def _disaggregated(prefill: EngineCore, decode: EngineCore, prompts, params, eos):
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        blocks, cached = decode.reserve(_request(rid, prompt, params, eos))
        handoff = KVHandoff(num_cached_tokens=cached)
        prefill.add_request(_request(rid, prompt, params, eos, kv_transfer=handoff))
        (first,) = _drain(prefill)[rid]
        tokens[rid] = [first]
        decode.write_blocks(blocks, prefill.exports.pop(rid))
        decode.start_decode(rid, first)
    for rid, more in _drain(decode).items():
        tokens[rid] += more
    return [tokens[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=9, max_tokens=6, ignore_eos=True, presence_penalty=1),
    ],
)
def test_disaggregated_equals_single_engine(tiny_model, params):
    model_dir = tiny_model("qwen2")
    rng = random.Random(0)
    shared = [rng.randrange(3, 512) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(n)] for n in (1, 7, 30, 45)]
    single, prefill, decode = _core(model_dir), _core(model_dir), _core(model_dir)
    eos = single.config.model.eos_token_ids
    for i, p in enumerate(prompts):
        single.add_request(_request(f"r{i}", p, params, eos))
    expected = _drain(single)
    got = _disaggregated(prefill, decode, prompts, params, eos)
    assert got == [expected[f"r{i}"] for i in range(len(prompts))]
    assert decode.prefix_cache_stats.hits > 0  # later prompts reuse the decode side's cache
    for core in (single, prefill, decode):
        core.check_integrity(expect_all_free=True)
    assert not prefill.exports


def test_decode_engine_computes_only_new_tokens(tiny_model):
    """The pushed KV is used: after start_decode, a step computes one token per request."""
    decode = _core(tiny_model("llama"))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eos = decode.config.model.eos_token_ids
    for i in range(3):
        decode.reserve(_request(f"r{i}", list(range(3, 50 + i)), params, eos))
        decode.start_decode(f"r{i}", 7)
    scheduled = decode.scheduler.schedule()
    assert [s.num_tokens for s in scheduled.scheduled] == [1, 1, 1]
    assert sorted(s.start for s in scheduled.scheduled) == [47, 48, 49]


def test_unclaimed_reservation_is_freed_on_abort(tiny_model):
    decode = _core(tiny_model("llama"), num_blocks=8)
    params = SamplingParams(max_tokens=4)
    request = _request("r", list(range(3, 60)), params, decode.config.model.eos_token_ids)
    blocks, cached = decode.reserve(request)
    assert len(blocks) == 4 and cached == 0 and request.status == RequestStatus.WAITING_FOR_KV
    assert not decode.has_work()
    decode.abort_requests(["r"])
    decode.check_integrity(expect_all_free=True)
    with pytest.raises(KeyError, match="no reservation"):
        decode.start_decode("r", 5)


def test_first_token_that_finishes_is_not_handed_off(tiny_model):
    prefill = _core(tiny_model("llama"))
    params = SamplingParams(temperature=0, max_tokens=1)
    eos = prefill.config.model.eos_token_ids
    prefill.add_request(_request("r", [5, 6, 7], params, eos, kv_transfer=KVHandoff()))
    outs = [o for _ in range(3) for o in prefill.step()]
    assert outs[-1].finish_reason == "length" and not outs[-1].handed_off
    assert not prefill.exports
    prefill.check_integrity(expect_all_free=True)


def test_layerwise_export_equals_the_copy_after_the_step(tiny_model):
    """Layer-wise export (engine.kv_export) captures exactly what copy_blocks would, for prompts
    spanning several chunks and with a prefix already on the decode side; each layer is ready
    before the step ends, and a layer-wise push lands the same tokens as the copy."""
    import asyncio

    model_dir = tiny_model("llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    rng = random.Random(1)
    shared = [rng.randrange(3, 512) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(n)] for n in (3, 50, 75)]
    copy_side, layerwise_side = _core(model_dir), _core(model_dir)
    announced: list[tuple[str, object]] = []
    layerwise_side.layerwise_export = True
    layerwise_side.on_kv_export = lambda rid, export: announced.append((rid, export))
    eos = copy_side.config.model.eos_token_ids
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        cached = 16 * (i > 0)  # the decode side holds the first block of the later prompts
        for core in (copy_side, layerwise_side):
            handoff = KVHandoff(num_cached_tokens=cached)
            core.add_request(_request(rid, prompt, params, eos, kv_transfer=handoff))
        assert _drain(copy_side) == _drain(layerwise_side)
        copied = copy_side.exports.pop(rid)
        assert rid not in layerwise_side.exports  # the export went to on_kv_export instead
        (name, export), *_ = announced[-1:]
        assert name == rid and export.num_layers == len(copied)

        async def all_ready(export=export):
            for layer in range(export.num_layers):
                await asyncio.wait_for(export.ready(layer), 1)

        asyncio.run(all_ready())
        for layer, data in enumerate(copied):
            assert export.event(layer) is None  # CPU: the copy is done when enqueued
            assert export.layer(layer).equal(data)
    assert len(announced) == len(prompts)
    for core in (copy_side, layerwise_side):
        core.check_integrity(expect_all_free=True)


def test_a_failed_step_cancels_its_layerwise_exports(tiny_model):
    import asyncio

    from engine.kv_export import ExportCancelled

    core = _core(tiny_model("llama"))
    exports = []
    core.layerwise_export = True
    core.on_kv_export = lambda rid, export: exports.append(export)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eos = core.config.model.eos_token_ids
    # A token id past the vocabulary (the core does not validate; the services do) makes the
    # forward pass itself fail, as a device error would.
    prompt = [*range(5, 24), 10**6]
    core.add_request(_request("r", prompt, params, eos, kv_transfer=KVHandoff()))
    with pytest.raises(IndexError):
        core.step()
    (export,) = exports
    with pytest.raises(ExportCancelled):
        asyncio.run(export.ready(0))
