"""The Responses API on top of chat completions: request translation, answers, event streams."""

from __future__ import annotations

from gateway.responses.output import from_completion, shell
from gateway.responses.request import to_chat
from gateway.responses.stream import ResponseEvents, error_event
from gateway.responses.translation import Translation

__all__ = [
    "ResponseEvents",
    "Translation",
    "error_event",
    "from_completion",
    "shell",
    "to_chat",
]
