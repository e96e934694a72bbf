"""Anthropic Messages API wire structs: the request we send, and the answers and events we read.

Outbound structs leave out what is unset; inbound ones name only what the translation reads
and tolerate block and event types added after this was written.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.schemas.common import MOST_COUNT, Count

API_VERSION = "2023-06-01"

# ---- wire structs: what we send ------------------------------------------------------------


class _Block(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class AnthropicText(_Block, tag="text"):
    text: str


class _Source(msgspec.Struct, tag_field="type"):
    pass


class AnthropicBase64Source(_Source, tag="base64"):
    media_type: str
    data: str


class AnthropicURLSource(_Source, tag="url"):
    url: str


class AnthropicImage(_Block, tag="image"):
    source: AnthropicBase64Source | AnthropicURLSource


class AnthropicDocument(_Block, tag="document"):
    source: AnthropicBase64Source | AnthropicURLSource


class AnthropicToolUse(_Block, tag="tool_use"):
    id: str
    name: str
    input: Raw


class AnthropicToolResult(_Block, tag="tool_result"):
    tool_use_id: str
    content: str


AnthropicBlock = (
    AnthropicText | AnthropicImage | AnthropicDocument | AnthropicToolUse | AnthropicToolResult
)


class AnthropicMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: list[AnthropicBlock]


class AnthropicTool(msgspec.Struct, omit_defaults=True):
    name: str
    input_schema: Raw
    description: str | UnsetType = UNSET


class AnthropicToolChoice(msgspec.Struct, omit_defaults=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | UnsetType = UNSET
    disable_parallel_tool_use: bool | UnsetType = UNSET


class AnthropicRequest(msgspec.Struct, omit_defaults=True):
    model: str
    max_tokens: int
    messages: list[AnthropicMessage]
    system: list[AnthropicText] | UnsetType = UNSET
    stop_sequences: list[str] | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    top_k: int | UnsetType = UNSET
    tools: list[AnthropicTool] | UnsetType = UNSET
    tool_choice: AnthropicToolChoice | UnsetType = UNSET
    thinking: Raw | UnsetType = UNSET
    metadata: dict[str, str] | UnsetType = UNSET
    output_config: Raw | UnsetType = UNSET
    stream: bool | UnsetType = UNSET


# ---- wire structs: what we read (unknown block and event types are tolerated) ---------------


class AnthropicUsage(msgspec.Struct):
    """Anthropic's counts, as far as they are believable: read apart from the answer
    (`USAGE_DECODER`), so a bad one costs the usage row its exactness, not the client its answer."""

    input_tokens: Count | None = None
    output_tokens: Count | None = None
    cache_creation_input_tokens: Count | None = None
    cache_read_input_tokens: Count | None = None
    # Details priced apart (an hour's cache writes, web searches), read leniently by
    # `detail`: one in an odd shape costs that detail, not the counts beside it.
    cache_creation: object = None
    server_tool_use: object = None
    speed: object = None  # (the speed it was served at: fast mode's rates apart)
    iterations: object = None  # (each sampling step: see `beyond_messages`)

    def detail(self, name: str, field: str) -> int:
        """The count `field` of the detail object `name` (0: none, or not a count)."""
        found = getattr(self, name)
        return _count(found.get(field) if isinstance(found, dict) else None)

    def beyond_messages(self) -> tuple[int, int, int, int, int]:
        """The tokens of the sampling steps Anthropic bills beside the answer's top-level
        counts (`iterations` entries of the types `BILLED_STEPS`: a server-side compaction's
        summary, an advisor's sub-inference; a `fallback_message` is the answer's own):
        uncached input, cache reads, cache writes (of which kept an hour) and output, charged
        at the model's rates."""
        steps = self.iterations
        if not isinstance(steps, list):
            return 0, 0, 0, 0, 0
        given = read = written = hour = made = 0
        for step in steps[:_MOST_STEPS]:
            if isinstance(step, dict) and step.get("type") in BILLED_STEPS:
                given += _count(step.get("input_tokens"))
                read += _count(step.get("cache_read_input_tokens"))
                wrote = _count(step.get("cache_creation_input_tokens"))
                written += wrote
                kept = step.get("cache_creation")
                if isinstance(kept, dict):
                    hour += min(_count(kept.get("ephemeral_1h_input_tokens")), wrote)
                made += _count(step.get("output_tokens"))
        most = MOST_COUNT
        return (
            min(given, most),
            min(read, most),
            min(written, most),
            min(hour, most),
            min(made, most),
        )


# The `usage.iterations` types billed beside the top-level counts (the anthropic SDK: a
# compaction's "are not included in the top-level `usage` fields"; the advisor's docs: the
# top level is the executor's only).
BILLED_STEPS = frozenset({"compaction", "advisor_message"})
_MOST_STEPS = 256  # (a hostile upstream's list of steps is read this far)


def _count(value: object) -> int:
    return value if type(value) is int and 0 < value <= MOST_COUNT else 0


class AnthropicContentBlock(msgspec.Struct):
    type: str
    text: str = ""
    thinking: str = ""
    id: str = ""
    name: str = ""
    input: Raw | UnsetType = UNSET


class AnthropicResponse(msgspec.Struct):
    type: str = ""  # "message": anything else is not an answer
    id: str = ""
    model: str = ""
    content: list[AnthropicContentBlock] = []
    stop_reason: str | None = None
    usage: Raw | UnsetType = UNSET  # an `AnthropicUsage`, read apart


class AnthropicDelta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""
    thinking: str = ""
    stop_reason: str | None = None


class AnthropicErrorBody(msgspec.Struct):
    type: str = ""
    message: str = ""


class AnthropicEvent(msgspec.Struct):
    type: str
    message: AnthropicResponse | None = None
    index: int | None = None  # (None: absent, which only events without a block may be)
    content_block: AnthropicContentBlock | None = None
    delta: AnthropicDelta | None = None
    usage: Raw | UnsetType = UNSET  # an `AnthropicUsage`, read apart
    error: AnthropicErrorBody | None = None


RESPONSE_DECODER = msgspec.json.Decoder(AnthropicResponse)
EVENT_DECODER = msgspec.json.Decoder(AnthropicEvent)
USAGE_DECODER = msgspec.json.Decoder(AnthropicUsage)
