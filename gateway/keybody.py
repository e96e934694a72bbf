"""What a key's creation or change may hold, checked the same way wherever it comes from: the
admin API's JSON bodies, the dashboard's form and the CLI's options.

The bodies' types and bounds (`KeyCreate`, `KeyUpdate`), and the checks beyond types (`checked`):
finite numbers, the config group's existence, expiry in any accepted form. Apart from `keyops`
so the CLI applies them without loading the HTTP stack.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from gateway.errors import InvalidRequest
from gateway.records import EDITABLE_FIELDS, KEY_FIELDS, VIEW_NAMES
from gateway.schemas.codec import error_path
from gateway.timeparse import parse_expires

if TYPE_CHECKING:
    from gateway.settings import Settings

__all__ = ["MAX_ALLOWED_MODELS", "KeyCreate", "KeyUpdate", "body_of", "checked"]

B = TypeVar("B", bound=msgspec.Struct)

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
    msgspec.Meta(max_length=16),
]
# An allow-list entry is a model id or a glob, at most as long as a model id a request may name
# (`pipeline.MAX_MODEL_ID`); a key's list is walked on each of its requests. Bounded, as
# everything people type here is.
MAX_ALLOWED_MODELS = 256
Models = Annotated[
    tuple[Annotated[str, msgspec.Meta(min_length=1, max_length=256)], ...],
    msgspec.Meta(max_length=MAX_ALLOWED_MODELS),
]

# Where the API takes more, or less, than the record's own type: bounds on what people type,
# and an expiry also as "30d" or an ISO-8601 time (besides unix seconds).
_API_TYPES: dict[str, Any] = {
    "name": Name,
    "models": Models,
    "expires_at": float | str | None,
    "notes": Annotated[str, msgspec.Meta(max_length=2000)],
    "metadata": Metadata,
}


def _body(name: str, *, update: bool) -> type[msgspec.Struct]:
    """The body of a key's creation or (`update`) change: every editable `KeyRecord` field.

    A change leaves out what stays as it is (UNSET); `null` clears a limit, budget, expiry or
    group. Attributes keep the record's names, so a decoded body maps onto the store's fields.
    """
    fields: list[tuple[str, Any, Any]] = []
    for f in KEY_FIELDS:
        if f.name not in EDITABLE_FIELDS:
            continue
        kind = _API_TYPES.get(f.name, f.type)
        rename = VIEW_NAMES.get(f.name, f.name)  # the name `key_view` shows it by
        if update:
            default = msgspec.field(default=UNSET, name=rename)
            kind = kind | UnsetType
        elif f.default_factory is not msgspec.NODEFAULT:
            default = msgspec.field(default_factory=f.default_factory, name=rename)
        else:
            default = msgspec.field(default=f.default, name=rename)
        fields.append((f.name, kind, default))
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True, kw_only=True)


KeyCreate = _body("KeyCreate", update=False)
KeyUpdate = _body("KeyUpdate", update=True)


def _quoted(field: str) -> str:
    return f"'{field}'"


def body_of(
    data: Mapping[str, Any],
    kind: type[B],
    *,
    strict: bool = True,
    label: Callable[[str], str] = _quoted,
) -> B:
    """`data` (by the API's field names) as a `KeyCreate` or `KeyUpdate`, with the bounds a
    JSON body gets: for values that arrive as Python objects (the CLI's options) or text (the
    dashboard's form, `strict=False`) rather than as an admin API body.

    Raises:
        InvalidRequest: a value the admin API would refuse; `label(field)` names the field.
    """
    try:
        return msgspec.convert(data, kind, strict=strict)
    except msgspec.ValidationError as exc:
        problem, _, param = error_path(str(exc))
        where = f" {label(param)}" if param else ""
        raise InvalidRequest(f"Invalid{where}: {problem}", param=param) from None


def checked(
    body: msgspec.Struct, settings: Settings | None, *, label: Callable[[str], str] = _quoted
) -> dict[str, Any]:
    """What a `KeyCreate` or `KeyUpdate` sets (by the record's field names), checked beyond
    its types, the same way for the admin API, the dashboard and the CLI: every number finite
    (JSON cannot say inf or NaN, but Python floats and lax conversion of text can), the group
    in the config (not checked without one: the CLI given only `--db`), and the expiry in any
    accepted form, as unix seconds.

    Raises:
        InvalidRequest: a value is refused, or (a change) the body names nothing.
    """
    changes = {f: v for f, v in msgspec.structs.asdict(body).items() if v is not UNSET}
    for field, value in changes.items():
        name = VIEW_NAMES.get(field, field)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"Invalid {label(name)}: expected a finite number", param=name)
        if not _utf8(value):  # (only the CLI's arguments can hold lone surrogates)
            raise InvalidRequest(f"Invalid {label(name)}: expected UTF-8 text", param=name)
        if field in _PLAIN_TEXT and not _plain(value, field == "notes"):
            raise InvalidRequest(
                f"Invalid {label(name)}: control characters and bidirectional formatting "
                "characters are not allowed",
                param=name,
            )
    if "group_name" in changes and settings is not None:
        settings.require_group(changes["group_name"])
    if "expires_at" in changes:
        changes["expires_at"] = _expires(changes["expires_at"], label)
    if not changes:
        raise InvalidRequest("The body names no field to change.")
    return changes


# What people read back in the dashboard, the CLI's tables and the admin API: no control
# characters (a name over several lines, an escape sequence for a terminal) and none of
# Unicode's bidirectional formatting characters, which reorder what follows them on screen
# ("key-for-\u202eved" shows as "key-for-dev"), so one key can pass for another. Notes keep
# their line breaks and tabs (a form's text area sends CRLF); the rest is one line each.
_UNSAFE = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_NOT_PLAIN = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_UNSAFE}]")
_NOT_PLAIN_NOTES = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{_UNSAFE}]")
_PLAIN_TEXT = frozenset({"name", "notes", "metadata", "models"})


def _plain(value: Any, lines: bool) -> bool:
    """Whether a name, notes (`lines`), metadata or an allow-list hold no character
    `_NOT_PLAIN` refuses (one line each: no line or paragraph separator either)."""
    pattern = _NOT_PLAIN_NOTES if lines else _NOT_PLAIN
    if isinstance(value, dict):
        texts = [*value.keys(), *value.values()]
    else:
        texts = list(value) if isinstance(value, tuple | list) else [value]
    return not any(isinstance(t, str) and pattern.search(t) for t in texts)


def _utf8(value: Any) -> bool:
    """Whether text (or every text in a tuple) can be stored: a command line argument that is
    not UTF-8 holds lone surrogates (`surrogateescape`), which no store can encode."""
    texts = value if isinstance(value, tuple) else (value,)
    try:
        for text in texts:
            if isinstance(text, str):
                text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _expires(value: float | str | None, label: Callable[[str], str]) -> float | None:
    if value is None:
        return None
    try:
        # Unix seconds get the same checks as "30d" or an ISO-8601 time.
        text = datetime.fromtimestamp(value, UTC).isoformat() if isinstance(value, float) else value
        return parse_expires(text)
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidRequest(f"Invalid {label('expires_at')}: {exc}", param="expires_at") from None
