"""The public gRPC API, `baton.v1.Router/Generate` (server streaming), over the same
preprocessing and generation as the HTTP API, plus grpc.health.v1 and reflection.

Errors abort the call with the RouterError's code: INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, UNAVAILABLE (DEADLINE_EXCEEDED; INTERNAL for a bug only). Bad input is
always INVALID_ARGUMENT naming the field: bytes that do not parse (a string that is not UTF-8),
fields the schema lacks (proto3 parsers keep them as unknown fields: a newer client's, or a
wrong number), values out of the engine's ranges. A client that cancels the call aborts the
request on every worker.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prefix_index.memory import InProcessPrefixIndex
from prefix_index.service import ADD_TO_SERVER as add_index_servicer
from prefix_index.service import SERVICE_NAME as INDEX_SERVICE_NAME
from prefix_index.service import PrefixIndexServicer
from proto.baton.v1 import router_pb2, router_pb2_grpc
from proto.convert import params_from_proto
from router.auth import APIKeyInterceptor
from router.completion import CompletionDelta
from router.errors import InvalidRequestError, RouterError
from router.generation import Generation
from router.preprocess import GenerationRequest, params_error
from router.services import RouterServices

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Bytes that do not parse as a GenerateRequest; `reason` is the parser's."""

    reason: str


def parse_request(data: bytes) -> router_pb2.GenerateRequest | MalformedRequest:
    """The request deserializer: never raises (grpc answers INTERNAL when one does)."""
    try:
        return router_pb2.GenerateRequest.FromString(data)
    except DecodeError as error:
        return MalformedRequest(str(error))


def unknown_field(message: Message, path: str = "") -> str | None:
    """The first field unknown to the schema in `message` or a message inside it, as "field
    number 42 in params" (`path` names `message`), None when there is none."""
    unknown = UnknownFieldSet(message)  # type: ignore[no-untyped-call]
    if len(unknown):
        where = f" in {path}" if path else ""
        return f"field number {unknown[0].field_number}{where}"
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
            continue
        inner = f"{path}.{field.name}" if path else field.name
        items = enumerate(value) if field.is_repeated else [(None, value)]
        for index, item in items:
            found = unknown_field(item, inner if index is None else f"{inner}.{index}")
            if found:
                return found
    return None


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Serves `Generate`: one message per completion delta; usage on the request's last."""

    def __init__(self, services: RouterServices) -> None:
        self.services = services
        self._active: set[str] = set()  # request ids in flight (ids must be unique)

    async def Generate(  # noqa: N802 - the gRPC method's name
        self,
        request: router_pb2.GenerateRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Stream the request's completions; abort the call with the error's status code."""
        try:
            gen_request = self._build(request)
        except RouterError as error:
            self.services.metrics.request_failed(error.http_status)
            await context.abort(error.grpc_code, error.message)
            return
        except Exception as error:  # a bug: say so rather than grpc's bare UNKNOWN
            log.exception("building a gRPC request failed")
            self.services.metrics.request_failed(500)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")
            return
        request_id = gen_request.request_id
        self._active.add(request_id)
        try:
            async for message in self._generate(gen_request):
                yield message
        except RouterError as error:
            self.services.metrics.request_failed(error.http_status)
            await context.abort(error.grpc_code, error.message)
        finally:
            self._active.discard(request_id)

    async def _generate(
        self, request: GenerationRequest
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        generation = self.services.generator.start(request)
        async for delta in generation:
            message = _response(request.request_id, delta)
            if generation.finished:
                _add_usage(message, generation)
            yield message

    def _build(self, request: router_pb2.GenerateRequest | MalformedRequest) -> GenerationRequest:
        if isinstance(request, MalformedRequest):
            raise InvalidRequestError(f"the request does not parse: {request.reason}")
        unknown = unknown_field(request)
        if unknown is not None:
            message = f"unknown {unknown}: this server's baton.v1.GenerateRequest lacks it"
            raise InvalidRequestError(message, code="unknown_parameter")
        pre = self.services.preprocessor
        pre.check_model(request.model)
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        if request_id in self._active:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        token_ids, text = self._prompt(request)
        try:
            params = params_from_proto(request.params)
        except ValueError as error:
            raise params_error(error) from error
        if not request.params.HasField("max_tokens"):
            params = replace(params, max_tokens=None)  # unset: up to the end of the context
        param = "chat" if request.WhichOneof("input") == "chat" else "input"
        salt = request.cache_salt or None
        return pre.build(
            request_id, token_ids, params, text, request.priority, request.tenant, salt, param
        )

    def _prompt(self, request: router_pb2.GenerateRequest) -> tuple[list[int], str | None]:
        """Token ids (and text, when known) of the request's input."""
        pre = self.services.preprocessor
        kind = request.WhichOneof("input")
        if kind == "text":
            return pre.tokenize(request.text), request.text
        if kind == "token_ids":
            return pre.tokenize(list(request.token_ids.ids)), None
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                raise InvalidRequestError("chat must hold at least one message", "chat")
            text, token_ids = pre.render_chat(messages)
            return token_ids, text
        raise InvalidRequestError("input is required: text, token_ids or chat", "input")


def _response(request_id: str, delta: CompletionDelta) -> router_pb2.GenerateResponse:
    message = router_pb2.GenerateResponse(
        request_id=request_id,
        index=delta.index,
        text=delta.text,
        token_ids=delta.token_ids,
        logprobs=delta.raw_logprobs or [],
        finish_reason=delta.finish_reason or "",
    )
    if isinstance(delta.stop_reason, str):
        message.stop_string = delta.stop_reason
    elif isinstance(delta.stop_reason, int):
        message.stop_token_id = delta.stop_reason
    return message


def _add_usage(message: router_pb2.GenerateResponse, generation: Generation) -> None:
    usage = generation.usage()
    message.usage.prompt_tokens = usage.prompt_tokens
    message.usage.completion_tokens = usage.completion_tokens
    message.usage.cached_tokens = usage.cached_tokens


def build_grpc_server(
    services: RouterServices, address: str
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A grpc.aio server on `address` with the Router service (behind the API key, when one is
    set), health, reflection, and the prefix-index service when the index is in-process;
    returns it (not started), its health servicer and the bound port."""
    interceptors = []
    if services.config.api_key:
        on_reject = services.metrics.request_failed
        interceptors.append(APIKeyInterceptor(services.config.api_key, [SERVICE_NAME], on_reject))
    # No SO_REUSEPORT: a port another process (or router) holds must be an error, not shared.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    _add_router_servicer(RouterServicer(services), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names: tuple[str, ...] = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    if isinstance(services.index, InProcessPrefixIndex):  # workers publish KV events here
        add_index_servicer(PrefixIndexServicer(services.index), server)
        names += (INDEX_SERVICE_NAME,)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    return server, health_servicer, port


def _add_router_servicer(servicer: RouterServicer, server: grpc.aio.Server) -> None:
    """The generated add_RouterServicer_to_server, with `parse_request` as the deserializer."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parse_request,
            response_serializer=router_pb2.GenerateResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Report SERVING (or NOT_SERVING) for the server as a whole and the Router service."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
