"""Records that cross module lines: a virtual key, one usage row, and a usage summary row.

The store persists them, the auth cache serves `KeyRecord`s from memory, and the usage
recorder queues `UsageRecord`s; none of those modules depends on another's internals.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import msgspec

__all__ = [
    "LIMIT_FIELDS",
    "BudgetPeriod",
    "KeyRecord",
    "UsageRecord",
    "UsageSummaryRow",
    "key_view",
    "model_allowed",
]

BudgetPeriod = Literal["day", "week", "month", "total"]
# A key's limits and budget: what a config group can default and `keys update` can clear.
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "budget_tokens", "budget_usd", "budget_period")


def model_allowed(patterns: tuple[str, ...], model_id: str, providers: tuple[str, ...]) -> bool:
    """Whether an allow-list admits `model_id`; an empty list admits everything.

    A pattern is an exact model id or a glob such as `openai/*`. A configured alias (no `/`)
    whose targets all live on provider P is also admitted by `P/*`, so an owner can grant
    "everything on openai" without listing aliases.
    """
    if not patterns:
        return True
    for pattern in patterns:
        if pattern == model_id or fnmatch.fnmatchcase(model_id, pattern):
            return True
        if providers and pattern.endswith("/*") and all(p == pattern[:-2] for p in providers):
            return True
    return False


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A virtual API key as the gateway knows it. Only the SHA-256 digest of the secret is kept."""

    id: str
    name: str
    prefix: str  # first characters of the secret, for people to recognise a key
    digest: str  # hex SHA-256 of the full secret
    created_at: float
    updated_at: float
    models: tuple[str, ...] = ()  # allow-list; empty = every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: BudgetPeriod | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    metadata: dict[str, str] = {}
    group_name: str | None = None  # a `[[groups]]` entry of the config: defaults for this key
    notes: str = ""

    def usable_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    @property
    def has_limits(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrency))

    @property
    def has_budget(self) -> bool:
        return self.budget_tokens is not None or self.budget_usd is not None


def key_view(key: KeyRecord) -> dict[str, Any]:
    """A key as the CLI and the admin API show it: never its digest (nor, of course, secret)."""
    view = msgspec.structs.asdict(key)
    del view["digest"]
    view["group"] = view.pop("group_name")
    return view


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One request as the usage table stores it."""

    ts: float  # unix seconds when the request arrived
    request_id: str
    key_id: str | None
    model: str | None
    provider: str | None
    upstream_model: str | None
    endpoint: str
    stream: bool
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    # True when the upstream did not report usage (e.g. the client hung up) and we estimated.
    estimated: bool = False


class UsageSummaryRow(msgspec.Struct, frozen=True, kw_only=True):
    """One group of a usage report (`by` = key, model or day)."""

    group: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float
    p50_latency_ms: float | None
    p95_latency_ms: float | None
