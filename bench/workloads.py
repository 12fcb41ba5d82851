"""The workload generators by name, and how command-line options map onto their parameters.

    fixed      FixedLengths   token ids, fixed lengths (+/- range ratio)   bench.synthetic
    sharegpt   ShareGPTLike   token ids, lognormal lengths                  bench.synthetic
    long       long_context   token ids, long prompts, short answers        bench.synthetic
    prefix     SharedPrefix   K system prompts, Zipf tenants                bench.shared_prefix
    multiturn  MultiTurn      chat sessions, growing history                bench.multi_turn
    trace      TraceReplay    a JSONL trace                                 bench.trace
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.multi_turn import MultiTurn
from bench.shared_prefix import SharedPrefix
from bench.synthetic import FixedLengths, ShareGPTLike, long_context
from bench.trace import TraceReplay
from bench.workload import Workload

WORKLOADS: dict[str, Callable[..., Workload]] = {
    "fixed": FixedLengths,
    "sharegpt": ShareGPTLike,
    "long": long_context,
    "prefix": SharedPrefix,
    "multiturn": MultiTurn,
    "trace": TraceReplay,
}

# command-line option (argparse dest) -> parameter name, per workload
OPTION_PARAMETERS: dict[str, dict[str, str]] = {
    "fixed": {"input_len": "input_len", "output_len": "output_len",
              "range_ratio": "range_ratio"},
    "long": {"input_len": "input_len", "output_len": "output_len", "range_ratio": "range_ratio"},
    "sharegpt": {
        "input_median": "input_median", "input_sigma": "input_sigma",
        "output_median": "output_median", "output_sigma": "output_sigma",
        "min_input_len": "min_input", "max_input_len": "max_input",
        "min_output_len": "min_output", "max_output_len": "max_output",
    },
    "prefix": {"num_prefixes": "num_prefixes", "prefix_len": "prefix_len",
               "question_len": "question_len", "output_len": "output_len",
               "zipf_s": "zipf_s", "range_ratio": "range_ratio"},
    "multiturn": {"turns": "num_turns", "question_words": "question_words",
                  "system_words": "system_words", "output_len": "output_len",
                  "range_ratio": "range_ratio"},
    "trace": {"trace": "path", "trace_speedup": "speedup", "output_len": "default_max_tokens"},
}


def build_workload(name: str, options: dict[str, Any]) -> Workload:
    """The `name` workload with the options that were given (None = the default).

    ValueError names an option that does not apply to this workload, or a missing trace file.
    """
    mapping = OPTION_PARAMETERS[name]
    given = {key: value for key, value in options.items() if value is not None}
    foreign = sorted(k for k in given if k not in mapping and _is_workload_option(k))
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise ValueError(f"{flags} do(es) not apply to the {name} workload")
    params = {mapping[k]: v for k, v in given.items() if k in mapping}
    if name == "trace":
        if "path" not in params:
            raise ValueError("the trace workload needs --trace FILE")
        params["path"] = Path(params["path"])
        if not params["path"].is_file():
            raise ValueError(f"trace file not found: {params['path']}")
    return WORKLOADS[name](**params)


def _is_workload_option(key: str) -> bool:
    return any(key in mapping for mapping in OPTION_PARAMETERS.values())
