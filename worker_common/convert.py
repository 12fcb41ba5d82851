"""Worker-side conversions between `baton.v1` messages and engine objects."""

from __future__ import annotations

import time

from engine.async_core import LoadSnapshot
from engine.config import ModelConfig
from engine.outputs import EngineCoreOutput
from engine.request import KVHandoff, Request
from engine.sampling.logprobs import LogprobsTensors
from engine.validation import validate_prompt
from proto.baton.v1 import common_pb2, worker_pb2
from proto.convert import params_from_proto


def request_from_proto(
    msg: worker_pb2.WorkerRequest, model: ModelConfig, kv_transfer: KVHandoff | None = None
) -> Request:
    """An engine Request; ValueError (naming the field) when the request is invalid."""
    if not msg.request_id:
        raise ValueError("request_id must not be empty")
    params = params_from_proto(msg.params)
    if params.n != 1:
        raise ValueError(f"n must be 1 in a worker request (the router fans out), got {params.n}")
    token_ids = list(msg.prompt_token_ids)
    max_tokens = validate_prompt(token_ids, params, model)
    return Request(
        msg.request_id,
        token_ids,
        params,
        max_tokens,
        tuple(model.eos_token_ids),
        msg.arrival_time or time.time(),
        priority=msg.priority,
        tenant=msg.tenant or "default",
        cache_salt=msg.cache_salt or None,
        kv_transfer=kv_transfer,
    )


def check_output(out: EngineCoreOutput) -> None:
    """ValueError (INVALID_ARGUMENT on the wire) when the engine failed the request before it
    ran: its structured-outputs grammar did not compile; the message names the field and has
    the backend's complaint."""
    if out.error is not None:
        raise ValueError(out.error)


def chunk_from_output(out: EngineCoreOutput, request: Request) -> common_pb2.TokenChunk:
    """A TokenChunk for one engine output (logprobs sliced to what the request asked for);
    ValueError for an output that carries the engine's error (`check_output`)."""
    check_output(out)
    chunk = common_pb2.TokenChunk(
        request_id=out.request_id,
        token_ids=out.new_token_ids,
        finish_reason=out.finish_reason or "",
        num_cached_tokens=out.num_cached_tokens,
    )
    if isinstance(out.stop_reason, int):
        chunk.stop_token_id = out.stop_reason
    if out.new_logprobs is not None and request.params.logprobs is not None:
        chunk.logprobs.extend(_logprobs(out.new_logprobs, request.params.logprobs))
    return chunk


def _logprobs(rows: LogprobsTensors, num_top: int) -> list[common_pb2.TokenLogprobs]:
    width = rows.token_ids.shape[1] if num_top == -1 else min(1 + num_top, rows.token_ids.shape[1])
    ids, values, ranks = rows.token_ids.tolist(), rows.logprobs.tolist(), rows.ranks.tolist()
    return [
        common_pb2.TokenLogprobs(
            token_id=ids[i][0],
            logprob=values[i][0],
            rank=ranks[i],
            top_token_ids=ids[i][1:width],
            top_logprobs=values[i][1:width],
        )
        for i in range(len(ids))
    ]


def load_to_proto(
    load: LoadSnapshot, role: str, model: ModelConfig, block_size: int
) -> common_pb2.Load:
    return common_pb2.Load(
        num_waiting=load.num_waiting,
        num_running=load.num_running,
        num_free_blocks=load.num_free_blocks,
        num_total_blocks=load.num_total_blocks,
        block_size=block_size,
        num_reserved=load.num_reserved,
        role=role,
        model=model.served_model_name,
        max_model_len=model.max_model_len,
    )
