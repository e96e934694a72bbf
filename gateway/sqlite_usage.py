"""How usage rows and refusal counts are written into SQLite (`store.py` holds the lock and
the transaction around them).

A batch may be written twice (its commit was lost, the recorder retried): rows whose `uid` the
table holds are skipped, and so left out of the daily rollup.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any

import msgspec

from gateway.records import UsageRecord
from gateway.reports import ROLL_UP, roll_up
from gateway.rows import USAGE_COLUMNS as _USAGE_FIELDS

__all__ = [
    "ADD_REFUSALS",
    "INSERT_USAGE",
    "USAGE_RUN",
    "marks",
    "usage_statements",
    "write_usage",
]


def marks(fields: Sequence[object]) -> str:
    return ", ".join("?" * len(fields))


INSERT_USAGE = (
    f"INSERT INTO usage ({', '.join(_USAGE_FIELDS)}) VALUES ({marks(_USAGE_FIELDS)})"  # noqa: S608
    " ON CONFLICT (uid) DO NOTHING"
)
# Rows go in multi-row INSERTs (SQLite steps one statement for a run of rows instead of one
# per row: about half the CPU of a row) of power-of-two sizes up to USAGE_RUN: a batch of
# any size is a few runs (23 rows: 16 + 4 + 2 + 1), each of a statement prepared once and
# kept in the connection's statement cache (a handful of shapes, not one per batch size).
# USAGE_RUN is sized under SQLite's bound-parameter limit (32766 since 3.32, 999 before).
_MAX_PARAMS = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
USAGE_RUN = 1 << (min(256, _MAX_PARAMS // len(_USAGE_FIELDS)).bit_length() - 1)


def _insert_run(rows: int) -> str:
    return (
        f"INSERT INTO usage ({', '.join(_USAGE_FIELDS)}) VALUES "  # noqa: S608
        + ", ".join([f"({marks(_USAGE_FIELDS)})"] * rows)
        + " ON CONFLICT (uid) DO NOTHING"
    )


_INSERT_RUNS = {1 << n: _insert_run(1 << n) for n in range(USAGE_RUN.bit_length())}
# Where a row's bools are: bound as ints. sqlite3 binds an int, float or str at once, but
# asks its adapters about anything else (a bool too): a failed look-up of two attributes,
# about 3,500 instructions a value.
_WIDTH = len(_USAGE_FIELDS)
_BOOLS = tuple(i for i, f in enumerate(msgspec.structs.fields(UsageRecord)) if f.type is bool)
ADD_REFUSALS = (
    "INSERT INTO refusals (minute, key_id, status, count) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (minute, key_id, status) DO UPDATE SET count = count + excluded.count"
)


Statements = list[tuple[str, list[Any]]]


def usage_statements(rows: Sequence[UsageRecord]) -> tuple[Statements, list[tuple[Any, ...]]]:
    """The multi-row INSERTs of `rows` (with their parameters) and their rollup's parameters:
    made on the loop's thread, before the write is handed to the database's."""
    astuple = msgspec.structs.astuple
    inserts: Statements = []
    start, left = 0, len(rows)
    while left:
        size = USAGE_RUN if left >= USAGE_RUN else 1 << (left.bit_length() - 1)
        params = list(chain.from_iterable(map(astuple, rows[start : start + size])))
        for column in _BOOLS:
            params[column::_WIDTH] = map(int, params[column::_WIDTH])
        inserts.append((_INSERT_RUNS[size], params))
        start, left = start + size, left - size
    return inserts, roll_up(rows)


def write_usage(
    conn: sqlite3.Connection,
    rows: Sequence[UsageRecord],
    prepared: tuple[Statements, list[tuple[Any, ...]]] | None,
) -> None:
    """Insert the rows not written yet and add them to the daily rollup (in the caller's
    transaction, under its write lock, so no one adds them between the look and the insert).
    Runs in the database's thread, as one call: each statement handed over on its own was a
    hand-off to the thread and a wake-up of the loop. `prepared`: `usage_statements(rows)`,
    for rows never written before (no look for them in the table); None: look first."""
    inserts, rollup = usage_statements(_unwritten(conn, rows)) if prepared is None else prepared
    for sql, params in inserts:
        conn.execute(sql, params)
    if rollup:
        conn.executemany(ROLL_UP, rollup)


# How many uids one look-up binds (SQLite allows 32766 parameters since 3.32, 999 before).
_UID_CHUNK = 500


def _unwritten(conn: sqlite3.Connection, rows: Sequence[UsageRecord]) -> list[UsageRecord]:
    """`rows` without those whose uid the table (or an earlier row of `rows`) already holds."""
    uids = [r.uid for r in rows if r.uid is not None]
    seen: set[str] = set()
    for start in range(0, len(uids), _UID_CHUNK):
        chunk = uids[start : start + _UID_CHUNK]
        sql = f"SELECT uid FROM usage WHERE uid IN ({marks(chunk)})"  # noqa: S608
        seen.update(uid for (uid,) in conn.execute(sql, chunk).fetchall())
    if not seen and len(set(uids)) == len(uids):
        return list(rows)
    new = []
    for row in rows:
        if row.uid is not None:
            if row.uid in seen:
                continue
            seen.add(row.uid)
        new.append(row)
    return new
