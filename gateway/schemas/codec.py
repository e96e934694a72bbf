"""Codecs made once at import, and `decode_body()` that turns msgspec errors into 400s.

msgspec reports "Expected `int`, got `str` - at `$.messages[0].content`"; `error_path()` is the
one reader of that path: the error's `param` (OpenAI style, `messages[0].content`) tells a client
which field is wrong, and the same path prefixes config and key-store errors.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple, TypeGuard, TypeVar

import msgspec

from gateway.errors import InvalidRequest

__all__ = [
    "ENCODER",
    "ErrorPath",
    "decode_body",
    "encode",
    "error_path",
    "present",
    "raw_fields",
    "raw_object",
]

T = TypeVar("T")

ENCODER = msgspec.json.Encoder()
encode = ENCODER.encode

# Decoders by type, each made once. A top-level object with its values kept as raw bytes
# (cheap, and lets pass-through forward fields the typed structs do not know) is `raw_object`.
_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {
    dict[str, msgspec.Raw]: msgspec.json.Decoder(dict[str, msgspec.Raw])
}


def present(value: msgspec.Raw | msgspec.UnsetType | None) -> TypeGuard[msgspec.Raw]:
    """Whether a raw pass-through field was sent with a value other than JSON `null`."""
    return isinstance(value, msgspec.Raw) and bytes(value) != b"null"


def opens(value: msgspec.Raw | msgspec.UnsetType, first: bytes) -> bool:
    """Whether a raw value was sent and is of the kind its first byte says (`{` an object, `[`
    a list, `"` a string): a raw value is its JSON without the whitespace around it."""
    return value is not msgspec.UNSET and memoryview(value)[:1].tobytes() == first


def may_spell(body: bytes, word: bytes) -> bool:
    """Whether a JSON body may hold `word` (ASCII) in a string or key: it spells it as it is,
    or it holds a `\\u` escape of one of its characters (a `"` in `word` ends a key or a
    string, which no escape writes). Escapes of other characters (an SDK's `\\u001b`) do not
    count. (`find`, not `in`: on Python 3.11 `in` on bytes first tries its operand as an
    integer.)"""
    return body.find(word) >= 0 or spells_escaped(body, word)


def spells_escaped(body: bytes, word: bytes) -> bool:
    """Whether a JSON body holds a `\\u` escape of one of `word`'s characters (`may_spell`):
    without one, `word` can only be spelled as it is."""
    return body.find(b"\\u") >= 0 and _escapes(word).search(body) is not None


@functools.cache
def _escapes(word: bytes) -> re.Pattern[bytes]:
    """The `\\u` escapes of `word`'s characters but `"`, hex digits in either case: one
    expression, one pass over the body (a `find` for each escape took 40 ms for 10 MB)."""
    codes = dict.fromkeys(
        "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{ord(char):04x}")
        for char in word.decode("ascii")
        if char != '"'
    )
    return re.compile(rb"\\u(?:" + "|".join(codes).encode() + rb")")


def raw_fields(obj: msgspec.Struct) -> dict[str, msgspec.Raw]:
    """The fields `encode(obj)` would write, each as raw JSON (no decode of the encoding).

    Only for structs whose unset fields are `UNSET` (omitted), as request structs are.
    """
    # The class's own tuples of names, not `msgspec.structs.fields()`: that works the type
    # hints out anew on every call (typing's machinery, and a cycle of garbage each time).
    cls = type(obj)
    return {
        wire: msgspec.Raw(encode(value))
        for name, wire in zip(cls.__struct_fields__, cls.__struct_encode_fields__, strict=True)
        if (value := getattr(obj, name)) is not msgspec.UNSET
    }


_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object (missing required|contains unknown) field `(?P<field>[^`]+)`")


class ErrorPath(NamedTuple):
    """A msgspec validation message taken apart by `error_path()`."""

    problem: str  # the message without its " - at `$...`" ending
    at: str | None  # where msgspec reports it, `$.` dropped (`server`, `headers[...]`); None: root
    param: str | None  # the field it is about, OpenAI style (see `error_path`)


def error_path(message: str) -> ErrorPath:
    """Split a msgspec error message into its problem, its path, and the field it names.

    A missing or unknown field is reported at its parent's path; `param` names the field
    itself. msgspec writes a dict value's position as `[...]`; `param` names the dict.
    """
    match = _PATH.search(message)
    problem = message if match is None else message[: match.start()]
    at = None if match is None else match.group("path") or None
    param = None if at is None else at.replace("[...]", "") or None
    missing = _MISSING.match(problem)
    if missing is not None:
        field = missing.group("field")
        param = f"{param}.{field}" if param else field
    return ErrorPath(problem, at, param)


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode a request body into `type_`.

    Raises:
        InvalidRequest: the body is not JSON, not an object, or a field has the wrong
            type or value; `param` names the field.
    """
    decoder = _DECODERS.get(type_)
    if decoder is None:
        decoder = _DECODERS[type_] = msgspec.json.Decoder(type_)
    try:
        return decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        problem, _, param = error_path(str(exc))
        where = f" at '{param}'" if param else ""
        raise InvalidRequest(f"Invalid request body{where}: {problem}", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequest("Request body is not valid UTF-8.") from None
    except RecursionError:
        raise InvalidRequest("Request body is nested too deeply.") from None


# Made once: `dict[str, msgspec.Raw]` is a new alias object (to build and hash) at each use.
_RAW_OBJECT = dict[str, msgspec.Raw]


def raw_object(body: bytes) -> dict[str, msgspec.Raw]:
    """A body's top-level fields as raw JSON, for pass-through.

    The body was decoded once already, but this may run deeper in the stack, where fewer
    levels of nesting are left before RecursionError: so it maps errors as `decode_body`.

    Raises:
        InvalidRequest: as `decode_body`.
    """
    return decode_body(body, _RAW_OBJECT)
