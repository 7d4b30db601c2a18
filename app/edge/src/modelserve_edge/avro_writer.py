"""``modelserve-edge-avro-writer``: input ``avroModuleInput`` -> rotating Avro files -> uploader.

A message is acknowledged (the handler returns) only after its record is fsynced in the ``.part``
file; with MQTT QoS 1 and a persistent session, anything not yet written is redelivered after a
crash, so no record is lost (a record may be written twice after a crash: at-least-once).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from modelserve_edge.avro_store import DirectoryTarget, HttpTarget, RotatingAvroWriter, Uploader, to_record
from modelserve_edge.config import ConfigError, data_dir, env_float, env_int, env_str
from modelserve_edge.tls import require_tls_unless_local, tls_context
from modelserve_edge.transport import Transport, handle_object

log = logging.getLogger(__name__)

INPUT = "avroModuleInput"
DEFAULT_STORE_MAX_BYTES = 256 << 20  # AVRO_STORE_MAX_BYTES
DEFAULT_RETENTION = 30 * 86400.0  # AVRO_RETENTION_SECONDS
PRUNE_EVERY = 60.0  # seconds between retention scans while no file closes


class AvroSink:
    def __init__(self, writer: RotatingAvroWriter):
        self.writer = writer

    def handle(self, input_name: str, body: bytes) -> None:
        record = handle_object(input_name, INPUT, body, lambda m: to_record(m, int(time.time() * 1000)), log)
        if record is None:
            return
        self.writer.write([record])


def upload_target(env=None):
    url, directory = env_str("AVRO_UPLOAD_URL", None, env), env_str("AVRO_UPLOAD_DIR", None, env)
    if url and directory:
        raise ConfigError("set AVRO_UPLOAD_URL or AVRO_UPLOAD_DIR, not both")
    if url:
        scheme = require_tls_unless_local("AVRO_UPLOAD_URL", url).scheme
        return HttpTarget(
            url,
            authorization=env_str("AVRO_UPLOAD_AUTHORIZATION", None, env),
            context=tls_context(env_str("AVRO_UPLOAD_TLS_CA", None, env)) if scheme == "https" else None,
        )
    if directory:
        return DirectoryTarget(directory)
    return None


def main() -> int:
    from modelserve_edge.runtime import serve

    def build(transport: Transport):
        directory = env_str("AVRO_DIR", None) or os.path.join(data_dir(), "avro")
        max_bytes = env_int("AVRO_MAX_BYTES", 1 << 20, minimum=1)
        store_max_bytes = env_int("AVRO_STORE_MAX_BYTES", DEFAULT_STORE_MAX_BYTES, minimum=0)
        if store_max_bytes and store_max_bytes < max_bytes:
            raise ConfigError(
                f"AVRO_STORE_MAX_BYTES={store_max_bytes} must be 0 or >= AVRO_MAX_BYTES={max_bytes}"
            )
        writer = RotatingAvroWriter(
            directory,
            max_bytes=max_bytes,
            max_age=env_float("AVRO_MAX_AGE_SECONDS", 300.0, minimum=0.0),
            codec=env_str("AVRO_CODEC", "deflate"),
            prefix=env_str("AVRO_FILE_PREFIX", "rul"),
            store_max_bytes=store_max_bytes,
            retention=env_float("AVRO_RETENTION_SECONDS", DEFAULT_RETENTION, minimum=0.0),
        )
        log.info(
            "avro store %s: cap %s bytes, retention %s s; dropped so far: %s",
            directory,
            writer.store_max_bytes or "no",
            f"{writer.retention:g}" if writer.retention else "no",
            writer.dropped.values,
        )
        if writer.recovered:
            log.info("recovered %d leftover part files", len(writer.recovered))
        stop = threading.Event()
        threads = [threading.Thread(target=_rotate_loop, args=(writer, stop), name="rotate", daemon=True)]
        target = upload_target()
        if target is None:
            log.warning("no AVRO_UPLOAD_URL/AVRO_UPLOAD_DIR: closed files stay in %s", directory)
        else:
            uploader = Uploader(
                directory, target, interval=env_float("AVRO_UPLOAD_INTERVAL", 10.0, minimum=0.01)
            )
            threads.append(threading.Thread(target=uploader.run, args=(stop,), name="upload", daemon=True))
        for t in threads:
            t.start()

        def cleanup():
            stop.set()
            for t in threads:
                t.join(timeout=30)
            writer.close()
            if target is not None:
                uploader.upload_once()

        return AvroSink(writer).handle, cleanup

    return serve("avro_writer", build)


def _rotate_loop(writer: RotatingAvroWriter, stop: threading.Event) -> None:
    tick = max(0.05, min(1.0, writer.max_age / 4))
    pruned = time.monotonic()
    while not stop.wait(tick):
        if not writer.maybe_rotate() and time.monotonic() - pruned >= PRUNE_EVERY:
            writer.prune()  # closing a file prunes too
            pruned = time.monotonic()


if __name__ == "__main__":
    sys.exit(main())
