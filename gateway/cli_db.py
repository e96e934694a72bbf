"""The database commands of `gateway`: `migrate` (bring a schema up to date) and `copy-db`
(fill an empty database from another, e.g. a SQLite file into PostgreSQL)."""

from __future__ import annotations

import argparse
import sys

from gateway.database import Database, opened_database
from gateway.dburl import redact
from gateway.store import StoreError

__all__ = ["add_commands", "copy_db", "migrate"]


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add `migrate` (which takes `--db`/`--config` like the key commands) and `copy-db`."""
    sub.add_parser(
        "migrate", parents=[common], help="bring the database's schema up to date"
    ).set_defaults(run=migrate)
    copy = sub.add_parser(
        "copy-db", help="copy keys, usage and refusal counts into an empty database"
    )
    copy.add_argument("--from", dest="source", required=True, metavar="PATH|URL")
    copy.add_argument("--to", dest="target", required=True, metavar="PATH|URL")


async def migrate(store: Database, args: argparse.Namespace) -> int:
    # Opening the database applied any missing migration step.
    print(f"{redact(store.path)}: schema up to date")
    return 0


async def copy_db(source: str, target: str) -> int:
    """Copy everything from `source` into the empty database `target`, in one transaction.

    Returns:
        0 copied, 1 the target is not empty (nothing copied), 2 source and target are one.
    """
    if source == target:
        print("gateway: copy-db: --from and --to are the same database", file=sys.stderr)
        return 2
    async with opened_database(source) as src, opened_database(target) as dst:
        keys = await src.list_keys()
        refusals = await src.export_refusals()
        try:
            rows, ids = await dst.import_rows(
                keys, src.export_usage(), refusals, src.export_stored()
            )
        except StoreError as exc:
            print(f"gateway: copy-db: {redact(target)}: {exc}; nothing copied", file=sys.stderr)
            return 1
    print(
        f"Copied {len(keys)} keys, {rows} usage rows, {refusals.total()} refused-request"
        f" counts and {ids} stored ids from {redact(source)} to {redact(target)}."
    )
    return 0
