"""How the `gateway` command prints keys and usage: aligned tables for people, JSON for scripts.

Names, notes, metadata and model ids come from whoever created a key or sent a request, so
every character a terminal would act on (escape sequences, other control and format
characters such as bidi overrides) is printed escaped (`\x1b`), never raw.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from gateway.records import EDITABLE_FIELDS, KEY_FIELDS, KeyRecord, key_view
from gateway.schemas.codec import encode

__all__ = [
    "budget",
    "clean",
    "ms",
    "opt",
    "print_json",
    "print_key",
    "show",
    "status",
    "table",
    "when",
]


def clean(text: str) -> str:
    """`text` with every non-printable character (but the space) written as an escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _json_escape(c: str) -> str:
    code = ord(c)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # outside the BMP: a surrogate pair, as JSON writes it
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def print_json(obj: Any) -> None:
    text = msgspec.json.format(encode(obj), indent=2).decode()
    # msgspec leaves DEL, C1 controls and format characters raw; escaped, they are still JSON.
    print("".join(c if c.isprintable() or c == "\n" else _json_escape(c) for c in text))


def when(ts: float | None, never: str = "-") -> str:
    return never if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def status(key: KeyRecord) -> str:
    if key.revoked_at is not None:
        return "revoked"
    return "active" if key.usable_at(time.time()) else "expired"


def budget(key: KeyRecord) -> str:
    parts = [f"{key.budget_tokens} tok"] if key.budget_tokens is not None else []
    parts += [f"${key.budget_usd:g}"] if key.budget_usd is not None else []
    text = " + ".join(parts) or "-"
    return f"{text}/{key.budget_period}" if parts and key.budget_period else text


def opt(value: object) -> str:
    return "-" if value is None else str(value)


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right_from: int | None = None
) -> str:
    """Columns padded to their widest cell; columns from index `right_from` on align right."""
    right = len(headers) if right_from is None else right_from
    rows = [[clean(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i >= right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def print_key(key: KeyRecord) -> None:
    """Every field of the key in `KeyRecord` order, one per line; then its times, the ones
    that are settings (expiry) before its history; then its metadata."""
    lines: dict[str, str] = {}
    for name in (f.name for f in KEY_FIELDS):
        value = getattr(key, name)
        if name in ("digest", "metadata") or name.endswith("_at"):
            continue  # never shown; or shown below
        if name.startswith("budget_"):
            lines["budget"] = budget(key)  # one line says the whole budget
        elif name == "models":
            lines[name] = ", ".join(value) or "all"
        elif name == "notes":
            lines[name] = value or "-"
        else:
            lines["group" if name == "group_name" else name] = opt(value)
        if name == "prefix":
            lines["status"] = status(key)
    times = sorted((f.name for f in KEY_FIELDS if f.name.endswith("_at")), key=_is_history)
    lines |= {t.removesuffix("_at"): when(getattr(key, t), _NEVER.get(t, "-")) for t in times}
    lines |= {f"meta.{k}": v for k, v in key.metadata.items()}
    width = max(len(clean(name)) for name in lines)
    print("\n".join(f"{clean(name).ljust(width)}  {clean(value)}" for name, value in lines.items()))


_NEVER = {"expires_at": "never"}  # what an unset time means, where "-" would not say it


def _is_history(field: str) -> bool:
    return field not in EDITABLE_FIELDS


def show(key: KeyRecord, args: argparse.Namespace) -> int:
    if args.json:
        print_json(key_view(key))
    else:
        print_key(key)
    return 0


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
