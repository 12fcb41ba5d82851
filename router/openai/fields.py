"""Which request fields the OpenAI endpoints honour, refuse for now, or accept as changing
nothing: the one place to edit when a feature lands (move its names from NOT_SUPPORTED_YET
into the request models of protocol.py). Chat honours tools (common.tools); the entries below
refuse them on /v1/completions, and OpenAI's deprecated `functions` everywhere.

Every top-level field of a request body is one of:

- honoured: a field of the endpoint's request model (protocol.py);
- not supported yet (`NOT_SUPPORTED_YET`): known from OpenAI's or vLLM's API and would change
  what is generated; refused with 400 naming it, unless it carries a value that asks for
  nothing (null, or one of its `neutral` values such as false, [] or its default);
- no-op (`NO_OP`): known, and changes nothing Baton generates or returns; accepted, and logged
  once per field name per process;
- unknown: anything else (a typo, a newer API's field); refused with 400 naming it, since it
  may change the output and we cannot know.

`check_body` also refuses what no field may hold: strings that are not valid Unicode (JSON's
`\\ud800` escapes can carry lone UTF-16 surrogates; no tokenizer, protobuf string or UTF-8
response can), NaN and Infinity (Python's json module accepts them; JSON has no such numbers),
and nesting deeper than MAX_DEPTH.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from router.errors import InvalidRequestError

log = logging.getLogger(__name__)

MAX_DEPTH = 64  # levels of JSON nesting a request may use (real ones use under 10)


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A known field refused for now: `feature` says what it asks for; `neutral` lists the
    values (besides null) that ask for nothing and are accepted."""

    feature: str
    neutral: tuple[Any, ...] = ()


_TOOLS = "tool calling"
_BEAM = "beam search"

NOT_SUPPORTED_YET: dict[str, Unsupported] = {
    # structured outputs are honoured (router.openai.structured), but not a per-request
    # backend (each worker compiles with its own) nor vLLM's top-level tag
    "guided_decoding_backend": Unsupported(
        "a per-request grammar backend; the backend is chosen per server: "
        "--structured-outputs-backend"
    ),
    "structural_tag": Unsupported("a top-level structural tag (send structured_outputs)"),
    # tools: honoured by chat (common.tools); /v1/completions has none, and OpenAI's
    # deprecated `functions` / `function_call` are refused (send tools / tool_choice)
    "tools": Unsupported(_TOOLS + " on /v1/completions (use /v1/chat/completions)", ([],)),
    "tool_choice": Unsupported(_TOOLS + " on /v1/completions", ("none",)),
    "functions": Unsupported("the deprecated functions (send tools)", ([],)),
    "function_call": Unsupported("the deprecated function_call (send tool_choice)", ("none",)),
    # sampling and output features the engine lacks
    "use_beam_search": Unsupported(_BEAM, (False,)),
    "length_penalty": Unsupported(_BEAM, (1.0,)),
    "suffix": Unsupported("insertion after a suffix", ("",)),
    "prompt_logprobs": Unsupported("prompt logprobs"),
    "bad_words": Unsupported("bad words", ([],)),
    "logits_processors": Unsupported("custom logits processors", ([],)),
    "truncate_prompt_tokens": Unsupported("prompt truncation"),
    "return_tokens_as_token_ids": Unsupported("token ids as logprob tokens", (False,)),
    "return_token_ids": Unsupported("token ids in the response", (False,)),
    "prediction": Unsupported("predicted outputs"),
    "reasoning_effort": Unsupported("reasoning effort"),
    "verbosity": Unsupported("verbosity"),
    "web_search_options": Unsupported("web search"),
    # prompt construction
    "echo": Unsupported("echo in chat", (False,)),  # /v1/completions honours its own echo
    "continue_final_message": Unsupported("continuing the final message", (False,)),
    "documents": Unsupported("documents for the chat template", ([],)),
    "chat_template": Unsupported("a per-request chat template"),
    "prompt_embeds": Unsupported("prompt embeddings"),
    "mm_processor_kwargs": Unsupported("multimodal inputs", ({},)),
    "audio": Unsupported("audio output"),
    "modalities": Unsupported("output modalities other than text", (["text"],)),
    # vLLM's hooks into its own engine
    "kv_transfer_params": Unsupported("vLLM's KV transfer parameters", ({},)),
    "vllm_xargs": Unsupported("vLLM's extension arguments", ({},)),
}

# Known fields that change nothing here, with why (said once in the log).
NO_OP: dict[str, str] = {
    "metadata": "nothing is stored",
    "store": "nothing is stored",
    "service_tier": "there is one tier",
    "prompt_cache_key": "prefix caching needs no key",
    "safety_identifier": "no safety system uses it",
    "parallel_tool_calls": "no tools on /v1/completions",  # chat checks it against tools
    "include_reasoning": "no reasoning parser on /v1/completions",  # chat honours it
    "request_id": "the router gives every request its own unique id",
}

_logged_no_ops: set[str] = set()


def check_body(data: Any, honoured: Collection[str]) -> Any:
    """The body a request model validates: `data` less its no-op fields (each logged once).
    InvalidRequestError for an unknown field, a field not supported yet, or a value no field
    may hold (see the module's docstring). A non-object `data` is returned for the model to
    refuse."""
    if not isinstance(data, dict):
        return data
    check_values(data)
    body = {}
    for name, value in data.items():
        if name in honoured:
            body[name] = value
        elif name in NOT_SUPPORTED_YET:
            check_supported(name, value)
        elif name in NO_OP:
            _log_no_op(name)
        else:
            raise unknown_field(name, [*honoured, *NOT_SUPPORTED_YET, *NO_OP])
    return body


def check_supported(name: str, value: Any) -> None:
    """InvalidRequestError unless `value` of the not-yet-supported field `name` asks for
    nothing."""
    refused = NOT_SUPPORTED_YET[name]
    if value is None or any(_same(value, n) for n in refused.neutral):
        return
    raise InvalidRequestError(
        f"{name!r} is not supported yet ({refused.feature})", name, "unsupported_parameter"
    )


def unknown_field(name: str, known: Collection[str]) -> InvalidRequestError:
    """The error for a field nobody knows, with the nearest `known` name as a hint."""
    shown = name if len(name) <= 64 else name[:64] + "..."
    near = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return InvalidRequestError(f"unknown field {shown!r}{hint}", shown, "unknown_parameter")


def check_values(body: dict[str, Any]) -> None:
    """InvalidRequestError naming the first place in `body` holding a string (or key) that is
    not valid Unicode, NaN or Infinity, or nesting deeper than MAX_DEPTH. Iterative: a deep
    body cannot exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_unicode(value, path)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"{path}: must be a finite number, got {value}", path)
        elif isinstance(value, dict | list) and depth >= MAX_DEPTH:
            raise InvalidRequestError(f"{path}: nested deeper than {MAX_DEPTH} levels", path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_unicode(key, _join(path, key))
                stack.append((item, _join(path, key), depth + 1))
        elif isinstance(value, list):
            stack.extend(
                (item, _join(path, i), depth + 1)
                for i, item in enumerate(value)
                if isinstance(item, str | float | dict | list)
            )


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_unicode(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = f"\\u{ord(text[error.start]):04x}"
        shown = path.encode("utf-8", "backslashreplace").decode("utf-8")
        message = f"{shown}: holds a lone UTF-16 surrogate ({bad}), which is not valid Unicode"
        raise InvalidRequestError(message, shown) from None


def _same(value: Any, neutral: Any) -> bool:
    """`value == neutral` without JSON's type confusions (true is not 1; 1 is 1.0)."""
    numbers = (int, float)
    if type(value) in numbers and type(neutral) in numbers:
        return bool(value == neutral)
    return type(value) is type(neutral) and bool(value == neutral)


def _log_no_op(name: str) -> None:
    if name not in _logged_no_ops:
        _logged_no_ops.add(name)
        log.warning(
            "request field %r changes nothing here (%s): accepted and ignored "
            "(logged once per process)",
            name,
            NO_OP[name],
        )
