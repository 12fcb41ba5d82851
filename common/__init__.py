"""Torch-free pieces that the router and the engine share, each written once.

Module map::

    sampling_params.py  SamplingParams (vLLM's fields and validation), SamplingType
    block_hash.py       the chained 64-bit block hash of prompts (prefix caches and routing)
    tokenizer.py        load_tokenizer: a model directory's fast tokenizer, without torch
    detokenizer.py      IncrementalDetokenizer (text and stop strings), TokenTexts
    logprobs.py         Logprob and the per-token logprob dicts, to_logprob_dict
    completion.py       CompletionTracker: one completion's tokens -> text, logprobs, finish
    fan_out.py          n completions as child requests (ids, seeds) and gathered back: FanOut
    validation.py       prompt and token-id checks against the model; max_tokens resolution
    config_file.py      `--config FILE.yaml`: a YAML mapping of flag names as command-line words

Imports point down: `common` imports neither `engine` nor `router`, nor torch (tests check).
"""
