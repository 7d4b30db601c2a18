"""A durable FIFO on sqlite (WAL, synchronous=FULL): ``put`` returns after the commit, items are
removed only by ``ack`` after they were delivered, so nothing is lost across restarts.

Bounds, so that a device offline for long does not fill its storage: ``max_items``, ``max_bytes``
(sum of the message bodies; the file itself adds sqlite's page overhead and does not shrink, its
freed pages are reused) and ``max_age`` (seconds since enqueued). Beyond them the oldest items are
dropped; drops are logged and counted in the database (``dropped``), so the totals survive restarts.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Names of the drop counters: items dropped by the count cap, the byte cap, the age limit, and the
# bytes of all of them.
DROP_COUNTERS = ("items_max_items", "items_max_bytes", "items_max_age", "bytes")


class DiskQueue:
    def __init__(
        self,
        path: str | Path,
        *,
        max_items: int = 0,
        max_bytes: int = 0,
        max_age: float = 0.0,
        clock=time.time,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0 = unbounded; otherwise the oldest items are dropped (logged and counted)
        self.max_items, self.max_bytes, self.max_age = max_items, max_bytes, max_age
        self.clock = clock
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS queue ("
            "id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL, enqueued REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS queue_enqueued ON queue (enqueued)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        self._bytes = self._sum_bytes()
        with self._lock:
            self._transaction(self._enforce)

    # bounds ---------------------------------------------------------------------------------
    def _transaction(self, work):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._bytes = self._sum_bytes()
            raise
        return result

    def _sum_bytes(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM queue").fetchone()[0])

    def _enforce(self) -> None:
        """Drop what is beyond the bounds, oldest first (inside the caller's transaction)."""
        if self.max_age:
            cutoff = self.clock() - self.max_age
            ids = [
                r[0]
                for r in self._db.execute("SELECT id FROM queue WHERE enqueued < ? ORDER BY id", (cutoff,))
            ]
            self._drop("max_age", f"older than {self.max_age:g} s", ids)
        if self.max_bytes and self._bytes > self.max_bytes:
            ids, excess = [], self._bytes - self.max_bytes
            for row_id, length in self._db.execute("SELECT id, LENGTH(body) FROM queue ORDER BY id"):
                if excess <= 0:
                    break
                ids.append(row_id)
                excess -= length
            self._drop("max_bytes", f"over {self.max_bytes} bytes", ids)
        if self.max_items:
            excess = self._count() - self.max_items
            if excess > 0:
                ids = [r[0] for r in self._db.execute("SELECT id FROM queue ORDER BY id LIMIT ?", (excess,))]
                self._drop("max_items", f"over {self.max_items} messages", ids)

    def _drop(self, reason: str, why: str, ids: list[int]) -> None:
        if not ids:
            return
        size = 0
        for row_id in ids:
            size += self._delete(row_id)
        self._count_drop(f"items_{reason}", len(ids))
        self._count_drop("bytes", size)
        total = sum(v for k, v in self._counters().items() if k.startswith("items_"))
        log.warning(
            "queue %s: dropped the %d oldest messages (%d bytes); %d dropped in total",
            why,
            len(ids),
            size,
            total,
        )

    def _delete(self, row_id: int) -> int:
        """Delete one row; its body's length (0 if it was gone)."""
        row = self._db.execute("SELECT LENGTH(body) FROM queue WHERE id = ?", (row_id,)).fetchone()
        if row is None:
            return 0
        self._db.execute("DELETE FROM queue WHERE id = ?", (row_id,))
        self._bytes -= int(row[0])
        return int(row[0])

    def _count_drop(self, name: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    def _counters(self) -> dict[str, int]:
        found = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return {name: int(found.get(name, 0)) for name in DROP_COUNTERS}

    @property
    def dropped(self) -> dict[str, int]:
        """Drops since the queue was created (persistent): items per reason, and their bytes."""
        with self._lock:
            return self._counters()

    @property
    def size_bytes(self) -> int:
        """Sum of the queued bodies."""
        with self._lock:
            return self._bytes

    def expire(self) -> None:
        """Drop what is older than max_age (``put`` does it too; call it while nothing arrives)."""
        if self.max_age:
            with self._lock:
                self._transaction(self._enforce)

    # queue ----------------------------------------------------------------------------------
    def put(self, body: bytes) -> int:
        with self._lock:

            def insert():
                cur = self._db.execute(
                    "INSERT INTO queue (body, enqueued) VALUES (?, ?)", (body, self.clock())
                )
                self._bytes += len(body)
                self._enforce()
                return int(cur.lastrowid)

            row_id = self._transaction(insert)
            self._ready.notify_all()
            return row_id

    def peek(self, limit: int = 100) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute("SELECT id, body FROM queue ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [(int(i), bytes(b)) for i, b in rows]

    def ack(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            self._transaction(lambda: [self._delete(i) for i in ids])

    def wait(self, timeout: float) -> bool:
        """Wait until the queue is not empty (or timeout); True if it is not empty."""
        with self._ready:
            if not self._count():
                self._ready.wait(timeout)
            return self._count() > 0

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0])

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def close(self) -> None:
        with self._lock:
            self._db.close()
