"""The Responses API on top of chat completions: request translation, answers, event streams."""

from __future__ import annotations

from gateway.responses.output import from_completion, new_id, shell
from gateway.responses.request import Translation, to_chat
from gateway.responses.stream import ResponseEvents, error_event

__all__ = [
    "ResponseEvents",
    "Translation",
    "error_event",
    "from_completion",
    "new_id",
    "shell",
    "to_chat",
]
