"""Router membership through the admin API, with real workers: a worker joins, bad requests
are refused naming the field, and a worker removed mid-request drains first (the request
finishes, then the worker leaves)."""

from __future__ import annotations

import threading

import httpx
import pytest

from router.config import RouterConfig
from router.testing import RouterThread
from tests.workers import started_at_once

KEY = "admin-key"


@pytest.fixture(scope="module")
def setup(tiny_model):
    model_dir = tiny_model("qwen2")
    flags = ("--num-kv-blocks", "64", "--num-threads", "1")
    specs = {
        "prefill": ("prefill_service", flags),
        "decode": ("decode_service", (*flags, "--role", "decode")),
        "decode2": ("decode_service", (*flags, "--role", "decode")),
    }
    with started_at_once(model_dir, specs) as addresses:
        config = RouterConfig(
            str(model_dir), port=0, grpc_port=0, api_key=KEY,
            prefill=[addresses["prefill"]], decode=[addresses["decode"]],
        )  # fmt: skip
        with RouterThread(config) as router:
            yield model_dir, router, addresses


def _admin(router, method: str, path: str = "/admin/workers", key: str = KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, router.base_url + path, headers=headers, timeout=60, **kwargs)


def _health_series(router) -> list[str]:
    """The router's `baton:worker_healthy` lines, one per worker it exports."""
    text = httpx.get(router.base_url + "/metrics", timeout=10).text
    return [line for line in text.splitlines() if line.startswith("baton:worker_healthy{")]


def test_admin_needs_the_key_and_names_bad_fields(setup) -> None:
    _, router, addresses = setup
    assert _admin(router, "GET", key="").status_code == 401
    assert _admin(router, "GET", key="wrong").status_code == 401
    for body, field in (({"address": "nohost", "role": "decode"}, "address"),
                        ({"address": "h:1", "role": "cook"}, "role"),
                        ({"address": "h:1", "role": "decode", "x": 1}, "x")):  # fmt: skip
        answer = _admin(router, "POST", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field
    conflict = _admin(router, "POST", json={"address": addresses["decode"], "role": "prefill"})
    assert conflict.status_code == 409
    assert _admin(router, "DELETE", "/admin/workers/10.9.9.9:1").status_code == 404
    assert _admin(router, "DELETE", "/admin/workers/x:1?timeout=-1").status_code == 400


def test_a_worker_joins_and_a_busy_one_drains_before_it_leaves(setup) -> None:
    model_dir, router, addresses = setup
    joined = _admin(router, "POST", json={"address": addresses["decode2"], "role": "decode"})
    assert joined.status_code == 201 and joined.json()["healthy"]
    decodes = {w["address"] for w in _admin(router, "GET").json()["workers"]
               if w["role"] == "decode"}  # fmt: skip
    assert decodes == {addresses["decode"], addresses["decode2"]}
    assert len(_health_series(router)) == 3
    results: list[httpx.Response] = []
    body = {"model": model_dir.name, "prompt": [5, 6, 7, 8] * 4, "max_tokens": 200,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip

    def stream() -> None:
        with httpx.Client(timeout=120) as http:
            response = http.post(router.base_url + "/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
            results.append(response)

    threads = [threading.Thread(target=stream) for _ in range(4)]  # both decode workers busy
    for thread in threads:
        thread.start()
    busy = None
    while busy is None and any(t.is_alive() for t in threads):
        workers = _admin(router, "GET").json()["workers"]
        busy = next((w["address"] for w in workers
                     if w["role"] == "decode" and w["inflight"]), None)  # fmt: skip
    assert busy is not None
    removed = _admin(router, "DELETE", f"/admin/workers/{busy}?timeout=60")
    assert removed.json() == {"address": busy, "drained": True}
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200] * 4
    assert all("[DONE]" in r.text and '"finish_reason":"length"' in r.text for r in results)
    left = [w["address"] for w in _admin(router, "GET").json()["workers"]]
    assert busy not in left and len(left) == 2
    healthy = _health_series(router)  # the removed worker's series went with it
    assert len(healthy) == 2 and all(f'address="{a}"' in "".join(healthy) for a in left)
