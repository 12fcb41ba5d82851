"""The router's parts on their own: routing policies and block hashes, the completion tracker
(detokenization and stop strings as the engine does them), stream merging, error mapping."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.kv_cache.hashing import hash_prompt_blocks, request_extra_keys
from engine.models.loader import load_tokenizer
from engine.sampling_params import SamplingParams
from proto.baton.v1 import common_pb2
from router.completion import CompletionTracker
from router.config import parse_args
from router.errors import (
    InvalidRequestError,
    NoWorkerError,
    OverloadedError,
    RouterError,
    from_rpc_error,
)
from router.generation import child_params
from router.policies import LeastLoadedPolicy, RequestContext, RoundRobinPolicy, make_policy
from router.streams import merge_streams
from router.workers import Role, WorkerInfo


def _worker(address: str, waiting: int = 0, running: int = 0, free: int = 64) -> WorkerInfo:
    info = WorkerInfo(address, Role.DECODE, channel=None, stub=None, healthy=True)  # type: ignore[arg-type]
    info.load = common_pb2.Load(
        num_waiting=waiting, num_running=running, num_free_blocks=free, num_total_blocks=64,
        block_size=16,
    )  # fmt: skip
    return info


CTX = RequestContext.build("r", list(range(40)), ("m",), 16)


def test_round_robin_cycles():
    workers = [_worker("a"), _worker("b"), _worker("c")]
    policy = make_policy("round_robin")
    assert isinstance(policy, RoundRobinPolicy)
    assert [policy.choose(workers, CTX).address for _ in range(4)] == ["a", "b", "c", "a"]


def test_least_loaded_prefers_short_queues_then_free_blocks():
    policy = LeastLoadedPolicy()
    busy, idle_full, idle_empty = _worker("a", 2, 1), _worker("b", free=10), _worker("c", free=60)
    assert policy.choose([busy, idle_full, idle_empty], CTX) is idle_empty
    idle_empty.assigned_since_poll = 5  # routed there since the last poll: no longer the least
    assert policy.choose([busy, idle_full, idle_empty], CTX) is idle_full
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")


def test_request_context_hashes_like_the_workers():
    tokens = list(range(40))
    keys = request_extra_keys("model", "salt")
    ctx = RequestContext.build("r", tokens, keys, 16)
    assert ctx.block_hashes == hash_prompt_blocks(tokens, 16, keys) and len(ctx.block_hashes) == 2
    assert ctx.hashes_for(8) == hash_prompt_blocks(tokens, 8, keys)
    unsalted = RequestContext.build("r", tokens, request_extra_keys("model", None), 16)
    assert unsalted.block_hashes != ctx.block_hashes
    assert RequestContext.build("r", tokens, keys, None).block_hashes == []


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model("qwen2"))


def _tracker(tokenizer, prompt: list[int], **params) -> CompletionTracker:
    return CompletionTracker(0, tokenizer, SamplingParams(**params), prompt, str)


def test_stop_string_inside_a_chunk_ends_at_its_token(tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    text_ids = tokenizer.encode(" there was a little town by the sea")
    tracker = _tracker(tokenizer, prompt, stop=["little"])
    delta = tracker.add(common_pb2.TokenChunk(token_ids=text_ids))
    assert delta is not None and delta.finish_reason == "stop" and delta.stop_reason == "little"
    assert tracker.finished_here  # the worker is still going: the caller aborts it
    assert tracker.text == " there was a "
    assert len(tracker.token_ids) < len(text_ids)  # tokens after the stop string are dropped
    assert tokenizer.decode(tracker.token_ids).endswith("little")


def test_eos_text_is_hidden_and_finish_comes_from_the_worker(tokenizer):
    eos = 2  # <|im_end|>
    ids = tokenizer.encode(" hello")
    tracker = _tracker(tokenizer, [5, 6, 7], skip_special_tokens=False)
    tracker.add(common_pb2.TokenChunk(token_ids=ids))
    delta = tracker.add(common_pb2.TokenChunk(token_ids=[eos], finish_reason="stop"))
    assert delta is not None and delta.finish_reason == "stop" and delta.stop_reason is None
    assert tracker.text == " hello" and tracker.token_ids == [*ids, eos]
    assert not tracker.finished_here
    stopped = _tracker(tokenizer, [5], stop_token_ids=[9])
    chunk = common_pb2.TokenChunk(token_ids=[9], finish_reason="stop", stop_token_id=9)
    assert stopped.add(chunk).stop_reason == 9  # type: ignore[union-attr]


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    tracker = _tracker(tokenizer, [5], stop=["town by"])
    parts = []
    for token in tokenizer.encode(" a little town here"):
        delta = tracker.add(common_pb2.TokenChunk(token_ids=[token]))
        parts.append(delta.text if delta else "")
    assert "".join(parts) == " a little town here"[: len("".join(parts))]
    assert len("".join(parts)) <= len(" a little town here") - len("town b")


def test_child_params_fan_out_like_the_engine():
    params = SamplingParams(n=3, temperature=0.8, seed=10)
    assert [child_params(params, i).seed for i in range(3)] == [10, 11, 12]
    assert all(child_params(params, i).n == 1 for i in range(3))
    unseeded = SamplingParams(n=2, temperature=0.8)
    assert child_params(unseeded, 1).seed is None


def test_merge_streams_interleaves_and_cancels_on_error():
    closed: list[str] = []

    async def numbers(name: str, count: int, fail: bool = False):
        try:
            for i in range(count):
                await asyncio.sleep(0.001)
                yield f"{name}{i}"
            if fail:
                raise InvalidRequestError("boom")
            await asyncio.sleep(10)
        finally:
            closed.append(name)

    async def run() -> list[tuple[int, str]]:
        seen = []
        with pytest.raises(InvalidRequestError):
            async for item in merge_streams([numbers("a", 3, fail=True), numbers("b", 100)]):
                seen.append(item)
        await asyncio.sleep(0.01)
        return seen

    seen = asyncio.run(run())
    assert [s for i, s in seen if i == 0] == ["a0", "a1", "a2"]
    assert {i for i, _ in seen} == {0, 1}
    assert sorted(closed) == ["a", "b"]  # the still-running stream was closed too


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, metadata=()) -> None:
        self._code, self._metadata = code, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"

    def trailing_metadata(self):
        return self._metadata


@pytest.mark.parametrize(
    ("code", "kind", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError, 400),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError, 429),
        (grpc.StatusCode.UNAVAILABLE, NoWorkerError, 503),
        (grpc.StatusCode.INTERNAL, RouterError, 500),
    ],
)
def test_worker_errors_map_to_api_errors(code, kind, status):
    error = from_rpc_error(_Error(code, (("retry-after", "2.5"),)), "prefill on x")
    assert type(error) is kind and error.http_status == status
    if isinstance(error, OverloadedError):
        assert error.retry_after_s == 2.5


def test_command_line():
    workers = ["--prefill", "a:1", "b:2", "--prefill", "c:3", "--decode", "d:4"]
    config = parse_args(["--model", "/models/tiny", *workers])
    assert config.prefill == ["a:1", "b:2", "c:3"] and config.decode == ["d:4"]
    assert config.served_model_name == "tiny" and config.policy == "prefix_aware"
    assert parse_args(["--model", "m", "--prefix-index", "none", *workers]).policy == "least_loaded"
    for bad in (["--model", "m"], ["--model", "m", "--prefill", "a:1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
