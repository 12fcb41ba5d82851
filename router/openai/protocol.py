"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's extra sampling fields.

Types are strict (a string is not a number, a bool is not an int) and ranges are checked here,
so a bad field is a 400 that names it. Integers must fit the wire type the workers receive
(int32 counts and ids, an int64 seed). Fields that are not honoured here are sorted by
`router.openai.fields`: refused (unknown, or not supported yet) or accepted as no-ops.
`to_sampling_params` builds the engine's `SamplingParams`; `max_tokens` left unset means "up
to the end of the context" (the router resolves it per prompt).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from common.sampling_params import SamplingParams
from common.structured_outputs import StructuredOutputsParams
from proto.convert import INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN
from router.errors import InvalidRequestError
from router.openai.fields import check_body
from router.openai.structured import (
    GUIDED_ALIASES,
    ResponseFormat,
    StructuredOutputsBody,
    response_format_constraint,
    structured_outputs_params,
)
from router.preprocess import MAX_N, params_error

MAX_TOP_LOGPROBS = 20  # chat's top_logprobs range, as OpenAI's API
MAX_COMPLETIONS = 2048  # completions (prompts x n) one /v1/completions request may ask for

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]  # a number of tokens


class StrictModel(BaseModel):
    """Strict types, finite numbers; a field the model lacks is refused."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(StrictModel):
    """The sampling fields both endpoints share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    best_of: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_tokens: Count | None = None
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra parameters
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[Int32] | None = None
    allowed_token_ids: list[Int32] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: Int32 = 0
    cache_salt: str | None = Field(default=None, min_length=1)
    # structured outputs (router.openai.structured): response_format, or one of these
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    # the field that set the structured-outputs constraint, to name it in a worker's complaint
    _constraint_field: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _sort_fields(cls, data: Any) -> Any:
        """Refuse unknown and not-yet-supported fields, drop no-ops (router.openai.fields)."""
        return check_body(data, cls.model_fields)

    def check_options(self) -> None:
        """InvalidRequestError for options that are known but not honoured, or that need
        another option (vLLM's rules)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options can only be given when stream is true", "stream_options"
            )
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise InvalidRequestError(
                "'stream_options.continuous_usage_stats' is not supported yet",
                "stream_options.continuous_usage_stats",
                "unsupported_parameter",
            )
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(
                "'best_of' other than n is not supported yet", "best_of", "unsupported_parameter"
            )

    def structured_outputs_params(
        self, extra: tuple[str, dict[str, Any]] | None = None
    ) -> StructuredOutputsParams | None:
        """The constraint of response_format, structured_outputs or a guided_* field, or
        `extra` (a (field, constraint) of the request's tools; at most one in all), with
        structured_outputs' options; remembers which field set it."""
        constraints = [extra] if extra is not None else []
        constraints += response_format_constraint(self.response_format)
        so = self.structured_outputs or StructuredOutputsBody()
        constraints += so.constraints()
        for alias, kind in GUIDED_ALIASES.items():
            if getattr(self, alias) is not None:
                constraints.append((alias, {kind: getattr(self, alias)}))
        options = so.options()
        if self.guided_whitespace_pattern is not None:
            if options["whitespace_pattern"] is not None:
                raise InvalidRequestError(
                    "'guided_whitespace_pattern' and 'structured_outputs.whitespace_pattern' "
                    "both set the JSON whitespace; send one",
                    "guided_whitespace_pattern",
                )
            options["whitespace_pattern"] = self.guided_whitespace_pattern
        params, self._constraint_field = structured_outputs_params(constraints, options)
        return params

    @property
    def constraint_field(self) -> str | None:
        """The request field that set the structured-outputs constraint (None without one)."""
        return self._constraint_field

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        constraint: tuple[str, dict[str, Any]] | None = None,
    ) -> SamplingParams:
        """The engine's SamplingParams (`constraint`: the tools' structured-outputs constraint,
        if any); ValueError from it becomes a 400 naming the field."""
        optional: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        structured_outputs = self.structured_outputs_params(constraint)
        try:
            return SamplingParams(
                structured_outputs=structured_outputs,
                n=self.n,
                max_tokens=max_tokens,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                logprobs=logprobs,
                logit_bias=_logit_bias(self.logit_bias),
                allowed_token_ids=self.allowed_token_ids,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                **{k: v for k, v in optional.items() if v is not None},
            )
        except ValueError as error:
            raise params_error(error) from error

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: a string, token ids, or a list of either."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Count | None = 16  # OpenAI's and vLLM's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=INT32_MAX)
    echo: bool = False
    add_special_tokens: bool = True

    def to_sampling_params(self) -> SamplingParams:
        """The request's SamplingParams (InvalidRequestError for what is not supported)."""
        self.check_options()
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "'echo' with 'logprobs' is not supported yet (prompt logprobs)",
                "echo",
                "unsupported_parameter",
            )
        return self.sampling_params(self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s), one entry per prompt (at most MAX_COMPLETIONS / n of them)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if len(prompt) * self.n > MAX_COMPLETIONS:
            raise InvalidRequestError(
                f"prompt: at most {MAX_COMPLETIONS} completions (prompts x n) per request, "
                f"got {len(prompt)} prompts x n={self.n}",
                "prompt",
            )
        return list(prompt)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    """One message; extra fields (name, tool_calls, tool_call_id, ...) go to the template."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: Count | None = None
    # tool calling (common.tools.request): checked against the server's flags per request
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True  # vLLM's: False leaves reasoning_content out
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def to_sampling_params(
        self, constraint: tuple[str, dict[str, Any]] | None = None
    ) -> SamplingParams:
        """The request's SamplingParams: max_completion_tokens wins over max_tokens;
        `constraint` is the tools' (common.tools.request.ToolPlan.constraint)."""
        self.check_options()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self.sampling_params(max_tokens, logprobs, constraint)

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template reads them: text parts joined into one string."""
        return [template_message(m, i) for i, m in enumerate(self.messages)]


def template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    """One message as the chat template reads it (`index`: its place, for error messages)."""
    out = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"content parts of type {part.get('type')!r} are not supported yet (only "
                    "text parts, with a string 'text')",
                    f"messages.{index}.content",
                    "unsupported_parameter",
                )
            texts.append(part["text"])
        out["content"] = "\n".join(texts)
    return out


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError as error:
        raise InvalidRequestError("logit_bias keys must be token ids", "logit_bias") from error
