"""The router's parts on their own: routing policies and block hashes, worker chunks through the
completion tracker (detokenization and stop strings as the engine does them), stream merging,
error mapping."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.block_hash import hash_prompt_blocks, request_extra_keys
from common.completion import CompletionTracker
from common.fan_out import FanOut
from common.sampling_params import SamplingParams
from common.tokenizer import load_tokenizer
from proto.baton.v1 import common_pb2
from router.completion import CompletionDelta, apply_chunk
from router.config import parse_args
from router.errors import (
    InvalidRequestError,
    NoWorkerError,
    OverloadedError,
    RouterError,
    from_rpc_error,
)
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


class _Completion:
    """One completion of a request, fed worker chunks the way `Generation` feeds them."""

    def __init__(self, tokenizer, prompt: list[int], **params) -> None:
        self.fan_out = FanOut(
            "r", SamplingParams(**params), lambda i, p: CompletionTracker(i, tokenizer, p, prompt)
        )
        self.tracker = self.fan_out.first

    def add(self, chunk: common_pb2.TokenChunk) -> CompletionDelta | None:
        return apply_chunk(self.fan_out, "r", chunk, str)


def test_stop_string_inside_a_chunk_ends_at_its_token(tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    text_ids = tokenizer.encode(" there was a little town by the sea")
    completion = _Completion(tokenizer, prompt, stop=["little"])
    delta = completion.add(common_pb2.TokenChunk(token_ids=text_ids))
    assert delta is not None and delta.finish_reason == "stop" and delta.stop_reason == "little"
    tracker = completion.tracker
    assert tracker.finished_here  # the worker is still going: the caller aborts it
    assert tracker.text == " there was a " == delta.text
    assert len(tracker.token_ids) < len(text_ids)  # tokens after the stop string are dropped
    assert delta.token_ids == tracker.token_ids
    assert tokenizer.decode(tracker.token_ids).endswith("little")
    assert completion.fan_out.finished


def test_eos_text_is_hidden_and_finish_comes_from_the_worker(tokenizer):
    eos = 2  # <|im_end|>
    ids = tokenizer.encode(" hello")
    completion = _Completion(tokenizer, [5, 6, 7], skip_special_tokens=False)
    completion.add(common_pb2.TokenChunk(token_ids=ids))
    delta = completion.add(common_pb2.TokenChunk(token_ids=[eos], finish_reason="stop"))
    assert delta is not None and delta.finish_reason == "stop" and delta.stop_reason is None
    tracker = completion.tracker
    assert tracker.text == " hello" and tracker.token_ids == [*ids, eos]
    assert not tracker.finished_here
    stopped = _Completion(tokenizer, [5], stop_token_ids=[9])
    chunk = common_pb2.TokenChunk(token_ids=[9], finish_reason="stop", stop_token_id=9)
    assert stopped.add(chunk).stop_reason == 9  # type: ignore[union-attr]


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    completion = _Completion(tokenizer, [5], stop=["town by"])
    parts = []
    for token in tokenizer.encode(" a little town here"):
        delta = completion.add(common_pb2.TokenChunk(token_ids=[token]))
        parts.append(delta.text if delta else "")
    assert "".join(parts) == " a little town here"[: len("".join(parts))]
    assert len("".join(parts)) <= len(" a little town here") - len("town b")


def test_worker_logprobs_become_dicts_beside_the_raw_messages(tokenizer):
    completion = _Completion(tokenizer, [5], logprobs=1)
    entries = [
        common_pb2.TokenLogprobs(token_id=t, logprob=-0.5 * t, rank=2, top_token_ids=[7],
                                 top_logprobs=[-0.1])
        for t in (11, 12)
    ]  # fmt: skip
    chunk = common_pb2.TokenChunk(token_ids=[11, 12], logprobs=entries)
    delta = completion.add(chunk)
    assert delta is not None and delta.raw_logprobs == entries
    assert [list(d) for d in delta.logprobs or []] == [[11, 7], [12, 7]]
    first = (delta.logprobs or [])[0]
    assert first[11].rank == 2 and first[7].rank == 1 and first[7].decoded_token == "7"
    assert completion.tracker.cumulative_logprob == pytest.approx(-0.5 * 11 - 0.5 * 12)


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
