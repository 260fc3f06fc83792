"""The errors a request can meet, as OpenAI's API shapes them: an HTTP status and a body
``{"error": {"message", "type", "param", "code"}}`` whose ``param`` names the request field at fault."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server answers with an error instead of a completion (it keeps serving)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class QueueFull(RequestError):
    """Every batch slot is taken and the queue holds --max_queue requests: 429, try again later."""

    def __init__(self, max_queue: int) -> None:
        super().__init__(f"the server is busy: its queue is full (--max_queue {max_queue}); retry later",
                         code="queue_full", status=429, kind="rate_limit_error")
