"""The admin API: workers join and leave a running router (what `baton serve --autoscale` calls).

    GET    /admin/workers                   every worker: role, health, draining, calls in flight
    POST   /admin/workers  {"address": "host:port", "role": "prefill"|"decode"|"colocated"}
    DELETE /admin/workers/{address}?timeout=S   drain (no new requests, in-flight ones finish,
                                                up to S seconds), then drop it and its index
                                                entries; answers once it is gone

With an API key, these need it as /v1/* does (`Authorization: Bearer KEY`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse

from router.auth import UNAUTHORIZED, rejection
from router.membership import Membership
from router.openai.errors import error_body
from router.workers import Role, WorkerInfo

MAX_DRAIN_TIMEOUT_S = 3600.0


def add_admin_routes(app: FastAPI, membership: Membership, api_key: str) -> None:
    """Register /admin/workers on `app`."""

    def refused(request: Request) -> JSONResponse | None:
        if not api_key:
            return None
        reason = rejection(request.headers.get("authorization", "").encode() or None, api_key)
        if reason is None:
            return None
        body = error_body(reason, "invalid_request_error", None, "invalid_api_key")
        return JSONResponse(body, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/admin/workers")
    async def list_workers(request: Request) -> Any:
        """Every registered worker."""
        return refused(request) or {"workers": [_describe(w) for w in membership.registry.workers]}

    @app.post("/admin/workers")
    async def add_worker(request: Request, body: Any = Body(None)) -> Any:  # noqa: B008
        """Register a worker; 201 with its state."""
        if (denied := refused(request)) is not None:
            return denied
        address, role, problem = _parse_worker(body)
        if problem is not None:
            return problem
        try:
            worker = await membership.add(address, role)
        except ValueError as error:
            return _bad_request(str(error), "role", 409)
        return JSONResponse(_describe(worker), 201)

    @app.delete("/admin/workers/{address}")
    async def remove_worker(request: Request, address: str, timeout: float = 30.0) -> Any:
        """Drain the worker, then drop it; 404 if unknown."""
        if (denied := refused(request)) is not None:
            return denied
        if not 0 <= timeout <= MAX_DRAIN_TIMEOUT_S:
            return _bad_request(f"timeout must be in [0, {MAX_DRAIN_TIMEOUT_S:.0f}] s", "timeout")
        drained = await membership.remove(address, timeout)
        if drained is None:
            body = error_body(f"no worker at {address}", "not_found_error", "address")
            return JSONResponse(body, 404)
        return {"address": address, "drained": drained}


def _parse_worker(body: Any) -> tuple[str, Role, JSONResponse | None]:
    """(address, role, None), or a 400 naming the bad field."""
    if not isinstance(body, dict):
        return "", Role.DECODE, _bad_request("the body must be a JSON object", None)
    address, role = body.get("address"), body.get("role")
    unknown = sorted(set(body) - {"address", "role"})
    if unknown:
        return "", Role.DECODE, _bad_request(f"unknown field {unknown[0]!r}", unknown[0])
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not (host and port.isdigit() and 0 < int(port) < 65536):
        return "", Role.DECODE, _bad_request("address must be host:port", "address")
    if role not in {r.value for r in Role}:
        roles = ", ".join(r.value for r in Role)
        return "", Role.DECODE, _bad_request(f"role must be one of {roles}", "role")
    return str(address), Role(role), None


def _bad_request(message: str, param: str | None, status: int = 400) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error", param), status)


def _describe(worker: WorkerInfo) -> dict[str, Any]:
    return {
        "address": worker.address,
        "role": worker.role.value,
        "healthy": worker.healthy,
        "draining": worker.draining,
        "inflight": worker.inflight,
    }
