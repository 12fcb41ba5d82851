"""Baton's gRPC client: `baton.v1.Router/Generate`, server streaming.

Token ids go as `token_ids`, text as `text`, chat messages as `chat`; a structured-outputs
constraint as `SamplingParams.structured_outputs`. Every streamed
`GenerateResponse` with text or token ids is a piece of the answer; output tokens are counted
from the token ids (the final `usage` wins when present, and carries `cached_tokens`).
"""

from __future__ import annotations

from typing import cast

import grpc

from bench.client import ClientOptions, StreamClock
from bench.records import RequestRecord
from bench.workload import BenchRequest, Message, prompt_kind
from proto.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from proto.convert import structured_to_proto


class BatonGrpcClient:
    """Streams `Generate` calls to the router's gRPC front at `address` (host:port)."""

    name = "grpc"

    def __init__(self, address: str, options: ClientOptions) -> None:
        self.address = address
        self.options = options
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def message(self, request: BenchRequest) -> router_pb2.GenerateRequest:
        """The GenerateRequest for `request`."""
        structured = request.structured_outputs
        params = common_pb2.SamplingParams(
            max_tokens=request.max_tokens,
            temperature=self.options.temperature,
            ignore_eos=self.options.ignore_eos and structured is None,
        )
        if structured is not None:
            params.structured_outputs.CopyFrom(structured_to_proto(structured))
        msg = router_pb2.GenerateRequest(
            model=self.options.model, params=params, tenant=request.tenant
        )
        prompt = request.prompt
        kind = prompt_kind(prompt)
        if kind == "messages":
            messages = cast(list[Message], prompt)
            chat = [router_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
            msg.chat.CopyFrom(router_pb2.ChatMessages(messages=chat))  # type: ignore[arg-type]
        elif kind == "text":
            assert isinstance(prompt, str)
            msg.text = prompt
        else:
            msg.token_ids.CopyFrom(router_pb2.TokenIds(ids=prompt))  # type: ignore[arg-type]
        return msg

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(index=request.index, session=request.session, turn=request.turn)
        message = self.message(request)
        clock = StreamClock()
        pieces: list[str] = []
        tokens = 0
        try:
            stream = self._stub.Generate(message, timeout=self.options.timeout_s)
            async for response in stream:
                if response.text or response.token_ids:
                    clock.piece()
                    pieces.append(response.text)
                    tokens += len(response.token_ids)
                if response.HasField("usage"):
                    _read_usage(response.usage, record)
        except grpc.aio.AioRpcError as exc:
            record.error = f"gRPC {exc.code().name}: {exc.details()}"[:300]
        clock.finish(record)
        record.success = not record.error
        record.text = "".join(pieces)
        if record.success:
            record.output_tokens = record.output_tokens or tokens
            record.ttft_s = record.e2e_s if record.ttft_s is None else record.ttft_s
        return record

    async def aclose(self) -> None:
        await self._channel.close()


def _read_usage(usage: router_pb2.Usage, record: RequestRecord) -> None:
    record.prompt_tokens = usage.prompt_tokens
    record.output_tokens = usage.completion_tokens
    record.cached_tokens = usage.cached_tokens
