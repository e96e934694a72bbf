"""What `[server] database` names: a SQLite path or a PostgreSQL URL, and how it is shown."""

from __future__ import annotations

import re

__all__ = ["is_postgres_url", "redact"]


def is_postgres_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def redact(database: str) -> str:
    """The database for messages and logs: a URL's password replaced by `***`."""
    if not is_postgres_url(database):
        return database
    return re.sub(r"^(\w+://[^:/@]*:)[^@]*@", r"\1***@", database)
