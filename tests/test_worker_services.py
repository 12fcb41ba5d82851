"""The worker services as real processes: prefill -> KV over TCP -> decode, colocated, faults."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine import LLM, SamplingParams
from proto.baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from proto.convert import params_to_proto
from tests.workers import running

NUM_BLOCKS = 64
PROMPTS = [
    list(range(5, 45)),
    list(range(5, 30)) + [7, 8, 9],
    [100, 101, 102],
    list(range(200, 290)),
]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=20, seed=4, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True, frequency_penalty=0.5),
]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def workers(model_dir):
    flags = ("--num-kv-blocks", str(NUM_BLOCKS), "--max-num-batched-tokens", "32")
    with running(
        ("decode_service", model_dir, flags),
        ("prefill_service", model_dir, flags),
        ("decode_service", model_dir, (*flags, "--role", "colocated")),
    ) as (decode, prefill, colocated):
        yield {
            "decode": worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(decode.address)),
            "prefill": worker_pb2_grpc.PrefillWorkerStub(grpc.insecure_channel(prefill.address)),
            "colocated": worker_pb2_grpc.ColocatedWorkerStub(
                grpc.insecure_channel(colocated.address)
            ),
            "addresses": (decode.address, prefill.address, colocated.address),
        }


@pytest.fixture(scope="module")
def offline(model_dir):
    llm = LLM(str(model_dir))
    return [o.outputs[0] for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def _request(rid: str, prompt, params: SamplingParams) -> worker_pb2.WorkerRequest:
    return worker_pb2.WorkerRequest(
        request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params)
    )


def _all_free(stub) -> bool:
    deadline = time.time() + 5
    while time.time() < deadline:
        load = stub.GetLoad(common_pb2.LoadRequest(), timeout=5)
        if load.num_free_blocks == load.num_total_blocks == NUM_BLOCKS and not load.num_reserved:
            return True
        time.sleep(0.05)
    return False


def _disaggregated(workers, rid, prompt, params):
    req = _request(rid, prompt, params)
    target = (
        workers["decode"]
        .Reserve(worker_pb2.ReserveRequest(request=req, lease_seconds=10), timeout=10)
        .target
    )
    first = workers["prefill"].Prefill(
        worker_pb2.PrefillRequest(request=req, target=target), timeout=30
    )
    chunks = [first.first]
    if not first.first.finish_reason:
        decode = worker_pb2.DecodeRequest(request_id=rid, first_token_id=first.first.token_ids[0])
        chunks += list(workers["decode"].Decode(decode, timeout=30))
    return chunks, first


def test_disaggregated_equals_offline(workers, offline):
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        chunks, first = _disaggregated(workers, f"d{i}", prompt, params)
        assert first.kv_bytes > 0
        assert [t for c in chunks for t in c.token_ids] == offline[i].token_ids
        assert chunks[-1].finish_reason == "length"
        if params.logprobs:
            got = [lp.logprob for c in chunks for lp in c.logprobs]
            want = [
                entry[t].logprob
                for entry, t in zip(offline[i].logprobs, offline[i].token_ids, strict=True)
            ]
            assert got == pytest.approx(want, abs=1e-5)
            assert all(len(lp.top_token_ids) == 2 for c in chunks for lp in c.logprobs)
    assert _all_free(workers["decode"]) and _all_free(workers["prefill"])


def test_colocated_equals_offline(workers, offline):
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        chunks = list(workers["colocated"].Generate(_request(f"c{i}", prompt, params), timeout=30))
        assert [t for c in chunks for t in c.token_ids] == offline[i].token_ids
    assert _all_free(workers["colocated"])


def test_decode_worker_prefills_locally_when_asked(workers, offline):
    """Conditional disaggregation: the decode worker runs the whole request itself."""
    chunks = list(workers["decode"].Generate(_request("local", PROMPTS[0], PARAMS[0]), timeout=30))
    assert [t for c in chunks for t in c.token_ids] == offline[0].token_ids
    assert _all_free(workers["decode"])


def test_expired_lease_frees_blocks(workers):
    req = _request("lease", PROMPTS[0], PARAMS[0])
    workers["decode"].Reserve(worker_pb2.ReserveRequest(request=req, lease_seconds=0.3))
    load = workers["decode"].GetLoad(common_pb2.LoadRequest())
    assert load.num_reserved == 1 and load.num_free_blocks < NUM_BLOCKS
    time.sleep(0.6)
    assert _all_free(workers["decode"])
    with pytest.raises(grpc.RpcError) as err:
        list(workers["decode"].Decode(worker_pb2.DecodeRequest(request_id="lease")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_abort_releases_a_reservation(workers):
    req = _request("abort", PROMPTS[1], PARAMS[0])
    workers["decode"].Reserve(worker_pb2.ReserveRequest(request=req, lease_seconds=10))
    aborted = workers["decode"].Abort(common_pb2.AbortRequest(request_ids=["abort"]))
    assert aborted.num_aborted == 1
    assert _all_free(workers["decode"])


def test_abort_while_decode_waits_for_the_kv(workers):
    """An Abort that comes while Decode waits for the KV ends that call at once (NOT_FOUND) and
    drops the transfer before the blocks are freed."""
    req = _request("waiting", PROMPTS[1], PARAMS[0])
    workers["decode"].Reserve(worker_pb2.ReserveRequest(request=req, lease_seconds=30))
    decode = worker_pb2.DecodeRequest(request_id="waiting", first_token_id=5)
    call = workers["decode"].Decode(decode, timeout=30)
    time.sleep(0.3)  # the call waits for the KV
    started = time.time()
    workers["decode"].Abort(common_pb2.AbortRequest(request_ids=["waiting"]))
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "aborted" in err.value.details()
    assert time.time() - started < 5
    assert _all_free(workers["decode"])


def test_first_token_that_finishes_needs_no_transfer(workers):
    params = SamplingParams(temperature=0, max_tokens=1)
    chunks, first = _disaggregated(workers, "one", PROMPTS[0], params)
    assert first.first.finish_reason == "length" and first.kv_bytes == 0
    workers["decode"].Abort(common_pb2.AbortRequest(request_ids=["one"]))  # the router's job
    assert _all_free(workers["decode"]) and _all_free(workers["prefill"])


def test_cancelled_stream_frees_blocks(workers):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    stream = workers["colocated"].Generate(_request("cancel", PROMPTS[3], params), timeout=30)
    next(stream)
    stream.cancel()
    assert _all_free(workers["colocated"])


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], SamplingParams(), "prompt"),
        ([1] * 5000, SamplingParams(), "max_model_len"),
        ([1, 2], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_bad_requests_are_invalid_argument(workers, prompt, params, field):
    with pytest.raises(grpc.RpcError) as err:
        list(workers["colocated"].Generate(_request("bad", prompt, params), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    msg = _request("bad", [1, 2], SamplingParams())
    msg.params.top_p = 1.5
    with pytest.raises(grpc.RpcError) as err:
        workers["decode"].Reserve(worker_pb2.ReserveRequest(request=msg, lease_seconds=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()


def test_health_and_reflection(workers):
    names = ["baton.v1.DecodeWorker", "baton.v1.PrefillWorker", "baton.v1.ColocatedWorker"]
    for address, name in zip(workers["addresses"], names, strict=True):
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", name):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        listed = {s.name for s in response.list_services_response.service}
        assert {name, "grpc.health.v1.Health"} <= listed


def test_refused_push_fails_the_decode_not_the_first_token(workers):
    """The prefill worker answers before its push ends: a push the decode worker refuses (its
    reservation was dropped) fails that request's Decode; the first token still comes back."""
    req = _request("dropped", PROMPTS[0], PARAMS[0])
    reserve = worker_pb2.ReserveRequest(request=req, lease_seconds=10)
    target = workers["decode"].Reserve(reserve, timeout=10).target
    workers["decode"].Abort(common_pb2.AbortRequest(request_ids=["dropped"]))
    first = workers["prefill"].Prefill(
        worker_pb2.PrefillRequest(request=req, target=target), timeout=30
    )
    assert len(first.first.token_ids) == 1 and first.kv_bytes > 0
    decode = worker_pb2.DecodeRequest(request_id="dropped", first_token_id=first.first.token_ids[0])
    with pytest.raises(grpc.RpcError) as err:
        list(workers["decode"].Decode(decode, timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _all_free(workers["decode"]) and _all_free(workers["prefill"])


def test_reply_after_push_fails_the_prefill_on_a_refused_push(workers, model_dir):
    """With --reply-after-push the answer waits for the push, so a refusal fails the Prefill."""
    flags = ("--num-kv-blocks", str(NUM_BLOCKS), "--reply-after-push")
    with running(("prefill_service", model_dir, flags)) as (prefill,):
        stub = worker_pb2_grpc.PrefillWorkerStub(grpc.insecure_channel(prefill.address))
        req = _request("waited", PROMPTS[0], PARAMS[0])
        reserve = worker_pb2.ReserveRequest(request=req, lease_seconds=10)
        target = workers["decode"].Reserve(reserve, timeout=10).target
        workers["decode"].Abort(common_pb2.AbortRequest(request_ids=["waited"]))
        with pytest.raises(grpc.RpcError) as err:
            stub.Prefill(worker_pb2.PrefillRequest(request=req, target=target), timeout=30)
        assert "waited" in (err.value.details() or "")
        assert _all_free(stub)
    assert _all_free(workers["decode"])


def test_layerwise_push_equals_offline(workers, model_dir, offline):
    """--layerwise-push: the KV goes layer by layer while the prefill runs; same tokens."""
    flags = ("--num-kv-blocks", str(NUM_BLOCKS), "--max-num-batched-tokens", "32")
    with running(("prefill_service", model_dir, (*flags, "--layerwise-push"))) as (prefill,):
        stub = worker_pb2_grpc.PrefillWorkerStub(grpc.insecure_channel(prefill.address))
        pair = {"decode": workers["decode"], "prefill": stub}
        for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
            chunks, first = _disaggregated(pair, f"lw{i}", prompt, params)
            assert first.kv_bytes > 0
            assert [t for c in chunks for t in c.token_ids] == offline[i].token_ids
        # A first token that finishes the request: the push started anyway and is dropped.
        one = SamplingParams(temperature=0, max_tokens=1)
        chunks, first = _disaggregated(pair, "lw-one", PROMPTS[0], one)
        assert first.first.finish_reason == "length"
        workers["decode"].Abort(common_pb2.AbortRequest(request_ids=["lw-one"]))  # the router's
        assert _all_free(stub)
    assert _all_free(workers["decode"])


@pytest.mark.parametrize("target_first", [False, True], ids=["prefill-first", "target-first"])
def test_target_follows_equals_offline(workers, offline, target_first):
    """The router's overlapped path: Prefill(target_follows) runs while the decode side is
    reserved with fresh blocks; the target comes by SetTarget, before or after the Prefill."""
    i = 3  # a prompt the decode worker's cache may hold: fresh_blocks reuses none of it
    _disaggregated(workers, "warm-decode-cache", PROMPTS[i], PARAMS[i])
    rid = f"follow-{target_first}"
    req = _request(rid, PROMPTS[i], PARAMS[i])
    reserve = worker_pb2.ReserveRequest(request=req, lease_seconds=10, fresh_blocks=True)
    target = workers["decode"].Reserve(reserve, timeout=10).target
    assert target.num_cached_tokens == 0 and len(target.block_ids) * 16 >= len(PROMPTS[i])
    update = worker_pb2.PrefillTarget(request_id=rid, target=target)
    message = worker_pb2.PrefillRequest(request=req, target_follows=True)
    if target_first:
        workers["prefill"].SetTarget(update, timeout=10)
        with pytest.raises(grpc.RpcError) as err:  # one target per request
            workers["prefill"].SetTarget(update, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        first = workers["prefill"].Prefill(message, timeout=30)
    else:
        call = workers["prefill"].Prefill.future(message, timeout=30)
        time.sleep(0.3)  # the prompt is computed and waits for its target
        workers["prefill"].SetTarget(update, timeout=10)
        first = call.result()
    decode = worker_pb2.DecodeRequest(request_id=rid, first_token_id=first.first.token_ids[0])
    chunks = [first.first, *workers["decode"].Decode(decode, timeout=30)]
    assert [t for c in chunks for t in c.token_ids] == offline[i].token_ids
    assert _all_free(workers["decode"]) and _all_free(workers["prefill"])


def test_target_follows_with_a_target_is_invalid(workers):
    req = _request("both", PROMPTS[0], PARAMS[0])
    target = worker_pb2.KVTransferTarget(transfer_id="both", endpoint="tcp://127.0.0.1:1")
    message = worker_pb2.PrefillRequest(request=req, target=target, target_follows=True)
    with pytest.raises(grpc.RpcError) as err:
        workers["prefill"].Prefill(message, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "target_follows" in err.value.details()
    assert _all_free(workers["prefill"])
