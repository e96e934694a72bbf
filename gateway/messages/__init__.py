"""Anthropic's Messages API in front of every provider: request translation to chat, answers,
event streams and Anthropic-shaped errors (Anthropic upstreams get it untranslated)."""

from __future__ import annotations

from gateway.messages.errors import error_event
from gateway.messages.reply import from_completion
from gateway.messages.request import Translation, to_chat
from gateway.messages.stream import MessageEvents

__all__ = ["MessageEvents", "Translation", "error_event", "from_completion", "to_chat"]
