"""Crash-safe rotating Avro files and the uploader that ships them.

Writing: records go to ``<prefix>-<utc time>-<n>.avro.part``; after each batch the Avro block is
flushed and the file fsynced (only then is the batch acknowledged). Closing (rotation by size or age,
or shutdown) fsyncs and renames the file to ``.avro`` and fsyncs the directory. Only ``.avro`` files
are ever shipped, so a partial file never is.

Recovery (on start): a leftover ``.part`` is cut back to its last complete block (an Avro block ends
with the file's 16-byte sync marker, so a torn block is detected) and renamed to ``.avro``; a part
with no complete block is removed. Truncating and renaming are idempotent, so a crash during
recovery is recovered by the next start.

Bounds (so that a device offline for long does not fill its SD card): ``store_max_bytes`` caps the
closed files plus the open one, ``retention`` drops closed files last written longer ago than that;
the oldest files go first, never the open one. Drops (files, records, bytes) are logged and counted
in ``.dropped.json`` beside the files, so the totals survive restarts.

Uploading: closed files, oldest first, to a directory (copy to a temp name, fsync, rename) or an
HTTP endpoint (POST, 2xx = success); a file is deleted only after it was shipped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import fastavro
from fastavro.write import Writer

from modelserve_edge.httppost import post

log = logging.getLogger(__name__)

PART = ".part"
SUFFIX = ".avro"
MAGIC = b"Obj\x01"

SCHEMA = {
    "type": "record",
    "name": "RulPrediction",
    "namespace": "modelserve.edge",
    "fields": [
        {"name": "deviceId", "type": "string"},
        {"name": "engine", "type": ["null", "int"], "default": None},
        {"name": "unit", "type": ["null", "int"], "default": None},
        {"name": "cycle", "type": "int"},
        {"name": "timestamp", "type": ["null", "long"], "default": None, "doc": "epoch ms at the device"},
        {"name": "settings", "type": {"type": "array", "items": "double"}},
        {"name": "sensors", "type": {"type": "array", "items": "double"}},
        {"name": "RUL", "type": "double"},
        {"name": "modelVersion", "type": ["null", "string"], "default": None},
        {"name": "writtenAt", "type": "long", "doc": "epoch ms when written on the edge"},
    ],
}
PARSED_SCHEMA = fastavro.parse_schema(SCHEMA)


def to_record(message: dict, now_ms: int) -> dict:
    """A classifier message as a record of SCHEMA; ValueError if it does not fit."""
    try:
        record = {
            "deviceId": str(message["deviceId"]),
            "engine": None if message.get("engine") is None else int(message["engine"]),
            "unit": None if message.get("unit") is None else int(message["unit"]),
            "cycle": int(message["cycle"]),
            "timestamp": None if message.get("timestamp") is None else int(message["timestamp"]),
            "settings": [float(v) for v in message["settings"]],
            "sensors": [float(v) for v in message["sensors"]],
            "RUL": float(message["RUL"]),
            "modelVersion": None if message.get("modelVersion") is None else str(message["modelVersion"]),
            "writtenAt": now_ms,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"message does not fit the Avro schema: {exc!r}") from None
    return record


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Avro container scanning (for recovery) ---------------------------------------------------
def _read_long(f) -> int | None:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return (result >> 1) ^ -(result & 1)
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def complete_length(path: Path) -> tuple[int, int]:
    """(bytes up to the end of the last complete block, number of complete blocks); (0, 0) when even
    the header is incomplete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            if f.read(4) != MAGIC:
                return 0, 0
            while True:  # metadata map
                count = _read_long(f)
                if count is None:
                    return 0, 0
                if count == 0:
                    break
                if count < 0:
                    count = -count
                    if _read_long(f) is None:
                        return 0, 0
                for _ in range(count):
                    for _ in range(2):
                        n = _read_long(f)
                        if n is None or n < 0 or f.tell() + n > size:
                            return 0, 0
                        f.seek(n, io.SEEK_CUR)
            sync = f.read(16)
            if len(sync) != 16:
                return 0, 0
            end, blocks = f.tell(), 0
            while True:
                count, length = _read_long(f), _read_long(f)
                if count is None or length is None or count < 0 or length < 0:
                    break
                if f.tell() + length + 16 > size:
                    break
                f.seek(length, io.SEEK_CUR)
                if f.read(16) != sync:
                    break
                end, blocks = f.tell(), blocks + 1
        except ValueError:
            pass
    return end, blocks


def recover_part(part: Path) -> Path | None:
    """Finish a leftover ``.part`` file: the closed ``.avro`` path, or None if it held no record."""
    end, blocks = complete_length(part)
    if blocks == 0:
        log.warning("%s: no complete block; removed", part.name)
        part.unlink()
        fsync_dir(part.parent)
        return None
    with open(part, "r+b") as f:
        if os.fstat(f.fileno()).st_size > end:
            log.warning("%s: cut a torn block (%d bytes)", part.name, os.fstat(f.fileno()).st_size - end)
            f.truncate(end)
        os.fsync(f.fileno())
    final = part.with_name(part.name[: -len(PART)])
    os.replace(part, final)
    fsync_dir(part.parent)
    log.info("%s: recovered %d blocks", final.name, blocks)
    return final


def count_records(path: Path) -> int:
    """Records in a closed file (block headers only); 0 if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return sum(block.num_records for block in fastavro.block_reader(f))
    except (OSError, ValueError, EOFError):
        return 0


DROP_COUNTERS = ("files_max_bytes", "files_max_age", "records", "bytes")


class DropCounters:
    """Persistent counters of dropped files (a small JSON file, replaced atomically)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = {}
        self.values = {name: int(found.get(name, 0)) for name in DROP_COUNTERS}

    def add(self, **deltas: int) -> None:
        for name, delta in deltas.items():
            self.values[name] += delta
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.values, sort_keys=True))
        os.replace(tmp, self.path)


def read_records(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(fastavro.reader(f))


class RotatingAvroWriter:
    def __init__(
        self,
        directory: str | Path,
        *,
        max_bytes: int = 1 << 20,
        max_age: float = 300.0,
        codec: str = "deflate",
        prefix: str = "rul",
        schema: dict = PARSED_SCHEMA,
        clock: Callable[[], float] = time.time,
        store_max_bytes: int = 0,
        retention: float = 0.0,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_age, self.codec, self.prefix = max_bytes, max_age, codec, prefix
        # 0 = unbounded; the open file can reach max_bytes, so a cap below that would empty the store
        if store_max_bytes and store_max_bytes < max_bytes:
            raise ValueError(f"store cap {store_max_bytes} is below the file size {max_bytes}")
        self.store_max_bytes, self.retention = store_max_bytes, retention
        self.dropped = DropCounters(self.directory / ".dropped.json")
        self.schema, self.clock = schema, clock
        self.lock = threading.RLock()
        self._file = None
        self._writer = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._seq = 0
        self.recovered = [p for p in map(recover_part, sorted(self.directory.glob("*" + SUFFIX + PART))) if p]
        self.prune()

    @property
    def current(self) -> Path | None:
        return self._path

    def _open(self) -> None:
        now = self.clock()
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S%fZ")
        while True:
            self._seq += 1
            path = self.directory / f"{self.prefix}-{stamp}-{os.getpid()}-{self._seq:04d}{SUFFIX}{PART}"
            if not path.exists() and not path.with_name(path.name[: -len(PART)]).exists():
                break
        self._file = open(path, "xb")  # noqa: SIM115 - closed by close_current()
        self._writer = Writer(self._file, self.schema, codec=self.codec)
        self._path, self._opened_at = path, now

    def write(self, records: Iterable[dict]) -> None:
        """Append records and make them durable (fsync) before returning; rotate by size."""
        with self.lock:
            records = list(records)
            if not records:
                return
            if self._writer is None:
                self._open()
            for record in records:
                self._writer.write(record)
            self._writer.flush()
            self._file.flush()
            os.fsync(self._file.fileno())
            if self._file.tell() >= self.max_bytes:
                self.close_current()

    def maybe_rotate(self) -> bool:
        """Close the current file if it is older than max_age (call periodically)."""
        with self.lock:
            if self._writer is not None and self.clock() - self._opened_at >= self.max_age:
                self.close_current()
                return True
            return False

    def close_current(self) -> Path | None:
        with self.lock:
            if self._writer is None:
                return None
            self._writer.flush()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._path.with_name(self._path.name[: -len(PART)])
            os.replace(self._path, final)
            fsync_dir(self.directory)
            self._file = self._writer = self._path = None
            log.info("closed %s", final.name)
            self.prune()
            return final

    def prune(self) -> int:
        """Drop closed files beyond the retention and the byte cap, oldest first; files dropped."""
        if not (self.store_max_bytes or self.retention):
            return 0
        with self.lock:
            now = self.clock()
            closed = []
            for path in sorted(self.directory.glob("*" + SUFFIX)):  # names start with the UTC time
                try:
                    st = path.stat()
                except FileNotFoundError:  # shipped meanwhile by the uploader
                    continue
                closed.append((path, st.st_size, st.st_mtime))
            total = sum(size for _, size, _ in closed)
            if self._file is not None:
                total += os.fstat(self._file.fileno()).st_size
            doomed = []
            for path, size, mtime in closed:
                if self.retention and now - mtime > self.retention:
                    reason = "max_age"
                elif self.store_max_bytes and total > self.store_max_bytes:
                    reason = "max_bytes"
                else:
                    continue
                doomed.append((path, size, reason))
                total -= size
            for path, size, reason in doomed:
                records = count_records(path)
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                self.dropped.add(**{f"files_{reason}": 1, "records": records, "bytes": size})
                log.warning(
                    "avro store %s: dropped %s (%d records, %d bytes); %d records dropped in total",
                    "over the byte cap" if reason == "max_bytes" else "past the retention",
                    path.name,
                    records,
                    size,
                    self.dropped.values["records"],
                )
            if doomed:
                fsync_dir(self.directory)
            return len(doomed)

    def close(self) -> None:
        self.close_current()


# --- uploading -----------------------------------------------------------------------------
class DirectoryTarget:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def ship(self, path: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{path.name}.tmp"
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.directory / path.name)
        fsync_dir(self.directory)

    def __str__(self) -> str:
        return str(self.directory)


class HttpTarget:
    """POSTs the file body (``Content-Type: avro/binary``, ``X-Filename: <name>``); 2xx = stored."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        authorization: str | None = None,
        context: ssl.SSLContext | None = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"upload URL must be http(s): {url!r}")
        self.url, self.timeout, self.authorization, self.context = url, timeout, authorization, context

    def ship(self, path: Path) -> None:
        post(
            self.url,
            path.read_bytes(),
            {"Content-Type": "avro/binary", "X-Filename": path.name},
            timeout=self.timeout,
            authorization=self.authorization,
            context=self.context,
            what=f"upload of {path.name}: ",
        )

    def __str__(self) -> str:
        return self.url


class Uploader:
    def __init__(self, directory: str | Path, target, *, interval: float = 10.0, max_backoff: float = 300.0):
        self.directory = Path(directory)
        self.target = target
        self.interval, self.max_backoff = interval, max_backoff
        self.failures = 0

    def pending(self) -> list[Path]:
        """Closed files, oldest first (names start with the UTC time). Never ``.part`` files."""
        return sorted(p for p in self.directory.glob("*" + SUFFIX) if p.is_file())

    def upload_once(self) -> int:
        """Ship what is pending; stop at the first failure (retried later). Returns files shipped."""
        shipped = 0
        for path in self.pending():
            try:
                self.target.ship(path)
            except FileNotFoundError:
                continue  # dropped by the store's byte cap or retention meanwhile
            except Exception as exc:
                self.failures += 1
                log.warning("upload of %s to %s failed (%s); will retry", path.name, self.target, exc)
                return shipped
            path.unlink(missing_ok=True)
            fsync_dir(self.directory)
            shipped += 1
            self.failures = 0
            log.info("shipped %s to %s", path.name, self.target)
        return shipped

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.upload_once()
            delay = (
                self.interval
                if not self.failures
                else min(self.max_backoff, self.interval * 2**self.failures)
            )
            stop.wait(delay)
