"""Seeded fuzzing of the OpenAI endpoints over real sockets: a router (in a thread) in front of a
real colocated tiny-model worker process. Valid bodies of /v1/completions and
/v1/chat/completions get their values mutated (wrong types, huge, negative, NaN numbers, unknown
fields, deep nesting, empty, huge and non-Unicode strings) and their encoding broken (truncated
JSON, invalid UTF-8, wrong content types), and are sent a batch at a time over pooled keep-alive
connections. Every answer must be a 2xx or a 4xx in OpenAI's error shape: no 5xx, no reset or
dropped connection. Afterwards the router is healthy, still serves, and the worker's KV blocks
are all free.

Hypothesis picks the seeds (derandomized: the same ones every run; a failure names its seed);
each seeds a `random.Random` that builds one batch. Its choices are uniform, where hypothesis's
own draws favour simple values and would rarely reach the edges in a thousand requests."""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from concurrent import futures
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.baton.v1 import common_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.openai import completions
from router.openai.fields import NO_OP, NOT_SUPPORTED_YET
from router.openai.protocol import ChatCompletionRequest, CompletionRequest
from router.testing import RouterThread
from tests.workers import WorkerProcess

NUM_BLOCKS = 64
CONTEXT = 64  # tokens: the worker's max_model_len, so no generation runs long
BATCH = 8  # requests sent at once
EXAMPLES = 128  # batches: 1,024 requests
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"

FIELD_NAMES = sorted(
    {*CompletionRequest.model_fields, *ChatCompletionRequest.model_fields}
    | {*NOT_SUPPORTED_YET, *NO_OP}
)


@pytest.fixture(scope="module")
def worker(tiny_model):
    flags = ("--role", "colocated", "--num-kv-blocks", str(NUM_BLOCKS))
    flags += ("--max-model-len", str(CONTEXT))
    process = WorkerProcess("decode_service", tiny_model("qwen2"), *flags)
    yield process.address
    process.stop()


@pytest.fixture(scope="module")
def router(tiny_model, worker):
    config = RouterConfig(str(tiny_model("qwen2")), colocated=[worker], port=0, grpc_port=0)
    with RouterThread(config) as thread:
        yield thread


# Values: the edges of every wire type, and what JSON parsers let through.
INTS = [0, 1, 2, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1]
FLOATS = [0.0, -0.0, 0.5, 1.5, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]
STRINGS = ["", "hi", "x" * 100_000, "\ud800", "a\udfffb", "\x00", "é😀", "\u202e", "none", "text"]
HUGE_LISTS = [[1] * 100_000, list(range(3000)), [[1, 2]] * 3000, ["a"] * 3000]
DEEP_MARK = "@deep-"  # "@deep-N" is sent as N nested arrays (too deep for json.dumps)

NUMBERS = ["n", "best_of", "max_tokens", "max_completion_tokens", "min_tokens", "logprobs",
           "top_logprobs", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "priority", "length_penalty"]  # fmt: skip
TOKEN_LISTS = ["stop_token_ids", "allowed_token_ids", "prompt"]
TEXTS = ["prompt", "stop", "user", "cache_salt", "model", "suffix", "request_id"]
OPTIONS: dict[str, list[Any]] = {  # valid values of optional fields
    "temperature": [0.0, 0.8], "top_p": [0.5, 1.0], "top_k": [-1, 0, 5], "min_p": [0.0, 0.1],
    "seed": [0, 7], "stop": ["\n", ["a", "b"]], "n": [1, 2], "stream": [False, True],
    "logit_bias": [{"5": 2.0}], "min_tokens": [0, 2], "ignore_eos": [True], "user": ["tenant-a"],
    "priority": [-2, 2], "cache_salt": ["salt"], "stop_token_ids": [[3]],
    "allowed_token_ids": [[5, 6, 7, 8]], "presence_penalty": [0.5], "repetition_penalty": [1.2],
    "store": [True], "best_of": [1], "tool_choice": ["none"],
    # structured outputs: valid specs, one the worker cannot compile, and (two drawn) conflicts
    "response_format": [{"type": "text"}, {"type": "json_object"},
                        {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                            "type": "object", "properties": {"a": {"type": "integer"}}}}}],
    "guided_choice": [["yes", "no"]], "guided_regex": ["[a-z]{1,3}", "(x"],
    "structured_outputs": [{"choice": ["a", "b"]}, {"regex": "[0-9]+"},
                           {"regex": "[0-9]+", "whitespace_pattern": " "}],  # the last: a 400
}  # fmt: skip


def _text(r: random.Random) -> str:
    """A short random string of any code points (lone surrogates included)."""
    return "".join(chr(r.choice([r.randrange(32, 127), r.randrange(0x110000)])) for _ in range(5))


def _value(r: random.Random, depth: int = 0) -> Any:
    """Any JSON value: an edge scalar, random text, or a small list or object of values."""
    kind = r.randrange(8 if depth < 3 else 6)
    scalars = [INTS, FLOATS, STRINGS, [True, False, None]]
    if kind < len(scalars):
        return r.choice(scalars[kind])
    if kind == 4:
        return _text(r)
    if kind == 5:
        return r.choice([f"{DEEP_MARK}{r.randrange(1, 5000)}", *HUGE_LISTS])
    if kind == 6:
        return [_value(r, depth + 1) for _ in range(r.randrange(4))]
    return {_text(r): _value(r, depth + 1) for _ in range(r.randrange(4))}


def _base(r: random.Random, path: str) -> dict[str, Any]:
    """A valid body for `path` with a few optional fields."""
    if path == COMPLETIONS:
        body: dict[str, Any] = {"prompt": r.choice(["Hello", [1, 2, 3], ["a", "b"], [[5, 6]]])}
        options = {**OPTIONS, "logprobs": [0, 2], "echo": [True]}
    else:
        body = {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}
        options = {**OPTIONS, "logprobs": [True]}
    body["max_tokens"] = r.randrange(1, 5)
    for name in r.sample(sorted(options), r.randrange(4)):
        body[name] = r.choice(options[name])
    return body


def _mutate(r: random.Random, body: dict[str, Any]) -> None:
    """One change to `body`: an odd number, token id, text or value in a field (known or not),
    an odd message, or a field dropped."""
    kind = r.choice(["number"] * 3 + ["ids", "text", "message", "known", "unknown", "drop"])
    if kind == "number":
        body[r.choice(NUMBERS)] = r.choice(INTS + FLOATS)
    elif kind == "ids":
        body[r.choice(TOKEN_LISTS)] = [r.choice(INTS) for _ in range(r.randrange(1, 4))]
        body["logit_bias"] = {r.choice([str(r.choice(INTS)), _text(r)]): r.choice(FLOATS)}
    elif kind == "text":
        body[r.choice(TEXTS)] = r.choice([*STRINGS, _text(r)])
    elif kind == "message":
        keys = r.sample(["role", "content", "name", _text(r)], r.randrange(1, 4))
        body["messages"] = [{key: _value(r) for key in keys}, *body.get("messages", [])]
    elif kind == "known":
        body[r.choice(FIELD_NAMES)] = _value(r)
    elif kind == "unknown":
        body[_text(r)] = _value(r)
    elif body:
        body.pop(r.choice(sorted(body)))


def _request(r: random.Random) -> tuple[str, bytes, dict[str, str]]:
    """(path, body bytes, headers): a valid body with 0 to 3 mutations (mostly 0 or 1), or now and
    then some other JSON value; its encoding sometimes broken."""
    path = r.choice([COMPLETIONS, CHAT])
    body: Any = _base(r, path)
    for _ in range(r.choice([0, 0, 1, 1, 2, 3])):
        _mutate(r, body)
    if r.random() < 0.05:
        body = _value(r)
    content, headers = _encode(body), {"content-type": "application/json"}
    broken = r.choice(["none"] * 9 + ["truncate", "bad_utf8", "content_type"])
    if broken == "truncate":
        content = content[: r.randrange(len(content))]
    elif broken == "bad_utf8":
        at = r.randrange(len(content) + 1)
        content = content[:at] + r.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + content[at:]
    elif broken == "content_type":
        kind = r.choice(["text/plain", "application/x-www-form-urlencoded", ""])
        headers = {"content-type": kind} if kind else {}
    return path, content, headers


def _encode(body: Any) -> bytes:
    """JSON as Python writes it (NaN and Infinity too), lone surrogates kept as escapes."""
    text = json.dumps(body)
    for depth in set(re.findall(rf'"{DEEP_MARK}(\d+)"', text)):
        text = text.replace(f'"{DEEP_MARK}{depth}"', "[" * int(depth) + "]" * int(depth))
    return text.encode()


def _check(response: httpx.Response, request: tuple[str, bytes, dict[str, str]]) -> None:
    """2xx with a complete body, or 4xx in OpenAI's error shape."""
    status, shown = response.status_code, (request[0], request[1][:300], request[2])
    assert status < 500, f"{status} {response.text[:500]} for {shown}"
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, shown
        assert isinstance(error["message"], str) and error["message"], shown
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), shown
        assert '"error"' not in response.text, f"{response.text[-500:]} for {shown}"
    else:
        assert response.json()["choices"], shown


def test_fuzzed_requests_get_2xx_or_openai_shaped_4xx(router, worker):
    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=BATCH, max_keepalive_connections=BATCH)
    with (
        httpx.Client(base_url=router.base_url, timeout=60, limits=limits) as client,
        futures.ThreadPoolExecutor(BATCH) as pool,
    ):

        def send(request: tuple[str, bytes, dict[str, str]]) -> int:
            path, content, headers = request
            response = client.post(path, content=content, headers=headers)  # raises on a reset
            _check(response, request)
            return response.status_code

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.integers(0, 2**64 - 1))
        def run(seed: int) -> None:
            r = random.Random(seed)  # hypothesis picks seeds; the choices are uniform
            batch = [_request(r) for _ in range(BATCH)]
            for done in futures.as_completed([pool.submit(send, request) for request in batch]):
                statuses[done.result()] += 1

        run()
    assert sum(statuses.values()) >= 1000
    assert statuses[200] >= 100 and statuses[400] >= 300, statuses  # both paths exercised
    assert httpx.get(f"{router.base_url}/health").status_code == 200
    body = {"prompt": "Hello", "max_tokens": 3}
    assert httpx.post(f"{router.base_url}{COMPLETIONS}", json=body).status_code == 200
    _assert_all_blocks_free(worker)


def test_an_unexpected_error_is_a_500_that_keeps_the_connection_open(router, monkeypatch):
    """The resets of the first fuzz runs: a bug's 500 escaped the app, so uvicorn closed the
    keep-alive connection after answering, and the client's next request on it was reset."""

    def broken(body: object, services: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(completions, "start_job", broken)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with httpx.Client(base_url=router.base_url, timeout=30) as client:  # one connection, reused
        for _ in range(40):
            response = client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 1})
            assert response.status_code == 500
            assert response.json()["error"]["type"] == "server_error"
            assert client.post(CHAT, json=chat).status_code == 200


def _assert_all_blocks_free(address: str, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ColocatedWorkerStub(channel)
        while True:
            load = stub.GetLoad(common_pb2.LoadRequest(), timeout=5)
            idle = not (load.num_reserved or load.num_running or load.num_waiting)
            if idle and load.num_free_blocks == load.num_total_blocks == NUM_BLOCKS:
                return
            assert time.time() < deadline, f"the worker still holds blocks: {load}"
            time.sleep(0.05)
