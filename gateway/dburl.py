"""What `[server] database` names: a SQLite path or a PostgreSQL URL, and how it is shown."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["is_postgres_url", "redact"]


def is_postgres_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def redact(database: str) -> str:
    """The database for messages and logs: a URL's password (in its user part or a `password=`
    parameter) replaced by `***`."""
    if not is_postgres_url(database):
        return database
    parts = urlsplit(database)
    user, at, host = parts.netloc.rpartition("@")
    if at and ":" in user:
        user = user.split(":", 1)[0] + ":***"
    netloc = f"{user}@{host}" if at else host
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
