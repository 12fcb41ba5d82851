"""The KV connector seam (engine.kv_connector): the registry, the hooks as an engine calls them,
blocks held for a save after a request finishes, and extra tensors carried with the KV from a
prefill engine to a decode engine over the real TCP transport."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore
from engine.kv_connector import (
    FinishedTransfers,
    KVConnector,
    KVConnectorConfig,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    kv_connector_names,
    make_kv_connector,
    register_kv_connector,
)
from engine.kv_connector.push import KVSave
from engine.kv_connector.receive import ReceiveConnector
from engine.request import KVHandoff, Request
from engine.sampling_params import SamplingParams
from engine.scheduler.output import SchedulerOutput
from kv_transfer import TcpKVReceiver, TcpKVSender, TransferSpec

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
MAX_TOKENS = 6
PROMPTS = [list(range(5, 45)), list(range(5, 30)) + [7, 8], [100, 101, 102]]


def _config(model_dir, num_blocks=64) -> EngineConfig:
    return EngineConfig(
        ModelConfig.from_pretrained(model_dir),
        CacheConfig(num_blocks=num_blocks),
        SchedulerConfig(max_num_batched_tokens=32),
    )


def _request(rid: str, prompt: list[int], **kw) -> Request:
    return Request(rid, list(prompt), GREEDY, MAX_TOKENS, **kw)


def _drain(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def _generate(core: EngineCore) -> dict[str, list[int]]:
    for i, prompt in enumerate(PROMPTS):
        core.add_request(_request(f"r{i}", prompt))
    return _drain(core)


# --- a connector of the test's own, registered by name ------------------------------------------


class EveryLayer(KVConnectorMetadata):
    @property
    def per_layer(self) -> bool:
        return True


class HoldingScheduler(KVConnectorScheduler):
    """Asks for per-layer hooks in every step; keeps every finished request's blocks."""

    def __init__(self) -> None:
        self.finished: dict[str, list[int]] = {}

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        return 0

    def update_state_after_alloc(
        self, request: Request, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        raise AssertionError("no KV arrives")

    def build_connector_meta(self, scheduled: SchedulerOutput) -> KVConnectorMetadata:
        return EveryLayer()

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> bool:
        self.finished[request.request_id] = list(block_ids)
        return True


class HoldingWorker(KVConnectorWorker):
    """Records the hooks; reports the saves the test marks done."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.kv_caches: list[torch.Tensor] = []
        self.done: list[str] = []

    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self.kv_caches = list(kv_caches)

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        self.calls.append(("start", -1))

    def wait_for_layer_load(self, layer: int) -> None:
        self.calls.append(("load", layer))

    def save_kv_layer(self, layer: int, kv_cache: torch.Tensor) -> None:
        assert kv_cache is self.kv_caches[layer]
        self.calls.append(("save", layer))

    def wait_for_save(self) -> None:
        self.calls.append(("wait", -1))

    def get_finished(self) -> FinishedTransfers:
        saved, self.done = tuple(self.done), []
        return FinishedTransfers(saved=saved)


class HoldingConnector(KVConnector):
    def __init__(self, engine_config: EngineConfig) -> None:
        self.holding = HoldingScheduler()
        self.hooks = HoldingWorker()
        super().__init__(self.holding, self.hooks)


register_kv_connector("test-holding", HoldingConnector)


def test_the_registry_makes_connectors_by_name(tiny_model):
    config = _config(tiny_model("llama"))
    assert {"push", "receive", "test-holding"} <= set(kv_connector_names())
    connector = make_kv_connector(KVConnectorConfig("test-holding"), config)
    assert isinstance(connector, HoldingConnector) and connector.name == "test-holding"
    assert isinstance(make_kv_connector(KVConnectorConfig("receive"), config), ReceiveConnector)
    with pytest.raises(ValueError, match="unknown KV connector 'nope'.*push, receive"):
        make_kv_connector(KVConnectorConfig("nope"), config)
    with pytest.raises(ValueError, match="already registered"):
        register_kv_connector("push", HoldingConnector)


def test_hooks_run_around_every_layer_and_outputs_are_unchanged(tiny_model):
    model_dir = tiny_model("llama")
    expected = _generate(EngineCore(_config(model_dir)))
    connector = HoldingConnector(_config(model_dir))
    core = EngineCore(_config(model_dir), connector)
    assert _generate(core) == expected
    num_layers = len(connector.hooks.kv_caches)
    per_step = [("start", -1), ("load", 0)]
    for i in range(num_layers):
        per_step += [("save", i)] + ([("load", i + 1)] if i + 1 < num_layers else [])
    per_step.append(("wait", -1))
    calls = connector.hooks.calls
    assert len(calls) % len(per_step) == 0 and calls == per_step * (len(calls) // len(per_step))
    assert len(calls) // len(per_step) == core.scheduler.num_steps


def test_blocks_of_a_delayed_save_are_freed_when_it_finishes(tiny_model):
    core = EngineCore(_config(tiny_model("llama")), HoldingConnector(_config(tiny_model("llama"))))
    connector = core.kv_connector
    assert isinstance(connector, HoldingConnector)
    _generate(core)
    held = connector.holding.finished
    assert set(held) == {"r0", "r1", "r2"} and not core.scheduler.requests
    core.check_integrity()  # consistent, but the blocks are still in use
    assert core.kv.num_free_blocks() < core.kv.pool.num_blocks
    with pytest.raises(ValueError, match="already running"):
        core.add_request(_request("r0", [5, 6, 7]))  # its blocks are still held under its id
    with pytest.raises(ValueError, match="only while the engine is empty"):
        core.set_kv_connector(None)  # the connector still reads the blocks
    connector.hooks.done = ["r0", "r1", "r2"]
    assert not core.has_work()  # polls get_finished: the blocks go
    core.check_integrity(expect_all_free=True)


def test_a_connector_is_installed_only_while_the_engine_is_empty(tiny_model):
    config = _config(tiny_model("llama"))
    core = EngineCore(config)
    core.add_request(_request("r", [5, 6, 7]))
    with pytest.raises(ValueError, match="only while the engine is empty"):
        core.set_kv_connector(HoldingConnector(config))
    core.abort_requests(["r"])
    core.set_kv_connector(HoldingConnector(config))
    core.set_kv_connector(None)
    assert core.kv_connector is None and core.scheduler.connector is None


# --- extra tensors, prefill engine -> TCP -> decode engine ---------------------------------------


def _push_core(model_dir, layerwise=False) -> tuple[EngineCore, dict[str, KVSave]]:
    saves: dict[str, KVSave] = {}
    config = _config(model_dir)
    options = {"layerwise": layerwise, "on_save": lambda s: saves.__setitem__(s.request_id, s)}
    return EngineCore(config, make_kv_connector(KVConnectorConfig("push", options), config)), saves


def test_extras_travel_with_the_kv_over_tcp(tiny_model):
    """`save_extras` on the prefill side, the TCP transport, `get_extras` on the decode side; the
    decode engine's tokens are the single engine's."""
    model_dir = tiny_model("qwen2")
    prompt = PROMPTS[0]
    (expected,) = _generate_one(EngineCore(_config(model_dir)), prompt)
    prefill, saves = _push_core(model_dir)
    decode_config = _config(model_dir)
    receive = make_kv_connector(KVConnectorConfig("receive"), decode_config)
    assert isinstance(receive, ReceiveConnector)
    decode = EngineCore(decode_config, receive)
    hidden = torch.randn(64)

    async def transfer() -> int:
        receiver, sender = TcpKVReceiver(receive.kv_caches), TcpKVSender()
        await receiver.start()
        try:
            reservation = receive.reserve(decode, _request("r", prompt))
            deadline = time.time() + 10
            arrived = receiver.expect("r", reservation.block_ids, deadline)
            handoff = KVHandoff(reservation.num_cached_tokens)
            prefill.add_request(_request("r", prompt, kv_transfer=handoff))
            _worker(prefill).save_extras("r", {"hidden_states": hidden})
            (first,) = _drain(prefill)["r"]
            save = saves.pop("r")
            spec = TransferSpec("r", receiver.endpoint, reservation.block_ids, deadline)
            await sender.send(spec, save.layers, save.extras)
            extras = await arrived
            receive.kv_arrived("r", [first], extras)
            return first
        finally:
            await sender.close()
            await receiver.close()

    first = asyncio.run(asyncio.wait_for(transfer(), 30))
    assert decode.has_work()
    assert receive.worker.get_extras("r")["hidden_states"].equal(hidden)
    assert [first, *_drain(decode)["r"]] == expected
    assert not receive.worker.get_extras("r")  # dropped once the request finished here
    for core in (prefill, decode):
        core.check_integrity(expect_all_free=True)


def _worker(core: EngineCore) -> KVConnectorWorker:
    assert core.kv_connector is not None
    return core.kv_connector.worker


def _generate_one(core: EngineCore, prompt: list[int]) -> list[list[int]]:
    core.add_request(_request("r", prompt))
    return [_drain(core)["r"]]


@pytest.mark.parametrize("layerwise", [False, True], ids=["after-step", "layerwise"])
def test_extras_are_taken_until_the_save_is(tiny_model, layerwise):
    prefill, saves = _push_core(tiny_model("llama"), layerwise)
    worker = _worker(prefill)
    with pytest.raises(ValueError, match="hands no KV off"):
        worker.save_extras("r", {"x": torch.ones(2)})  # not added yet
    prefill.add_request(_request("plain", [5, 6, 7]))
    with pytest.raises(ValueError, match="hands no KV off"):
        worker.save_extras("plain", {"x": torch.ones(2)})
    prefill.add_request(_request("r", PROMPTS[0], kv_transfer=KVHandoff()))
    worker.save_extras("r", {"a": torch.ones(2)})
    worker.save_extras("r", {"b": torch.zeros(3)})
    _drain(prefill)
    assert sorted(saves["r"].extras) == ["a", "b"] and "plain" not in saves
    with pytest.raises(ValueError, match="hands no KV off"):
        worker.save_extras("r", {"late": torch.ones(1)})  # handed off: gone from the engine
    prefill.check_integrity(expect_all_free=True)


def test_extras_given_during_a_layerwise_step_are_refused(tiny_model):
    """A layer-wise save is announced (and starts sending) before the forward pass: extras
    produced during that step can no longer join it."""
    prefill, saves = _push_core(tiny_model("llama"), layerwise=True)
    worker = _worker(prefill)
    refused: list[str] = []
    hook = worker.save_kv_layer

    def save_kv_layer(layer: int, kv_cache: torch.Tensor) -> None:
        hook(layer, kv_cache)
        if layer == 0:
            try:
                worker.save_extras("r", {"hidden_states": torch.ones(4)})
            except ValueError as e:
                refused.append(str(e))

    worker.save_kv_layer = save_kv_layer  # type: ignore[method-assign]
    prefill.add_request(_request("r", [5, 6, 7], kv_transfer=KVHandoff()))
    _drain(prefill)
    assert refused and "already taken" in refused[0] and not saves["r"].extras
