"""Batched token sampling: per-step metadata, logits transforms, sampler and logprobs."""

from engine.sampling.logprobs import (
    Logprob,
    LogprobsTensors,
    compute_prompt_logprobs,
    gather_logprobs,
    to_logprob_dict,
)
from engine.sampling.metadata import SamplingMetadata, SamplingRow
from engine.sampling.sampler import Sampler, SamplerOutput

__all__ = [
    "Logprob",
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRow",
    "compute_prompt_logprobs",
    "gather_logprobs",
    "to_logprob_dict",
]
