"""The router's parts wired together once, shared by the HTTP and the gRPC fronts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.tokenizer import load_tokenizer
from prefix_index.base import PrefixIndex
from prefix_index.memory import InProcessPrefixIndex
from router.aborts import AbortSender
from router.colocated import ColocatedBackend
from router.config import RouterConfig
from router.disaggregated import DisaggregatedBackend
from router.generation import Generator
from router.membership import Membership
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.prefix_lookup import PrefixLookup
from router.preprocess import Preprocessor, model_vocab_size
from router.registry import WorkerRegistry
from router.workers import Role

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def build_index(config: RouterConfig) -> PrefixIndex | None:
    """The prefix index the config names: in-process, Redis, or none."""
    if config.prefix_index == "none":
        return None
    if config.prefix_index == "redis":
        from prefix_index.redis_store import RedisPrefixIndex, connect, namespace

        ns = namespace(config.cluster_name, config.served_model_name)
        return RedisPrefixIndex(connect(config.redis_url), ns)
    return InProcessPrefixIndex()


@dataclass(eq=False)
class RouterServices:
    """Tokenizer, worker registry, preprocessing, generation and metrics of one router."""

    config: RouterConfig
    tokenizer: PreTrainedTokenizerFast
    registry: WorkerRegistry
    preprocessor: Preprocessor
    generator: Generator
    metrics: RouterMetrics
    aborts: AbortSender
    index: PrefixIndex | None = None
    membership: Membership | None = None
    discovery: Any = None  # router.discovery.EndpointSliceDiscovery, on Kubernetes

    @classmethod
    def build(cls, config: RouterConfig) -> RouterServices:
        """Load the tokenizer (no weights) and create every part; `start()` before use.

        Must run inside the event loop that will serve (the channels bind to it).
        """
        tokenizer = load_tokenizer(config.model)
        if config.chat_template is not None:  # --chat-template replaces the tokenizer's
            tokenizer.chat_template = config.chat_template
        name = config.served_model_name
        registry = WorkerRegistry(
            {
                Role.PREFILL: config.prefill,
                Role.DECODE: config.decode,
                Role.COLOCATED: config.colocated,
            },
            name,
            config.poll_interval_s,
            config.deadlines.poll_s,
        )
        policy = make_policy(config.policy)
        aborts = AbortSender(config.deadlines.abort_s)
        metrics = RouterMetrics(name)
        policy.on_decision = metrics.routed
        backends = [
            DisaggregatedBackend(
                registry, policy, aborts, config.deadlines, config.lease_s,
                config.local_prefill_threshold, metrics,
            ),
            ColocatedBackend(registry, policy, aborts, config.deadlines),
        ]  # fmt: skip
        index = build_index(config)
        preprocessor = Preprocessor(
            tokenizer,
            name,
            model_vocab_size(config.model, tokenizer),
            lambda: config.max_model_len or registry.max_model_len,
            config.max_logprobs,
        )
        generator = Generator(tokenizer, registry, backends, metrics, name)
        if index is not None:
            generator.prefix_lookup = PrefixLookup(index, metrics.registry, name)
        membership = Membership(registry, index, config.drain_grace_s)
        services = cls(config, tokenizer, registry, preprocessor, generator, metrics, aborts, index)
        services.membership = membership
        if config.kubernetes_namespace:
            from router.discovery import EndpointSliceDiscovery

            services.discovery = EndpointSliceDiscovery.from_config(config, membership)
        return services

    async def start(self) -> None:
        """Poll the workers once, then keep polling in the background; collect lapsed index
        entries; on Kubernetes, follow the worker Services' endpoints."""
        await self.registry.start()
        if self.membership is not None:
            await self.membership.start()
        if self.discovery is not None:
            await self.discovery.start()

    async def close(self) -> None:
        """Let pending aborts go out, then stop polling and close the channels."""
        await self.aborts.wait()
        if self.discovery is not None:
            await self.discovery.close()
        if self.membership is not None:
            await self.membership.close()
        await self.registry.close()
        if self.index is not None:
            await self.index.close()

    def ready(self) -> bool:
        """True when requests can be served: not draining, and some backend has workers."""
        generator = self.generator
        return not generator.draining and any(b.available() for b in generator.backends)
