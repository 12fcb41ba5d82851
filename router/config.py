"""The router's configuration: one dataclass, filled from the command line or by tests."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.tools.settings import ToolSettings
from router.policies import POLICIES

API_KEY_ENV = "BATON_API_KEY"  # the API key, when --api-key is not given


@dataclass(slots=True)
class Deadlines:
    """Per-RPC deadlines in seconds (every worker call has one)."""

    reserve_s: float = 10.0
    prefill_s: float = 120.0  # queueing plus prompt compute plus KV push
    decode_s: float = 3600.0  # a whole decode stream
    generate_s: float = 3600.0  # a whole colocated stream
    abort_s: float = 5.0
    poll_s: float = 1.0  # GetLoad and health checks


@dataclass(slots=True)
class RouterConfig:
    """Everything `python -m router` takes. Times in seconds, addresses as `host:port`."""

    model: str
    served_model_name: str = ""  # defaults to the model directory's name, as the workers do
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    colocated: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051  # 0 = no gRPC front
    policy: str = ""  # "": prefix_aware with a prefix index, else least_loaded
    prefix_index: str = "memory"  # memory (fed by workers over gRPC), redis, or none
    redis_url: str = ""  # redis:// or rediss:// (password in the URL); implies prefix_index=redis
    cluster_name: str = "default"  # Redis key namespace part, shared with the workers
    # Conditional disaggregation: a decode worker already holding all but at most this many
    # prompt tokens prefills them itself (0: never).
    local_prefill_threshold: int = 64
    poll_interval_s: float = 0.5
    lease_s: float = 30.0  # how long a decode worker holds a reservation waiting for KV
    max_logprobs: int = 20  # the most top logprobs a request may ask for (vLLM's default)
    max_model_len: int | None = None  # None: the workers' (smallest) max_model_len
    chat_template: str | None = None  # Jinja text replacing the tokenizer's (None: keep it)
    api_key: str = ""  # required as `Bearer KEY` on /v1/* and gRPC Generate ("": open)
    drain_grace_s: float = 30.0  # SIGTERM, or a worker leaving: time in-flight requests get
    # Kubernetes: follow the EndpointSlices of these worker Services in this namespace.
    kubernetes_namespace: str = ""  # "": no discovery
    prefill_service: str = ""
    decode_service: str = ""
    colocated_service: str = ""
    kubeconfig: str = ""  # "": in-cluster, else this kubeconfig file
    discovery_interval_s: float = 2.0
    deadlines: Deadlines = field(default_factory=Deadlines)
    tools: ToolSettings = field(default_factory=ToolSettings)  # tool calling and reasoning

    def __post_init__(self) -> None:
        if not self.served_model_name:
            self.served_model_name = Path(self.model).name
        if self.redis_url:
            self.prefix_index = "redis"
        if self.prefix_index not in ("memory", "redis", "none"):
            raise ValueError(
                f"prefix_index must be memory, redis or none, got {self.prefix_index!r}"
            )
        if self.prefix_index == "redis" and not self.redis_url:
            raise ValueError("prefix_index=redis needs redis_url")
        if not self.policy:
            self.policy = "least_loaded" if self.prefix_index == "none" else "prefix_aware"


def load_chat_template(value: str | None) -> str | None:
    """A chat template given as vLLM's --chat-template takes it: the path of a file holding
    the template, or the template itself (with backslash escapes such as \\n decoded).
    ValueError for a value that looks like a path (no braces, no newline) but is no file."""
    if value is None:
        return None
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, ValueError) as error:  # ValueError: a NUL byte, never in a path
        if not any(c in value for c in "{}\n"):
            raise ValueError(
                f"chat_template {value!r} looks like a file path, but cannot be read: {error}"
            ) from error
    # Backslash escapes decoded, any other character kept (escaped to survive the decoding).
    return value.encode("latin-1", "backslashreplace").decode("unicode_escape")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m router` command line."""
    p = argparse.ArgumentParser(
        prog="python -m router", description="Baton router: OpenAI HTTP and gRPC front."
    )
    p.add_argument("--model", required=True, help="model directory (only its tokenizer is read)")
    p.add_argument("--served-model-name", default="", help="name in the API (default: dir name)")
    for role in ("prefill", "decode", "colocated"):
        p.add_argument(
            f"--{role}", nargs="+", action="extend", default=[], metavar="ADDR",
            help=f"{role} workers' gRPC addresses (host:port; the flag may repeat)",
        )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: none)")
    p.add_argument(
        "--policy",
        default="",
        choices=["", *sorted(POLICIES)],
        help="default: prefix_aware with a prefix index, else least_loaded",
    )
    p.add_argument("--prefix-index", default="memory", choices=["memory", "redis", "none"])
    p.add_argument("--redis-url", default="", help="redis:// or rediss:// URL of the index")
    p.add_argument("--cluster-name", default="default", help="Redis key namespace part")
    p.add_argument(
        "--local-prefill-threshold",
        type=int,
        default=64,
        help="tokens a decode worker may prefill itself when it holds the rest",
    )
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between load polls")
    p.add_argument("--lease", type=float, default=30.0, help="reservation lease in seconds")
    p.add_argument("--max-model-len", type=int, default=None, help="override the workers' value")
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument(
        "--chat-template",
        default=None,
        help="the chat template: a file, or the Jinja template itself (default: the tokenizer's)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV, ""),
        help=f"require `Authorization: Bearer KEY` on /v1/* and gRPC (default: ${API_KEY_ENV})",
    )
    p.add_argument("--drain-grace", type=float, default=30.0,
                   help="seconds in-flight requests get on SIGTERM or when a worker leaves")
    add_tool_args(p)
    _add_discovery_args(p)
    return p


def add_tool_args(p: argparse.ArgumentParser) -> None:
    """vLLM's tool-calling and reasoning flags (common.tools.settings.ToolSettings)."""
    g = p.add_argument_group("tools and reasoning", "tool calls and reasoning in the chat API")
    g.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                   help="let the model decide to call tools (tool_choice auto)")
    g.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="format of the model's tool calls: hermes, llama3_json, mistral, "
                   "pythonic, qwen3_coder, or one a plugin registers")
    g.add_argument("--tool-parser-plugin", default=None, metavar="FILE",
                   help="a Python file registering more tool (or reasoning) parsers")
    g.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="separate reasoning_content: deepseek_r1 or qwen3")
    g.add_argument("--exclude-tools-when-tool-choice-none", action="store_true", default=None,
                   help="do not render the tools in the prompt when tool_choice is none")
    g.add_argument("--strict-tool-calls", action="store_true", default=None,
                   help="constrain every auto tool call's arguments to its tool's schema")


def tool_settings(a: argparse.Namespace) -> ToolSettings:
    """The ToolSettings of parsed `add_tool_args` flags (ValueError for a bad one)."""
    return ToolSettings(
        enable_auto_tool_choice=bool(a.enable_auto_tool_choice),
        tool_call_parser=a.tool_call_parser or "",
        tool_parser_plugin=a.tool_parser_plugin or "",
        reasoning_parser=a.reasoning_parser or "",
        exclude_tools_when_tool_choice_none=bool(a.exclude_tools_when_tool_choice_none),
        strict_tool_calls=bool(a.strict_tool_calls),
    )


def _add_discovery_args(p: argparse.ArgumentParser) -> None:
    k8s = p.add_argument_group(
        "Kubernetes discovery", "workers from the worker Services' EndpointSlices (ready ones)"
    )
    k8s.add_argument("--kubernetes-namespace", default="", metavar="NS",
                     help="follow worker Services in this namespace (default: off)")
    for role in ("prefill", "decode", "colocated"):
        k8s.add_argument(f"--{role}-service", default="", metavar="NAME",
                         help=f"the {role} workers' Service")
    k8s.add_argument("--kubeconfig", default="", metavar="FILE",
                     help="default: the in-cluster service account")
    k8s.add_argument("--discovery-interval", type=float, default=2.0, metavar="S",
                     help="seconds between EndpointSlice lists (default: %(default)s)")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    """Build a RouterConfig from `python -m router` arguments."""
    p = build_parser()
    a = p.parse_args(argv)
    services = (a.prefill_service, a.decode_service, a.colocated_service)
    if a.kubernetes_namespace and not any(services):
        p.error("--kubernetes-namespace needs --prefill-service and --decode-service, or "
                "--colocated-service")  # fmt: skip
    if any(services) and not a.kubernetes_namespace:
        p.error("--prefill-service, --decode-service and --colocated-service need "
                "--kubernetes-namespace")  # fmt: skip
    if not (a.prefill or a.decode or a.colocated or a.kubernetes_namespace):
        p.error("give at least one worker: --prefill and --decode, or --colocated")
    if bool(a.prefill) != bool(a.decode):
        p.error("--prefill and --decode go together (a pair is needed for disaggregation)")
    try:
        chat_template = load_chat_template(a.chat_template)
        tools = tool_settings(a)
    except ValueError as error:
        p.error(str(error))
    return RouterConfig(
        model=a.model,
        served_model_name=a.served_model_name,
        prefill=a.prefill,
        decode=a.decode,
        colocated=a.colocated,
        host=a.host,
        port=a.port,
        grpc_port=a.grpc_port,
        policy=a.policy,
        prefix_index=a.prefix_index,
        redis_url=a.redis_url,
        cluster_name=a.cluster_name,
        local_prefill_threshold=a.local_prefill_threshold,
        poll_interval_s=a.poll_interval,
        lease_s=a.lease,
        max_model_len=a.max_model_len,
        max_logprobs=a.max_logprobs,
        drain_grace_s=a.drain_grace,
        chat_template=chat_template,
        api_key=a.api_key,
        tools=tools,
        kubernetes_namespace=a.kubernetes_namespace,
        prefill_service=a.prefill_service,
        decode_service=a.decode_service,
        colocated_service=a.colocated_service,
        kubeconfig=a.kubeconfig,
        discovery_interval_s=a.discovery_interval,
    )
