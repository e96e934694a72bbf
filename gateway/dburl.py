"""What `[server] database` names: a SQLite path or a PostgreSQL URL, and how it is shown.

A URL's password may hold characters a URL reserves (`/`, `?`, `#`): unless percent-encoded,
a URL parser ends the user part before them and reads a piece of the password as the port.
`problem` refuses such a URL (and a URL of another kind) in words that never repeat it, and
`redact` hides the password of any URL, parsed or not.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["is_postgres_url", "is_url", "problem", "redact", "url_problem"]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_POSTGRES = ("postgresql", "postgres")
_PASSWORD_PARAM = re.compile(r"([?&;]password=)[^&#;]*", re.IGNORECASE)
_ENCODE = "percent-encode /, ?, # and @ in a password or a parameter: %2F, %3F, %23, %40"


def _scheme(text: str) -> str | None:
    found = _SCHEME.match(text)
    return found.group(1).lower() if found else None


def _authority_end(rest: str) -> int:
    """Where a URL's authority (after `scheme://`) ends: at its first `/`, `?` or `#`."""
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    return min(ends, default=len(rest))


def is_postgres_url(database: str) -> bool:
    return _scheme(database) in _POSTGRES


def is_url(database: str) -> bool:
    """Whether `database` is written as a URL (`scheme://`) other than a SQLite `file:` URI."""
    return _scheme(database) not in (None, "file")


def url_problem(url: str) -> str | None:
    """Why `url` does not parse as a URL with a host and port (None when it does), without
    repeating it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number or out of range
    except ValueError:
        return f"not a valid URL: what follows its host's colon is not a port; {_ENCODE}"
    if "@" not in parts.netloc and "@" in url[len(parts.scheme) + 3 :]:
        return f"not a valid URL: an @ after its host; {_ENCODE}"
    return None


def problem(database: str) -> str | None:
    """Why `database` can be neither a SQLite path nor a PostgreSQL URL (None when it is one),
    in words that never repeat it: it may hold a password."""
    scheme = _scheme(database)
    if scheme is None or scheme == "file":  # a path, or a SQLite URI
        return None
    if scheme not in _POSTGRES:
        return (
            "a database URL must start with postgresql:// or postgres:// (SQLAlchemy's "
            "postgresql+asyncpg:// is written postgresql:// here); anything else is a SQLite path"
        )
    return url_problem(database)


def redact(database: str) -> str:
    """The database for messages and logs: a URL's password (in its user part or a `password=`
    parameter) replaced by `***`. A URL that does not parse (see the module) has everything
    from the first `:` after `://` to its last `@` replaced: more than the password, maybe,
    never less."""
    found = _SCHEME.match(database)
    if found is None:
        return database
    shown = _PASSWORD_PARAM.sub(r"\1***", database)
    rest = shown[found.end() :]
    if url_problem(database) is not None:
        userinfo, at, after = rest.rpartition("@")
        if at and ":" in userinfo:
            return f"{found.group(0)}{userinfo.split(':', 1)[0]}:***@{after}"
        return shown
    end = _authority_end(rest)
    user, at, host = rest[:end].rpartition("@")
    if at and ":" in user:
        return f"{found.group(0)}{user.split(':', 1)[0]}:***@{host}{rest[end:]}"
    return shown
