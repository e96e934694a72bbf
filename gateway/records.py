"""Records that cross module lines: a virtual key, one usage row, and a usage summary row.

The store persists them, the key cache serves `KeyRecord`s from memory, and the usage
recorder queues `UsageRecord`s; none of those modules depends on another's internals.

`KeyRecord` is the one declaration of a key's fields: the store's columns, the admin API's
bodies, the CLI's options and the config groups' defaults are all read from it (`KEY_FIELDS`,
`EDITABLE_FIELDS`, `LIMIT_FIELDS`), so a new field is added there and nowhere else.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

__all__ = [
    "EDITABLE_FIELDS",
    "KEY_FIELDS",
    "LIMIT_FIELDS",
    "VIEW_NAMES",
    "BudgetPeriod",
    "KeyRecord",
    "UsageRecord",
    "UsageSummaryRow",
    "describe",
    "key_view",
    "mint_uid",
    "model_allowed",
    "value_type",
]

BudgetPeriod = Literal["day", "week", "month", "total"]
# SQLite stores integers up to 2**63 - 1: beyond that a value is refused, naming its field.
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]

# Marks a key's limits and budget (`None`: none): what a config group can default for its keys
# and `keys update` can clear. The description is the CLI option's help.
_LIMIT = "limit"


def _limit(description: str) -> msgspec.Meta:
    return msgspec.Meta(description=description, extra={_LIMIT: True})


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
    rpm: Annotated[PositiveInt | None, _limit("requests per minute")] = None
    tpm: Annotated[PositiveInt | None, _limit("tokens per minute")] = None
    max_concurrency: Annotated[PositiveInt | None, _limit("requests in flight")] = None
    budget_tokens: Annotated[PositiveInt | None, _limit("tokens per budget period")] = None
    budget_usd: Annotated[PositiveFloat | None, _limit("USD per budget period")] = None
    budget_period: Annotated[BudgetPeriod | None, _limit("the period budgets count over")] = None
    expires_at: float | None = None
    revoked_at: float | None = None
    metadata: dict[str, str] = {}
    group_name: str | None = None  # a `[[groups]]` entry of the config: defaults for this key
    notes: str = ""

    def usable_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    @property
    def has_limits(self) -> bool:
        # (Not any() over a generator: read on every request.)
        return self.rpm is not None or self.tpm is not None or self.max_concurrency is not None

    @property
    def has_budget(self) -> bool:
        return self.budget_tokens is not None or self.budget_usd is not None


def _meta(field: msgspec.structs.FieldInfo) -> msgspec.Meta | None:
    extras = getattr(field.type, "__metadata__", ())
    return next((m for m in extras if isinstance(m, msgspec.Meta)), None)


def value_type(field: msgspec.structs.FieldInfo) -> Any:
    """A field's type without `None` and constraints: `int`, `float`, `str`, a `Literal`..."""
    kind = field.type
    while True:
        if get_origin(kind) is Annotated:
            kind = get_args(kind)[0]
        elif get_origin(kind) in (Union, UnionType):  # Optional[X] or X | None: X
            kind = next(a for a in get_args(kind) if a is not type(None))
        else:
            return kind


def describe(field: msgspec.structs.FieldInfo) -> str:
    """The description a field's declaration gives it ("" without one)."""
    meta = _meta(field)
    return (meta.description or "") if meta is not None else ""


KEY_FIELDS: tuple[msgspec.structs.FieldInfo, ...] = msgspec.structs.fields(KeyRecord)
# Set by the gateway itself, never by whoever creates or changes a key.
_MANAGED = frozenset({"id", "prefix", "digest", "created_at", "updated_at", "revoked_at"})
# What a key's creator may set and a change may change: every other field.
EDITABLE_FIELDS = tuple(f.name for f in KEY_FIELDS if f.name not in _MANAGED)
LIMIT_FIELDS = tuple(
    f.name for f in KEY_FIELDS if (m := _meta(f)) is not None and (m.extra or {}).get(_LIMIT)
)


# What the CLI and the admin API call a record's field, where the name differs.
VIEW_NAMES = {"group_name": "group"}


def key_view(key: KeyRecord) -> dict[str, Any]:
    """A key as the CLI and the admin API show it: never its digest (nor, of course, secret)."""
    view = msgspec.structs.asdict(key)
    del view["digest"]
    for field, shown in VIEW_NAMES.items():
        view[shown] = view.pop(field)
    return view


_uid_prefix = uuid.uuid4().hex
_uid_counter = itertools.count(1)


def _new_uid_prefix() -> None:
    """A forked worker mints from its own prefix, never its parent's."""
    global _uid_prefix, _uid_counter
    _uid_prefix, _uid_counter = uuid.uuid4().hex, itertools.count(1)


os.register_at_fork(after_in_child=_new_uid_prefix)


def mint_uid() -> str:
    """A usage row's unique id: a random per-process prefix and a counter (no syscall)."""
    return f"{_uid_prefix}{next(_uid_counter):x}"


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
    # Of prompt_tokens: those read from and written to the upstream's prompt cache.
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # Minted by the gateway for this row alone (`mint_uid`); the database keeps one row per
    # uid, so a write retried after a lost commit adds nothing. None: not deduplicated.
    uid: str | None = None


class UsageSummaryRow(msgspec.Struct, frozen=True, kw_only=True):
    """One group of a usage report (`by` = key, model or day)."""

    group: str
    # By key: the key's name (None for requests without a key, or a key since deleted).
    name: str | None = None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float
    p50_latency_ms: float | None
    p95_latency_ms: float | None

    @classmethod
    def of(
        cls,
        totals: Sequence[Any],
        latency: tuple[float | None, float | None],
        names: Mapping[str, str],
    ) -> UsageSummaryRow:
        """A report row from its SQL totals (group, requests, errors, prompt, completion and
        total tokens, cost: the same columns on both backends), its latency p50 and p95, and
        the names of keys (a `by=key` report)."""
        group, requests, errors, prompt, completion, total, cost = totals
        return cls(
            group=group,
            name=names.get(group),
            requests=int(requests),
            errors=int(errors),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
            total_tokens=int(total),
            cost_usd=float(cost),  # (PostgreSQL's sum of a double comes as a Decimal)
            p50_latency_ms=latency[0],
            p95_latency_ms=latency[1],
        )

    @classmethod
    def whole(
        cls,
        rows: Sequence[UsageSummaryRow],
        group: str,
        name: str | None,
        latency: tuple[float | None, float | None],
    ) -> UsageSummaryRow:
        """The groups `rows` as one (a key's models as the key, on both backends): their
        counts added as integers (exact), their cost exactly rounded (`fsum`: a sum in
        another order may differ in its last bit), and the percentiles of all their rows."""
        return cls(
            group=group,
            name=name,
            requests=sum(row.requests for row in rows),
            errors=sum(row.errors for row in rows),
            prompt_tokens=sum(row.prompt_tokens for row in rows),
            completion_tokens=sum(row.completion_tokens for row in rows),
            total_tokens=sum(row.total_tokens for row in rows),
            cost_usd=math.fsum(row.cost_usd for row in rows),
            p50_latency_ms=latency[0],
            p95_latency_ms=latency[1],
        )
