"""Token Kiosk: a self-hosted, OpenAI-compatible LLM API gateway."""

from gateway import hangups

__version__ = "0.1.0"

# A `gateway serve` process holds SIGHUP from its first moment: its default action would end
# the server before it can reload on it (gateway.hangups).
if hangups.serving_from_argv():
    hangups.hold()
