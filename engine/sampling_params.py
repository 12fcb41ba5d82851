"""`SamplingParams` lives in `common.sampling_params` (the router shares it); this path stays
importable for the engine's modules and for users (`from engine import SamplingParams`)."""

from common.sampling_params import MAX_LOGIT_BIAS, SAMPLING_EPS, SamplingParams, SamplingType

__all__ = ["MAX_LOGIT_BIAS", "SAMPLING_EPS", "SamplingParams", "SamplingType"]
