"""What `[server] database` names: a SQLite path or a PostgreSQL URL, and how it is shown.

A URL's password may hold characters a URL reserves (`/`, `?`, `#`, `@`, `&`): unless
percent-encoded, a URL parser ends the user part (or a `password=` parameter) early and reads
a piece of the password as a port, a host or another parameter, which drivers then quote in
their errors. `problem` refuses such a URL (and a URL of another kind) in words that never
repeat it, and `redact` hides the password of any URL, well formed or not.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["is_postgres_url", "is_url", "passwords", "problem", "redact"]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_POSTGRES = ("postgresql", "postgres")
# A parameter's name, up to its `=`. A password parameter's value is hidden with everything
# after it: a password holding `&`, `;` or `#` has no end a parser agrees on (hiding the
# parameters after it too is the safe side).
_PARAM = re.compile(r"[?&;]([^=&;?#]*)=")
# One host of a PostgreSQL URL's host list: a name or address (IPv6 in brackets), and an
# optional port of digits.
_HOST = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::(\d+))?")
_ENCODE = "percent-encode /, ?, #, @ and & in a user, a password or a parameter (%2F, ...)"


def _scheme(text: str) -> str | None:
    found = _SCHEME.match(text.lstrip())
    return found.group(1).lower() if found else None


def is_postgres_url(database: str) -> bool:
    return _scheme(database) in _POSTGRES


def is_url(database: str) -> bool:
    """Whether `database` is written as a URL (`scheme://`) other than a SQLite `file:` URI."""
    return _scheme(database) not in (None, "file")


def _authority_end(rest: str) -> int:
    """Where a URL's authority (after `scheme://`) ends: at its first `/`, `?` or `#`."""
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    return min(ends, default=len(rest))


def _postgres_problem(url: str) -> str | None:
    """What in a `postgresql://` URL asyncpg would read otherwise than written (see the
    module), or cannot read; None when nothing. asyncpg takes a list of hosts
    (`h1:5432,h2:5433`) and `key=value` parameters, an `@` among them included."""
    if url != url.strip():
        return "a database URL with spaces or line ends around it"
    rest = url[url.index("://") + 3 :]
    end = _authority_end(rest)
    userinfo, at, hosts = rest[:end].rpartition("@")
    if "@" in userinfo:  # asyncpg splits at the first @, URL parsers at the last
        return f"not a valid URL: more than one @ before its host; {_ENCODE}"
    if "[" in userinfo or "]" in userinfo:  # (Python's parser takes them for an address)
        return f"not a valid URL: a [ or ] before its host; {_ENCODE}"
    listed = hosts.split(",")
    for host in listed:
        found = _HOST.fullmatch(host)
        if found is None or (found.group(2) and int(found.group(2)) > 65535):
            return f"not a valid URL: a host's port is not a port number; {_ENCODE}"
        if len(listed) > 1 and not found.group(1):
            return "not a valid URL: an empty host in its host list"
    after = rest[end:]
    if "#" in after:
        return f"not a valid URL: a # after its host; {_ENCODE}"
    path, _, query = after.partition("?")
    if "@" in path:
        return f"not a valid URL: an @ in its database name; {_ENCODE}"
    if query and any("=" not in field for field in query.split("&")):
        return f"not a valid URL: a parameter without =; {_ENCODE}"
    if not at and ":" in hosts and re.search(r"@[^&]*/", query):
        # (a password that holds a ?, read as a parameter: "u:12?k=secret@host/db")
        return f"not a valid URL: an @ then a / in a parameter; {_ENCODE}"
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
    return _postgres_problem(database)


def _password_at(text: str) -> int | None:
    """Where the value of a URL's first `password=` parameter starts, its name read as
    asyncpg reads it (percent-decoded: `pass%77ord` too); None without one."""
    for found in _PARAM.finditer(text):
        if unquote(found.group(1)).lower() == "password":
            return found.end()
    return None


def passwords(database: str) -> list[str]:
    """The password pieces of a URL as written and as percent-decoded, for masking them in a
    driver's message (longest first)."""
    found = _SCHEME.match(database.lstrip())
    if found is None:
        return []
    rest = database.lstrip()[found.end() :]
    userinfo = rest[: _authority_end(rest)].rpartition("@")[0]
    pieces = []
    value = _password_at(rest)
    if value is not None:
        pieces.append(rest[value:].split("&", 1)[0])
    if ":" in userinfo:
        pieces.append(userinfo.split(":", 1)[1])
    shown = {p for piece in pieces for p in (piece, unquote(piece)) if p}
    return sorted(shown, key=len, reverse=True)


def redact(database: str) -> str:
    """The database for messages and logs: a URL's password (in its user part or a `password=`
    parameter, and all after that parameter) replaced by `***`. A URL `problem` refuses, or
    one with an `@` past its host and none before, has everything from the first `:` after
    `://` to its last `@` replaced: more than the password, maybe, never less."""
    text = database.lstrip()
    found = _SCHEME.match(text)
    if found is None:
        return database
    value = _password_at(text)
    shown = text if value is None else text[:value] + "***"
    rest = shown[found.end() :]
    end = _authority_end(rest)
    user, at, host = rest[:end].rpartition("@")
    if problem(text) is not None or (not at and "@" in rest[end:]):
        user, at, after = rest.rpartition("@")  # (not to be trusted: up to its last @)
    else:
        after = host + rest[end:]
    if at and ":" in user:
        return f"{found.group(0)}{user.split(':', 1)[0]}:***@{after}"
    return shown
