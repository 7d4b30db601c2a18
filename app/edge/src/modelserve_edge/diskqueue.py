"""A durable FIFO on sqlite (WAL, synchronous=FULL): ``put`` returns after the commit, items are
removed only by ``ack`` after they were delivered, so nothing is lost across restarts."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class DiskQueue:
    def __init__(self, path: str | Path, *, max_items: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items  # 0 = unbounded; otherwise the oldest items are dropped (logged)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS queue ("
            "id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL, enqueued REAL NOT NULL)"
        )

    def put(self, body: bytes) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO queue (body, enqueued) VALUES (?, ?)", (body, time.time())
                )
                if self.max_items:
                    dropped = self._db.execute(
                        "DELETE FROM queue WHERE id <= (SELECT MAX(id) FROM queue) - ?", (self.max_items,)
                    ).rowcount
                    if dropped:
                        log.warning(
                            "queue full (%d): dropped the %d oldest messages", self.max_items, dropped
                        )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._ready.notify_all()
            return int(cur.lastrowid)

    def peek(self, limit: int = 100) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute("SELECT id, body FROM queue ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [(int(i), bytes(b)) for i, b in rows]

    def ack(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            self._db.executemany("DELETE FROM queue WHERE id = ?", [(i,) for i in ids])

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
