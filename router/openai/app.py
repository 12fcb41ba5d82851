"""The FastAPI application: routes of the OpenAI-compatible API, (de)tokenization, health,
version and metrics; with an API key, /v1/* requires it (router.auth)."""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any

from fastapi import Body, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from router.auth import APIKeyMiddleware
from router.errors import NoWorkerError
from router.openai.chat import create_chat_completion
from router.openai.completions import create_completion
from router.openai.errors import install_error_handlers, router_error_response
from router.openai.protocol import ChatCompletionRequest, CompletionRequest
from router.openai.serving import unless_disconnected
from router.openai.tokenization import (
    DetokenizeRequest,
    detokenize,
    parse_tokenize_request,
    tokenize,
    validate,
)
from router.services import RouterServices


def baton_version() -> str:
    """The installed distribution's version, or 'unknown' when running from a bare checkout."""
    try:
        return metadata.version("baton")
    except metadata.PackageNotFoundError:
        return "unknown"


MAX_BODY_BYTES = 32 * 2**20  # a larger request body is a 413 (a 128k-token prompt is ~1 MiB)


def build_app(services: RouterServices) -> FastAPI:
    """The HTTP API over `services` (started and closed by whoever runs the server)."""
    app = FastAPI(title="Baton router", version=baton_version())
    app.state.services = services
    install_error_handlers(app, services.metrics.request_failed, MAX_BODY_BYTES)
    if services.config.api_key:
        app.add_middleware(
            APIKeyMiddleware,
            api_key=services.config.api_key,
            on_reject=services.metrics.request_failed,
        )
    _add_openai_routes(app, services)
    _add_service_routes(app, services)
    return app


def _add_openai_routes(app: FastAPI, services: RouterServices) -> None:
    """/v1/*: completions, chat completions, models."""
    created = int(time.time())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI's completions API."""
        return await unless_disconnected(request, create_completion(body, services))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI's chat completions API."""
        return await unless_disconnected(request, create_chat_completion(body, services))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The served model."""
        config = services.config
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "baton",
            "root": config.model,
            "parent": None,
            "max_model_len": config.max_model_len or services.registry.max_model_len,
        }
        return {"object": "list", "data": [card]}


def _add_service_routes(app: FastAPI, services: RouterServices) -> None:
    """What vLLM serves beside /v1 (open with an API key too): tokenize, detokenize, version,
    health, metrics."""

    @app.post("/tokenize")
    async def tokenize_route(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """vLLM's /tokenize: a prompt or a conversation to token ids."""
        return tokenize(parse_tokenize_request(body), services.preprocessor)

    @app.post("/detokenize")
    async def detokenize_route(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """vLLM's /detokenize: token ids to text."""
        return detokenize(validate(DetokenizeRequest, body), services.preprocessor)

    @app.get("/version")
    async def version() -> dict[str, str]:
        """The router's version."""
        return {"version": app.version}

    @app.get("/health")
    async def health() -> Response:
        """200 when requests can be served, else 503 (draining, or no healthy worker)."""
        if services.ready():
            return JSONResponse({"status": "ok"})
        reason = "draining" if services.generator.draining else "no healthy worker"
        return router_error_response(NoWorkerError(f"not ready: {reason}"))

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        body = services.metrics.render(services.registry.workers)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
