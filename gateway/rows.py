"""Key and usage records as database rows, and new or changed keys checked: shared by both
backends (`gateway.store` on SQLite, `gateway.pg_store` on PostgreSQL)."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.errors import InvalidRequest
from gateway.records import EDITABLE_FIELDS, KEY_FIELDS, KeyRecord, UsageRecord
from gateway.schemas.codec import encode, error_path

__all__ = [
    "COPIED_TABLES",
    "KEY_COLUMNS",
    "SECRET_PREFIX",
    "USAGE_COLUMNS",
    "editable",
    "key_from_row",
    "key_params",
    "new_key",
    "updated_key",
    "usage_from_row",
]

SECRET_PREFIX = "sk-kiosk-"  # noqa: S105 (a label, not a secret)
_PREFIX_CHARS = 12  # what `keys list` shows so people can tell keys apart
# A record's fields are its table's columns, in this order.
KEY_COLUMNS = [f.name for f in KEY_FIELDS]
USAGE_COLUMNS = [f.name for f in msgspec.structs.fields(UsageRecord)]
# The tables `gateway copy-db` copies; a target must have none of their rows.
COPIED_TABLES = ("keys", "usage", "refusals", "stored_ids")
# Key fields stored as plain text (not JSON) that callers give.
_TEXT_FIELDS = ("name", "notes", "group_name")


def editable(fields: dict[str, Any]) -> dict[str, Any]:
    """Caller-given key fields, refused unless editable, JSON-ish collections made exact.

    Raises:
        InvalidRequest: a field that does not exist or is the gateway's to set.
    """
    unknown = sorted(set(fields) - set(EDITABLE_FIELDS))
    if unknown:
        raise InvalidRequest(f"Key field {unknown[0]!r} cannot be changed.", param=unknown[0])
    if "models" in fields:
        fields["models"] = tuple(fields["models"] or ())
    if "metadata" in fields:
        fields["metadata"] = dict(fields["metadata"] or {})
    return fields


def checked(record: KeyRecord) -> KeyRecord:
    """Type-check a record built from caller input (msgspec validates the Struct annotations).

    A NUL character in a text column is refused: PostgreSQL's text cannot hold one, and a key
    must be storable in either backend (JSON columns hold it escaped).
    """
    try:
        checked = msgspec.convert(msgspec.structs.asdict(record), KeyRecord)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(
            f"Invalid key field: {exc}", param=error_path(str(exc)).param
        ) from None
    for name in _TEXT_FIELDS:
        value = getattr(checked, name)
        if isinstance(value, str) and "\x00" in value:
            raise InvalidRequest(f"Key field {name!r} holds a NUL character.", param=name)
    return checked


def new_key(name: str, secret: str | None, fields: dict[str, Any]) -> tuple[KeyRecord, str]:
    """A new key record (checked) and its plain secret, random unless given.

    Raises:
        InvalidRequest: a field does not exist, is not the caller's to set, or has the
            wrong type.
    """
    fields = editable(fields)
    if secret is None:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    record = checked(
        KeyRecord(
            id="key_" + secrets.token_hex(6),
            name=name,
            prefix=secret[:_PREFIX_CHARS],
            digest=hashlib.sha256(secret.encode()).hexdigest(),
            created_at=now,
            updated_at=now,
            **fields,
        )
    )
    return record, secret


def updated_key(current: KeyRecord, changes: dict[str, Any]) -> KeyRecord:
    """`current` with caller-given changes applied and checked.

    Raises:
        InvalidRequest: a field cannot be changed or has the wrong type.
    """
    return checked(msgspec.structs.replace(current, **editable(changes), updated_at=time.time()))


def key_from_row(row: Sequence[Any]) -> KeyRecord:
    fields = dict(zip(KEY_COLUMNS, row, strict=True))
    fields["models"] = msgspec.json.decode(fields["models"])
    fields["metadata"] = msgspec.json.decode(fields["metadata"])
    return msgspec.convert(fields, KeyRecord)


def key_params(key: KeyRecord) -> tuple[Any, ...]:
    """The record's values in `KEY_COLUMNS` order, JSON columns encoded."""
    values = msgspec.structs.asdict(key)
    values["models"] = encode(list(key.models)).decode()
    values["metadata"] = encode(key.metadata).decode()
    return tuple(values[f] for f in KEY_COLUMNS)


def usage_from_row(row: Sequence[Any]) -> UsageRecord:
    fields = dict(zip(USAGE_COLUMNS, row, strict=True))
    fields["stream"], fields["estimated"] = bool(fields["stream"]), bool(fields["estimated"])
    return UsageRecord(**fields)
