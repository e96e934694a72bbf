"""Write `keys.db.sample`: a database holding only the demo key (`sk-kiosk-demo`, model `demo`).

Run `.venv/bin/python -m tests.make_sample_db keys.db.sample` from the repository root.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from gateway.store import open_store

DEMO_SECRET = "sk-kiosk-demo"


async def make_sample_db(path: Path) -> None:
    """Create `path` afresh with the demo key, as one self-contained file (no -wal or -shm)."""
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    async with open_store(str(path)) as store:
        await store.create_key(name="demo", models=["demo"], secret=DEMO_SECRET)
        # Fold the WAL back into the file and leave it in rollback-journal mode, so the copy
        # `make run` takes is one file; the server switches it to WAL again when it opens it.
        for sql in ("PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA journal_mode = DELETE", "VACUUM"):
            await store.db.execute_fetchall(sql)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.make_sample_db OUTPUT", file=sys.stderr)
        return 2
    asyncio.run(make_sample_db(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
