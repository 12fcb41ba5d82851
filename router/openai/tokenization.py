"""`POST /tokenize` and `POST /detokenize`, with vLLM's request and response shapes.

/tokenize takes a completion prompt (`prompt`) or a conversation (`messages`, rendered with the
served chat template) and answers `{count, max_model_len, tokens, token_strs}`; /detokenize takes
`tokens` and answers `{prompt}`. Both use the router's Preprocessor, so the token ids are the
ones a generation request would be given.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError

from router.errors import InvalidRequestError
from router.openai.protocol import ChatMessage, StrictModel, template_message
from router.preprocess import Preprocessor


class TokenizeCompletionRequest(StrictModel):
    """A text prompt; special tokens (e.g. BOS) added by default, as a completion's prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(StrictModel):
    """A conversation, rendered as /v1/chat/completions renders it (the template writes the
    special tokens, so none are added by default)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None  # refused: the server's template is --chat-template
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


def parse_tokenize_request(
    body: dict[str, Any],
) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The request `body` describes: a conversation if it has `messages`, else a prompt;
    a 400 naming the field when it is invalid."""
    model = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    return validate(model, body)


def validate(model: type[StrictModel], body: dict[str, Any]) -> Any:
    """`model` validated from `body`; a validation error is a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


def tokenize(
    request: TokenizeCompletionRequest | TokenizeChatRequest, pre: Preprocessor
) -> dict[str, Any]:
    """vLLM's TokenizeResponse for `request`."""
    pre.check_model(request.model)
    if isinstance(request, TokenizeChatRequest):
        token_ids = _chat_token_ids(request, pre)
    elif request.add_special_tokens:
        token_ids = pre.tokenize(request.prompt)
    else:
        token_ids = list(pre.tokenizer.encode(request.prompt, add_special_tokens=False))
    token_strs = pre.tokenizer.convert_ids_to_tokens(token_ids)
    return {
        "count": len(token_ids),
        "max_model_len": pre.context_length(),
        "tokens": token_ids,
        "token_strs": token_strs if request.return_token_strs else None,
    }


def _chat_token_ids(request: TokenizeChatRequest, pre: Preprocessor) -> list[int]:
    if request.chat_template is not None:
        raise InvalidRequestError(
            "chat_template: a request may not bring its own template (the server's is "
            "--chat-template)",
            "chat_template",
        )
    if request.continue_final_message and request.add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message and add_generation_prompt cannot both be true",
            "continue_final_message",
        )
    kwargs = dict(request.chat_template_kwargs or {})
    if request.continue_final_message:
        kwargs["continue_final_message"] = True
    messages = [template_message(m, i) for i, m in enumerate(request.messages)]
    text, token_ids = pre.render_chat(
        messages, request.tools, request.add_generation_prompt, kwargs
    )
    if request.add_special_tokens:
        return list(pre.tokenizer.encode(text, add_special_tokens=True))
    return token_ids


def detokenize(request: DetokenizeRequest, pre: Preprocessor) -> dict[str, Any]:
    """vLLM's DetokenizeResponse: the text of `request.tokens` (special tokens kept)."""
    pre.check_model(request.model)
    pre.check_prompt(request.tokens, pre.context_length(), "tokens")
    return {"prompt": pre.tokenizer.decode(request.tokens)}
