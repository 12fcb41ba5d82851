"""From an API request's prompt and parameters to a validated `GenerationRequest`.

Does what `engine.llm_engine.LLMEngine` does before queueing a request, so outputs match the
offline `LLM`: text prompts are tokenized with special tokens, chat prompts are rendered with
the tokenizer's chat template and tokenized without them, and the prompt and parameters pass
`common.validation`'s checks (the engine's own): non-empty, inside the vocabulary, shorter than
the context, with `max_tokens` resolved against the room left in it (None = all of it). On top
of those come the API's own limits: at most MAX_N completions, max_logprobs, and values the
workers' wire format can carry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.sampling_params import SamplingParams
from common.validation import InvalidPromptError, check_prompt, validate_request
from proto.convert import check_wire_ranges
from router.errors import InvalidRequestError, ModelNotFoundError, NoWorkerError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

Message = dict[str, Any]
MAX_N = 128  # completions per prompt one request may ask for (OpenAI's limit)


@dataclass(slots=True)
class GenerationRequest:
    """One API request, ready for the workers.

    `params` is validated, with `max_tokens` resolved (tokens); `params.n` completions are
    generated. `arrival_time` is seconds since the epoch.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None
    priority: int = 0
    tenant: str = ""
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.time)


class Preprocessor:
    """Tokenizes, renders chat templates and validates requests for one served model.

    `max_model_len` is called per request: the context length in tokens, or None while no
    worker has reported one (then requests fail with 503).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        served_model_name: str,
        vocab_size: int,
        max_model_len: Callable[[], int | None],
        max_logprobs: int = 20,
    ) -> None:
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs

    def check_model(self, model: str | None) -> None:
        """ModelNotFoundError unless `model` is empty or the served model's name."""
        if model and model != self.served_model_name:
            raise ModelNotFoundError(
                f"The model `{model}` does not exist (this server serves "
                f"`{self.served_model_name}`).",
                param="model",
            )

    def tokenize(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (special tokens added by default, as `LLM.generate`) or
        a copy of the given ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        return [int(t) for t in prompt]

    def render_chat(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> tuple[str, list[int]]:
        """The chat template's text for `messages` and its token ids (by default no special
        tokens added, as `LLM.chat` does: the template writes them)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template", "messages")
        kwargs = dict(chat_template_kwargs or {})
        try:
            text = self.tokenizer.apply_chat_template(
                messages,  # type: ignore[arg-type]
                tools=tools,  # type: ignore[arg-type]
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except Exception as error:  # jinja2 errors, bad message shapes
            message = f"cannot apply the chat template: {error}"
            raise InvalidRequestError(message, "messages") from error
        assert isinstance(text, str)
        return text, list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def build(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt_text: str | None = None,
        priority: int = 0,
        tenant: str = "",
        cache_salt: str | None = None,
        param: str = "prompt",
    ) -> GenerationRequest:
        """Validate the prompt and params; resolve max_tokens. `param` names the prompt field."""
        try:
            max_tokens = validate_request(
                prompt_token_ids, params, self.vocab_size, self.context_length(), param
            )
        except InvalidPromptError as error:
            raise InvalidRequestError(str(error), error.param) from error
        except ValueError as error:
            raise params_error(error) from error
        self.check_params(params)
        try:
            params = replace(params, max_tokens=max_tokens)  # min_tokens may not fit now
        except ValueError as error:
            raise params_error(error) from error
        return GenerationRequest(
            request_id, prompt_token_ids, params, prompt_text, priority, tenant, cache_salt
        )

    def context_length(self) -> int:
        """The served context in tokens (NoWorkerError while unknown)."""
        context = self.max_model_len()
        if context is None:
            raise NoWorkerError("no healthy worker has reported the model's context length yet")
        return context

    def check_prompt(self, token_ids: list[int], context: int, param: str = "prompt") -> None:
        """InvalidRequestError for an empty, out-of-vocabulary or too long prompt."""
        try:
            check_prompt(token_ids, self.vocab_size, context, param)
        except InvalidPromptError as error:
            raise InvalidRequestError(str(error), error.param) from error

    def check_params(self, params: SamplingParams) -> None:
        """InvalidRequestError for more than MAX_N completions, values the workers' wire format
        cannot carry, or more logprobs than max_logprobs (the API's limits; the token ids were
        checked against the vocabulary with the prompt)."""
        if params.n > MAX_N:
            raise InvalidRequestError(f"n must be at most {MAX_N}, got {params.n}", "n")
        try:
            check_wire_ranges(params)
        except ValueError as error:
            raise params_error(error) from error
        check_structured_combinations(params)
        num, limit = params.logprobs, self.max_logprobs  # -1: the whole vocabulary
        if num is not None and limit != -1 and (num == -1 or num > limit):
            raise InvalidRequestError(
                f"logprobs must be at most {self.max_logprobs}, got {num}", "logprobs"
            )


def check_structured_combinations(params: SamplingParams) -> None:
    """InvalidRequestError for structured outputs with min_tokens or allowed_token_ids: with
    them the grammar may leave no token to sample (a choice done before min_tokens; a JSON
    object with none of the allowed ids), and the engine then fails the whole step, every
    request in the batch with it. Refused until the engine ends such a request on its own."""
    if params.structured_outputs is None:
        return
    for name, used in (
        ("min_tokens", params.min_tokens > 0),
        ("allowed_token_ids", bool(params.allowed_token_ids)),
    ):
        if used:
            raise InvalidRequestError(
                f"'{name}' with structured outputs is not supported yet (the grammar may "
                "leave no token to sample)",
                name,
                "unsupported_parameter",
            )


def model_vocab_size(model_dir: str | Path, tokenizer: PreTrainedTokenizerFast) -> int:
    """The model's vocabulary size (config.json's `vocab_size`, else the tokenizer's length)."""
    config = Path(model_dir) / "config.json"
    try:
        value = json.loads(config.read_text()).get("vocab_size")
    except (OSError, ValueError):
        value = None
    return int(value) if isinstance(value, int) and value > 0 else len(tokenizer)


def params_error(error: ValueError) -> InvalidRequestError:
    """A SamplingParams ValueError as a 400 naming the field (its message's first word)."""
    message = str(error)
    first = message.split(" ", 1)[0]
    return InvalidRequestError(message, first if first.isidentifier() else None)
