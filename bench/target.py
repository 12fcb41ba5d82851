"""The server under test and how to talk to it: an OpenAI HTTP base URL or Baton's gRPC front."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.client import BenchClient, ClientOptions

CLIENT_KINDS = ("http", "grpc")


@dataclass
class Target:
    """`client`: 'http' (OpenAI-compatible, at `url`) or 'grpc' (baton.v1.Router at `grpc`,
    host:port). `api_key` is sent as a bearer token by the HTTP client; it is never recorded."""

    url: str = ""
    grpc: str = ""
    client: str = "http"
    options: ClientOptions = field(default_factory=ClientOptions)
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.client not in CLIENT_KINDS:
            raise ValueError(f"client must be one of {CLIENT_KINDS}, got {self.client!r}")
        if self.client == "http" and not self.url:
            raise ValueError("the http client needs a URL (--url)")
        if self.client == "grpc" and not self.grpc:
            raise ValueError("the grpc client needs an address (--grpc HOST:PORT)")

    def connect(self) -> BenchClient:
        """A new client for this target (close it with `aclose`)."""
        if self.client == "grpc":
            from bench.grpc_client import BatonGrpcClient

            return BatonGrpcClient(self.grpc, self.options)
        from bench.http_client import OpenAIClient

        return OpenAIClient(self.url, self.options, self.api_key)

    def describe(self) -> dict[str, Any]:
        opts = self.options
        return {
            "client": self.client,
            "url": self.url if self.client == "http" else None,
            "grpc": self.grpc if self.client == "grpc" else None,
            "model": opts.model,
            "temperature": opts.temperature,
            "ignore_eos": opts.ignore_eos,
            "timeout_s": opts.timeout_s,
            "extra_body": opts.extra_body,
        }
