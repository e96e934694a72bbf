"""Structs shared by several endpoints: token usage and constrained number aliases."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, UnsetType

__all__ = [
    "MOST_COUNT",
    "CompletionTokensDetails",
    "Penalty",
    "PromptTokensDetails",
    "Temperature",
    "TopP",
    "Usage",
]

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: Count | None = 0
    audio_tokens: int | UnsetType | None = UNSET
    cached_audio_tokens: int | UnsetType | None = UNSET  # (Gemini's: priced apart)


class CompletionTokensDetails(msgspec.Struct):
    reasoning_tokens: Count | None = 0
    audio_tokens: int | UnsetType | None = UNSET
    image_tokens: int | UnsetType | None = UNSET  # (Gemini's images out: priced apart)
    accepted_prediction_tokens: int | UnsetType | None = UNSET
    rejected_prediction_tokens: int | UnsetType | None = UNSET


# Counts beyond this (a trillion tokens) are nonsense from an upstream. Summed, they stay
# far from the 64-bit counters of SQLite rows and Redis limits (HINCRBY fails past 2**63, which
# the gate would take for Redis down): 2**23 such answers in flight at once to get there.
MOST_COUNT = 2**40
Count = Annotated[int, msgspec.Meta(ge=0, le=MOST_COUNT)]


class Usage(msgspec.Struct):
    """OpenAI `usage`. Upstreams may send nulls in the detail objects, so those stay optional;
    the three counts are always encoded because the SDK requires them."""

    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count = 0
    prompt_tokens_details: PromptTokensDetails | UnsetType | None = UNSET
    completion_tokens_details: CompletionTokensDetails | UnsetType | None = UNSET
