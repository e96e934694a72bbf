"""Gemini `generateContent` and `batchEmbedContents` wire structs: camelCase on the wire,
unset fields left out.

Outbound structs carry what the translation writes; inbound ones name only what it reads.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.providers._embeddings import Float32
from gateway.schemas.common import MOST_COUNT, Count


class _Wire(msgspec.Struct, rename="camel", omit_defaults=True):
    pass


class GeminiBlob(_Wire):
    mime_type: str
    data: str


class GeminiFileData(_Wire):
    file_uri: str
    mime_type: str | UnsetType = UNSET


class GeminiFunctionCall(_Wire):
    name: str
    args: Raw | UnsetType = UNSET
    id: str | UnsetType = UNSET


class GeminiFunctionResponse(_Wire):
    name: str
    response: Raw
    id: str | UnsetType = UNSET


class GeminiPart(_Wire):
    text: str | UnsetType = UNSET
    inline_data: GeminiBlob | UnsetType = UNSET
    file_data: GeminiFileData | UnsetType = UNSET
    function_call: GeminiFunctionCall | UnsetType = UNSET
    function_response: GeminiFunctionResponse | UnsetType = UNSET
    thought: bool | UnsetType = UNSET
    thought_signature: str | UnsetType = UNSET


class GeminiContent(_Wire):
    parts: list[GeminiPart]
    role: Literal["user", "model"] | UnsetType = UNSET


class GeminiFunctionDeclaration(_Wire):
    name: str
    description: str | UnsetType = UNSET
    parameters: Raw | UnsetType = UNSET


class GeminiTool(_Wire):
    function_declarations: list[GeminiFunctionDeclaration]


class GeminiFunctionCallingConfig(_Wire):
    mode: Literal["AUTO", "ANY", "NONE"]
    allowed_function_names: list[str] | UnsetType = UNSET


class GeminiToolConfig(_Wire):
    function_calling_config: GeminiFunctionCallingConfig


class GeminiThinkingConfig(_Wire):
    include_thoughts: bool | UnsetType = UNSET
    thinking_budget: int | UnsetType = UNSET
    thinking_level: str | UnsetType = UNSET


class GeminiGenerationConfig(_Wire):
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    top_k: int | UnsetType = UNSET
    max_output_tokens: int | UnsetType = UNSET
    stop_sequences: list[str] | UnsetType = UNSET
    candidate_count: int | UnsetType = UNSET
    seed: int | UnsetType = UNSET
    presence_penalty: float | UnsetType = UNSET
    frequency_penalty: float | UnsetType = UNSET
    response_mime_type: str | UnsetType = UNSET
    response_schema: Raw | UnsetType = UNSET
    response_modalities: list[str] | UnsetType = UNSET
    thinking_config: GeminiThinkingConfig | UnsetType = UNSET


class GeminiRequest(_Wire):
    contents: list[GeminiContent]
    system_instruction: GeminiContent | UnsetType = UNSET
    tools: list[GeminiTool] | UnsetType = UNSET
    tool_config: GeminiToolConfig | UnsetType = UNSET
    generation_config: GeminiGenerationConfig | UnsetType = UNSET


class GeminiReadPart(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    inline_data: GeminiBlob | None = None
    function_call: GeminiFunctionCall | None = None
    thought_signature: str | None = None


class GeminiReadContent(msgspec.Struct):
    parts: list[GeminiReadPart] = []


class GeminiCandidate(msgspec.Struct, rename="camel"):
    content: GeminiReadContent | None = None
    finish_reason: str | None = None
    index: int = 0


NO_DETAILS = Raw(b"[]")
_DETAILS = msgspec.json.Decoder()


class GeminiUsage(msgspec.Struct, rename="camel"):
    """Gemini's counts, as far as they are believable: read apart from the answer
    (`USAGE_DECODER`), so a bad one costs the usage row its exactness, not the client its answer."""

    prompt_token_count: Count = 0
    candidates_token_count: Count = 0
    thoughts_token_count: Count = 0
    tool_use_prompt_token_count: Count = 0
    cached_content_token_count: Count = 0
    total_token_count: Count = 0
    # The tokens of each modality (TEXT, IMAGE, AUDIO, VIDEO, DOCUMENT) within the prompt,
    # the answer and the prompt's cached part: audio and images are priced apart from text
    # (`prices.Usage`). Read leniently (`modality`): an odd entry costs that entry, not the
    # counts beside it.
    prompt_tokens_details: Raw = NO_DETAILS
    candidates_tokens_details: Raw = NO_DETAILS
    cache_tokens_details: Raw = NO_DETAILS

    def modality(self, details: Raw, name: str) -> int:
        """The tokens of modality `name` in `details` (0: none reported, or not a count; a
        list that cannot be read, 1e400 in it say, counts nothing)."""
        if details == NO_DETAILS:
            return 0
        try:
            entries = _DETAILS.decode(details)
        except (msgspec.MsgspecError, RecursionError):
            return 0
        if not isinstance(entries, list):
            return 0
        total = 0
        for entry in entries:
            if isinstance(entry, dict) and entry.get("modality") == name:
                count = entry.get("tokenCount")
                if type(count) is int and 0 < count <= MOST_COUNT:
                    total += count
        return total


class GeminiPromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


NO_USAGE = Raw(b"null")


class GeminiResponse(msgspec.Struct, rename="camel"):
    candidates: list[GeminiCandidate] = []
    prompt_feedback: GeminiPromptFeedback | None = None
    usage_metadata: Raw = NO_USAGE  # a `GeminiUsage`, read apart
    model_version: str = ""
    response_id: str = ""


class GeminiEmbedRequest(_Wire):
    model: str  # "models/<name>": the model the URL names
    content: GeminiContent
    output_dimensionality: int | UnsetType = UNSET


class GeminiBatchEmbedRequest(_Wire):
    requests: list[GeminiEmbedRequest]


class GeminiEmbedding(msgspec.Struct):
    values: list[Float32] = []


class GeminiBatchEmbedResponse(msgspec.Struct):
    embeddings: list[GeminiEmbedding] = []


RESPONSE_DECODER = msgspec.json.Decoder(GeminiResponse)
BATCH_EMBED_DECODER = msgspec.json.Decoder(GeminiBatchEmbedResponse)
USAGE_DECODER = msgspec.json.Decoder(GeminiUsage)
