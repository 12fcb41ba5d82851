"""Prefill in one engine, decode in another: the same tokens as one engine.

The prefill engine runs the "push" KV connector, the decode engine the "receive" one; the test
writes each save into the reserved blocks as a KV receiver does (`scatter_layer`). The services
and the KV transports are tested on their own.
"""

from __future__ import annotations

import random

import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore
from engine.kv_connector import KVConnectorConfig, make_kv_connector
from engine.kv_connector.push import KVSave
from engine.kv_connector.receive import ReceiveConnector, Reservation
from engine.request import KVHandoff, Request, RequestStatus
from engine.sampling_params import SamplingParams
from kv_transfer.blocks import scatter_layer


def _config(model_dir, num_blocks=64) -> EngineConfig:
    return EngineConfig(
        ModelConfig.from_pretrained(model_dir),
        CacheConfig(num_blocks=num_blocks),
        SchedulerConfig(max_num_batched_tokens=32),
    )


def _core(model_dir, num_blocks=64) -> EngineCore:
    return EngineCore(_config(model_dir, num_blocks))


def _prefill(model_dir, layerwise=False) -> tuple[EngineCore, dict[str, KVSave]]:
    """A prefill engine, and the saves its push connector announces, by request id."""
    saves: dict[str, KVSave] = {}
    config = _config(model_dir)
    options = {"layerwise": layerwise, "on_save": lambda s: saves.__setitem__(s.request_id, s)}
    connector = make_kv_connector(KVConnectorConfig("push", options), config)
    return EngineCore(config, connector), saves


def _decode(model_dir, num_blocks=64) -> tuple[EngineCore, ReceiveConnector]:
    config = _config(model_dir, num_blocks)
    connector = make_kv_connector(KVConnectorConfig("receive"), config)
    assert isinstance(connector, ReceiveConnector)
    return EngineCore(config, connector), connector


def _request(rid, prompt, params, eos, **kw) -> Request:
    return Request(rid, list(prompt), params, params.max_tokens, tuple(eos), **kw)


def _drain(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def _receive(receiver: ReceiveConnector, reservation: Reservation, save: KVSave) -> None:
    """What a KV receiver does with a transfer: write each layer into the reserved blocks."""
    assert save.layers.num_layers == len(receiver.kv_caches)
    for i, cache in enumerate(receiver.kv_caches):
        scatter_layer(cache, reservation.block_ids, save.layers.layer(i))


def _disaggregated(model_dir, prompts, params, eos, reuse_prefix=True):
    (prefill, saves), (decode, receiver) = _prefill(model_dir), _decode(model_dir)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        reservation = receiver.reserve(decode, _request(rid, prompt, params, eos), reuse_prefix)
        handoff = KVHandoff(num_cached_tokens=reservation.num_cached_tokens)
        prefill.add_request(_request(rid, prompt, params, eos, kv_transfer=handoff))
        (first,) = _drain(prefill)[rid]
        tokens[rid] = [first]
        save = saves.pop(rid)
        _receive(receiver, reservation, save)
        receiver.kv_arrived(rid, [first], save.extras)
    for rid, more in _drain(decode).items():
        tokens[rid] += more
    for core in (prefill, decode):
        core.check_integrity(expect_all_free=True)
    assert not saves
    return [tokens[f"r{i}"] for i in range(len(prompts))], decode


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
    single = _core(model_dir)
    eos = single.config.model.eos_token_ids
    for i, p in enumerate(prompts):
        single.add_request(_request(f"r{i}", p, params, eos))
    expected = _drain(single)
    got, decode = _disaggregated(model_dir, prompts, params, eos)
    assert got == [expected[f"r{i}"] for i in range(len(prompts))]
    assert decode.prefix_cache_stats.hits > 0  # later prompts reuse the decode side's cache
    single.check_integrity(expect_all_free=True)


def test_fresh_blocks_reservation_receives_every_block(tiny_model):
    """Without prefix reuse (the router's target_follows path), the decode side reserves fresh
    blocks for the whole prompt, though its cache holds a prefix; the tokens are the same."""
    model_dir = tiny_model("llama")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(3, 40)) + [7, 8]]
    single = _core(model_dir)
    eos = single.config.model.eos_token_ids
    for i, p in enumerate(prompts):
        single.add_request(_request(f"r{i}", p, params, eos))
    expected = _drain(single)
    got, decode = _disaggregated(model_dir, prompts, params, eos, reuse_prefix=False)
    assert got == [expected["r0"], expected["r1"]]
    assert decode.prefix_cache_stats.hits == 0


def test_decode_engine_computes_only_new_tokens(tiny_model):
    """The pushed KV is used: once it arrived, a step computes one token per request."""
    decode, receiver = _decode(tiny_model("llama"))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eos = decode.config.model.eos_token_ids
    for i in range(3):
        receiver.reserve(decode, _request(f"r{i}", list(range(3, 50 + i)), params, eos))
    assert not decode.has_work()  # waiting for KV needs no step
    for i in range(3):
        receiver.kv_arrived(f"r{i}", [7])
    assert decode.has_work()  # the arrivals are queued to decode
    scheduled = decode.scheduler.schedule()
    assert [s.num_tokens for s in scheduled.scheduled] == [1, 1, 1]
    assert sorted(s.start for s in scheduled.scheduled) == [47, 48, 49]
    assert all(s.request.output_token_ids == [7] for s in scheduled.scheduled)
    decode.abort_requests([f"r{i}" for i in range(3)])
    decode.check_integrity(expect_all_free=True)


def test_unclaimed_reservation_is_freed_on_abort(tiny_model):
    decode, receiver = _decode(tiny_model("llama"), num_blocks=8)
    params = SamplingParams(max_tokens=4)
    request = _request("r", list(range(3, 60)), params, decode.config.model.eos_token_ids)
    reservation = receiver.reserve(decode, request)
    assert len(reservation.block_ids) == 4 and reservation.num_cached_tokens == 0
    assert request.status == RequestStatus.WAITING_FOR_KV
    assert not decode.has_work()
    decode.abort_requests(["r"])
    decode.check_integrity(expect_all_free=True)
    with pytest.raises(KeyError, match="no reservation"):
        receiver.kv_arrived("r", [5])


def test_a_reservation_that_does_not_fit_now_is_refused_and_forgotten(tiny_model):
    from engine.errors import EngineOverloadedError

    decode, receiver = _decode(tiny_model("llama"), num_blocks=8)
    params = SamplingParams(max_tokens=4)
    eos = decode.config.model.eos_token_ids
    receiver.reserve(decode, _request("a", list(range(3, 60)), params, eos))  # 4 blocks
    with pytest.raises(EngineOverloadedError):
        receiver.reserve(decode, _request("b", list(range(3, 90)), params, eos))  # 6 more
    decode.abort_requests(["a"])
    receiver.reserve(decode, _request("b", list(range(3, 90)), params, eos))  # fits now
    with pytest.raises(ValueError, match="already has a reservation"):
        receiver.reserve(decode, _request("b", [5, 6], params, eos))
    decode.abort_requests(["b"])
    decode.check_integrity(expect_all_free=True)


def test_arrival_of_an_aborted_request_is_dropped(tiny_model):
    decode, receiver = _decode(tiny_model("llama"))
    params = SamplingParams(max_tokens=4)
    receiver.reserve(decode, _request("r", list(range(3, 40)), params, (0,)))
    receiver.kv_arrived("r", [5])
    decode.abort_requests(["r"])  # before any step took the arrival
    assert not decode.has_work() and not decode.scheduler.requests
    decode.check_integrity(expect_all_free=True)


def test_first_token_that_finishes_is_not_handed_off(tiny_model):
    prefill, saves = _prefill(tiny_model("llama"))
    params = SamplingParams(temperature=0, max_tokens=1)
    eos = prefill.config.model.eos_token_ids
    prefill.add_request(_request("r", [5, 6, 7], params, eos, kv_transfer=KVHandoff()))
    outs = [o for _ in range(3) for o in prefill.step()]
    assert outs[-1].finish_reason == "length" and not outs[-1].handed_off
    assert list(saves) == ["r"]  # taken before the token was sampled; the service drops it
    prefill.check_integrity(expect_all_free=True)


def test_layerwise_export_equals_the_copy_after_the_step(tiny_model):
    """A layer-wise save (engine.kv_connector.layerwise) captures exactly what the copy after
    the step does, for prompts spanning several chunks and with a prefix already on the decode
    side; each layer is ready before the step ends."""
    import asyncio

    model_dir = tiny_model("llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    rng = random.Random(1)
    shared = [rng.randrange(3, 512) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(n)] for n in (3, 50, 75)]
    (copy_side, copies), (layerwise_side, exports) = _prefill(model_dir), _prefill(model_dir, True)
    eos = copy_side.config.model.eos_token_ids
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        cached = 16 * (i > 0)  # the decode side holds the first block of the later prompts
        for core in (copy_side, layerwise_side):
            handoff = KVHandoff(num_cached_tokens=cached)
            core.add_request(_request(rid, prompt, params, eos, kv_transfer=handoff))
        assert _drain(copy_side) == _drain(layerwise_side)
        copied, export = copies.pop(rid).layers, exports.pop(rid).layers
        assert export.num_layers == copied.num_layers

        async def all_ready(export=export):
            for layer in range(export.num_layers):
                await asyncio.wait_for(export.ready(layer), 1)

        asyncio.run(all_ready())
        for layer in range(copied.num_layers):
            assert export.event(layer) is None  # CPU: the copy is done when enqueued
            assert export.layer(layer).equal(copied.layer(layer))
    for core in (copy_side, layerwise_side):
        core.check_integrity(expect_all_free=True)


def test_a_failed_step_cancels_its_layerwise_exports(tiny_model):
    import asyncio

    from engine.kv_connector.layerwise import ExportCancelled

    core, saves = _prefill(tiny_model("llama"), layerwise=True)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eos = core.config.model.eos_token_ids
    # A token id past the vocabulary (the core does not validate; the services do) makes the
    # forward pass itself fail, as a device error would.
    prompt = [*range(5, 24), 10**6]
    core.add_request(_request("r", prompt, params, eos, kv_transfer=KVHandoff()))
    with pytest.raises(IndexError):
        core.step()
    with pytest.raises(ExportCancelled):
        asyncio.run(saves["r"].layers.ready(0))
