"""The error of a bad tools request, torch- and router-free: the router answers it as a 400
(InvalidRequestError), the offline `LLM.chat` raises it as the ValueError it is."""

from __future__ import annotations


class ToolRequestError(ValueError):
    """A request's `tools`, `tool_choice` or `parallel_tool_calls` cannot be served. `param`
    names the field (OpenAI's `param`, e.g. `tools.0.function.parameters`); `code` is OpenAI's
    machine-readable code when one fits (e.g. "unsupported_parameter")."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
