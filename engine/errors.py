"""Errors the engine raises to its callers as part of its interface."""

from __future__ import annotations


class EngineOverloadedError(RuntimeError):
    """Too many requests waiting: the engine refuses a new one instead of queueing it.

    Raised when `num_waiting` requests already wait and the limit is `max_num_waiting`.
    `retry_after_s` (seconds) is a hint for when to try again. The HTTP service maps this to
    429 Too Many Requests with a `Retry-After` header, the gRPC service to RESOURCE_EXHAUSTED.
    """

    def __init__(self, num_waiting: int, max_num_waiting: int, retry_after_s: float = 1.0) -> None:
        super().__init__(
            f"too many requests waiting: {num_waiting} waiting, "
            f"max_num_waiting is {max_num_waiting}; retry after {retry_after_s:g} s"
        )
        self.num_waiting = num_waiting
        self.max_num_waiting = max_num_waiting
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[EngineOverloadedError], tuple[int, int, float]]:
        # Exceptions pickle as cls(*args); ours takes the fields, not the message.
        return type(self), (self.num_waiting, self.max_num_waiting, self.retry_after_s)
