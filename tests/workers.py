"""Start real worker processes for tests, on free ports, and stop them afterwards."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class WorkerProcess:
    """A `python -m <module>` worker; `address` is its gRPC host:port once READY."""

    def __init__(self, module: str, model_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--model", str(model_dir), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"{module} did not start: {line!r}")
        self.address = line.split()[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def running(*workers_args: tuple[str, Path, tuple[str, ...]]):
    """Start the given workers (module, model dir, extra args); stop them on exit."""
    started: list[WorkerProcess] = []
    try:
        for module, model_dir, args in workers_args:
            started.append(WorkerProcess(module, model_dir, *args))
        yield started
    finally:
        for worker in started:
            worker.stop()


@contextmanager
def started_at_once(
    model_dir: Path, specs: Mapping[str, tuple[str, tuple[str, ...]]]
) -> Iterator[dict[str, str]]:
    """Start the named workers (name -> (module, extra args)) in parallel; yield their gRPC
    addresses by name; stop them all on exit."""
    with futures.ThreadPoolExecutor(len(specs)) as pool:
        started = {
            name: pool.submit(WorkerProcess, module, model_dir, *flags)
            for name, (module, flags) in specs.items()
        }
        procs = {name: f.result() for name, f in started.items()}
    try:
        yield {name: p.address for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()


def lines_until_serving(proc: subprocess.Popen) -> list[str]:
    """What `baton serve` (`proc`, stdout piped as text) printed up to its "Ctrl-C" line, the
    last it prints once everything serves; fails the test if it ended before."""
    import pytest

    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return lines
    pytest.fail(f"baton serve did not start: {lines}")


@contextmanager
def serve_colocated(model: Path, *flags: str) -> Iterator[str]:
    """`baton serve` of `model` as one colocated worker (128 KV blocks) with `flags`, on free
    ports; yields its OpenAI base URL, stops it (SIGTERM) after."""
    from cluster import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "launcher", "serve", "--model", str(model), "--port", str(port),
           "--grpc-port", str(free_port()), "--colocated", "1", "--num-kv-blocks", "128",
           *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)  # fmt: skip
    try:
        lines_until_serving(proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_serve(proc)


def stop_serve(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Stop a `baton serve` process as a user would (SIGTERM: it drains and stops its router
    and workers); SIGKILL only if it hangs (its children would then be orphaned)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def pd_and_colocated_routers(model_dir: Path, addresses: Mapping[str, str]) -> Iterator[dict]:
    """Two routers over started workers: "disaggregated" (the "prefill" and "decode" workers)
    and "colocated" (the "colocated" worker); stopped on exit."""
    from router.config import RouterConfig
    from router.testing import RouterThread

    configs = {
        "disaggregated": RouterConfig(
            str(model_dir), port=0, grpc_port=0,
            prefill=[addresses["prefill"]], decode=[addresses["decode"]],
        ),
        "colocated": RouterConfig(
            str(model_dir), port=0, grpc_port=0, colocated=[addresses["colocated"]]
        ),
    }  # fmt: skip
    threads = {name: RouterThread(config) for name, config in configs.items()}
    for thread in threads.values():
        thread.__enter__()
    try:
        yield threads
    finally:
        for thread in threads.values():
            thread.stop()


def assert_all_free(addresses: Mapping[str, str], num_blocks: int, timeout_s: float = 10.0) -> None:
    """Wait until every worker (by role: "prefill", "decode" or "colocated") is idle with all
    `num_blocks` KV blocks free; fail the test after `timeout_s`."""
    import time

    import grpc

    from proto.baton.v1 import common_pb2, worker_pb2_grpc

    stubs = {
        "decode": worker_pb2_grpc.DecodeWorkerStub,
        "prefill": worker_pb2_grpc.PrefillWorkerStub,
        "colocated": worker_pb2_grpc.ColocatedWorkerStub,
    }
    deadline = time.time() + timeout_s
    for role, address in addresses.items():
        with grpc.insecure_channel(address) as channel:
            stub = stubs[role](channel)
            while True:
                load = stub.GetLoad(common_pb2.LoadRequest(), timeout=5)
                idle = not (load.num_reserved or load.num_running or load.num_waiting)
                if idle and load.num_free_blocks == load.num_total_blocks == num_blocks:
                    break
                assert time.time() < deadline, f"{role} still holds blocks: {load}"
                time.sleep(0.05)
