"""`baton serve --autoscale` for real: a load step adds a decode worker, the quiet after it
removes one (drained first), and no request fails nor any KV block leaks."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import free_port
from launcher.cli import main
from tests.workers import ROOT, assert_all_free, lines_until_serving

NUM_BLOCKS = 128
CLIENTS = 6


def _workers(base: str) -> list[dict]:
    return httpx.get(f"{base}/admin/workers", timeout=10).json()["workers"]


def _decode_count(base: str) -> int:
    return sum(1 for w in _workers(base) if w["role"] == "decode" and not w["draining"])


def _replicas(metrics_url: str) -> tuple[float, float, float]:
    """The autoscaler's decode desired and actual replicas and its decode steps up."""
    text = httpx.get(metrics_url, timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def decode(name: str, suffix: str = "", **labels: str) -> float:
        return next(s.value for s in families[name].samples if s.name == name + suffix
                    and s.labels == {"role": "decode", **labels})  # fmt: skip

    return (decode("baton:autoscaler_desired_replicas"), decode("baton:autoscaler_actual_replicas"),
            decode("baton:autoscaler_scaling_steps", "_total", direction="up"))  # fmt: skip


def test_autoscale_metrics_port_needs_autoscale(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text("{}")
    status = main(["serve", "--model", str(tmp_path), "--autoscale-metrics-port", "0"])
    assert status == 2 and "--autoscale-metrics-port needs --autoscale" in capsys.readouterr().err


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.mark.slow
def test_serve_autoscale_adds_and_removes_a_decode_worker(tiny_model) -> None:
    model_dir = tiny_model("qwen2")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "serve", "--model", str(model_dir),
         "--port", str(port), "--grpc-port", str(free_port()),
         "--num-kv-blocks", str(NUM_BLOCKS), "--autoscale", "--autoscale-interval", "0.5",
         "--decode-max", "2", "--prefill-max", "1", "--decode-running", "2",
         "--ttft-slo", "1000", "--itl-slo", "1000", "--scale-up-intervals", "1",
         "--scale-down-intervals", "2", "--scale-up-cooldown", "0", "--scale-down-cooldown", "2",
         "--autoscale-metrics-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        printed = "".join(lines_until_serving(proc))
        scaler = re.search(r"autoscaler +metrics (http://\S+/metrics)", printed)
        assert scaler is not None, printed  # the autoscaler's own metrics, on a free port
        assert _decode_count(base) == 1
        statuses: list[int] = []
        stop = threading.Event()

        def client(i: int) -> None:
            body = {"model": model_dir.name, "prompt": [5 + i, 6, 7, 8] * 8, "max_tokens": 48,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    statuses.append(http.post(f"{base}/v1/completions", json=body).status_code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            _wait_until(lambda: _decode_count(base) == 2, 90, "a second decode worker")
            _wait_until(lambda: _replicas(scaler[1]) == (2.0, 2.0, 1.0), 30,
                        "the autoscaler's metrics to show the step up")  # fmt: skip
            served = len(statuses)
            _wait_until(lambda: len(statuses) >= served + 2 * CLIENTS, 60, "more requests")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert statuses and set(statuses) == {200}
        _wait_until(lambda: _decode_count(base) == 1 and len(_workers(base)) == 2, 60,
                    "the quiet to remove a decode worker")  # fmt: skip
        after = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": model_dir.name, "prompt": [9, 8, 7], "max_tokens": 4})  # fmt: skip
        assert after.status_code == 200
        assert_all_free({w["role"]: w["address"] for w in _workers(base)}, NUM_BLOCKS)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
